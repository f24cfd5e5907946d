"""The contract's side of the methods: impossible combinations refused before queueing,
and the submit-time estimates counting what the methods return and the UNet calls they
make."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from ddim_inversion.estimates import stored_bytes, unet_calls
from ddim_inversion.params import InversionParams
from ddim_inversion.scheduler_config import resolve_scheduler_config
from worker.methods.ddpm import ddpm_invert, ddpm_sample
from worker.methods.dpmsolver import dpmsolver_invert, dpmsolver_sample
from worker.methods.edict import edict_invert, edict_sample
from worker.methods.negative_prompt import negative_prompt_embeddings
from worker.tiny_model import SD15_SCHEDULER_CONFIG

STEPS = 6


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"eta": 0.5}, "eta"),
        ({"method": "edict", "eta": 1.0}, "eta"),
        ({"method": "ddpm", "edict_mixing": 0.5}, "edict_mixing"),
        ({"method": "edict", "inverse_scheduler": "dpmsolver"}, "dpmsolver"),
        ({"method": "null_text", "guidance_scale": 7.5, "inverse_scheduler": "dpmsolver"}, "dpm"),
        ({"method": "ddpm", "refine_iterations": 3}, "refine_iterations"),
        ({"inverse_scheduler": "dpmsolver", "refine_iterations": 3}, "refine_iterations"),
        ({"method": "negative_prompt", "negative_prompt": "blurry"}, "negative_prompt"),
        ({"method": "ddpm", "eta": 0.0}, "eta"),
        ({"method": "edict", "edict_mixing": 0.0}, "edict_mixing"),
        ({"inverse_scheduler": "dpmsolver", "scheduler": {"clip_sample": True}}, "solver_order"),
    ],
)
def test_impossible_combinations_are_refused_naming_the_parameter(fields, named):
    with pytest.raises(ValidationError) as refused:
        InversionParams(prompt="a cat", **fields)
    assert named in str(refused.value)


@pytest.mark.parametrize(
    "fields",
    [
        {"method": "ddpm", "eta": 0.5, "seed": 3, "guidance_scale": 3.0},
        {"method": "edict", "edict_mixing": 0.8, "verify": True},
        {"method": "negative_prompt", "guidance_scale": 7.5, "refine_iterations": 2},
        {"inverse_scheduler": "dpmsolver", "scheduler": {"solver_order": 3}},
        {"method": "negative_prompt", "inverse_scheduler": "dpmsolver"},
    ],
)
def test_possible_combinations_are_accepted(fields):
    params = InversionParams(prompt="a cat", **fields)
    assert {name: getattr(params, name) for name in fields} == fields


def zero_noise(counter: list[int]):
    def noise(z: torch.Tensor, t: int, step_index: int) -> torch.Tensor:
        counter.append(z.shape[0])
        return torch.zeros_like(z)

    return noise


def test_stored_bytes_count_what_each_method_adds(tiny32):
    info = tiny32.info()
    latents = torch.zeros(1, 4, 8, 8)
    calls: list[int] = []
    edict = edict_invert(zero_noise(calls), latents, SD15_SCHEDULER_CONFIG, STEPS)
    ddpm = ddpm_invert(zero_noise(calls), latents, SD15_SCHEDULER_CONFIG, STEPS, seeds=[0])
    nulls = negative_prompt_embeddings(torch.zeros(1, 77, info.text_hidden_size), STEPS)
    expected = {
        "edict": edict.latents_pair[0].nbytes,
        "ddpm": ddpm.noise_maps[0].nbytes + ddpm.noisy_latents[0].nbytes,
        "negative_prompt": 0,
        "ddim": 0,
    }
    for method, method_bytes in expected.items():
        params = InversionParams(prompt="a", num_inference_steps=STEPS, method=method)
        stored = stored_bytes(params, info, (64, 64), (64, 64))
        assert stored.method_latents == method_bytes, method
        embeddings = nulls[0].nbytes if method == "negative_prompt" else 0
        assert stored.null_embeddings == embeddings, method
    big = InversionParams(prompt="a", num_inference_steps=200, method="ddpm")
    assert stored_bytes(big, info, (64, 64), (64, 64)).largest_field == "method"


@pytest.mark.parametrize(
    "fields",
    [
        {"method": "edict", "guidance_scale": 3.0, "verify": True},
        {"method": "edict"},
        {"method": "ddpm", "guidance_scale": 3.0, "verify": True},
        {"inverse_scheduler": "dpmsolver", "verify": True},
    ],
)
def test_unet_calls_count_the_methods_calls(fields):
    params = InversionParams(prompt="a", num_inference_steps=STEPS, **fields)
    passes = 2 if params.uses_guidance else 1
    rows: list[int] = []
    noise = zero_noise(rows)
    x = torch.zeros(1, 4, 8, 8)
    if params.method == "edict":
        result = edict_invert(noise, x, SD15_SCHEDULER_CONFIG, STEPS)
        if params.verify:
            edict_sample(noise, result.latents, result.latents_pair, SD15_SCHEDULER_CONFIG, STEPS)
    elif params.method == "ddpm":
        result = ddpm_invert(noise, x, SD15_SCHEDULER_CONFIG, STEPS, seeds=[0])
        ddpm_sample(noise, result.latents, result.noise_maps, SD15_SCHEDULER_CONFIG, STEPS)
    else:
        config = resolve_scheduler_config(SD15_SCHEDULER_CONFIG, {}, STEPS, "dpmsolver")
        dpmsolver_sample(noise, dpmsolver_invert(noise, x, config, STEPS).latents, config, STEPS)
    assert unet_calls(params) == sum(rows) * passes
