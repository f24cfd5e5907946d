"""The engine runs every method: edict, ddpm, negative_prompt and inverse_scheduler dpmsolver.

Each engine result equals the method's function (worker/methods, tested against its paper's
equations in tests/methods) applied to the clean latent and the prompt embedding encoded
here by the test's own reference code, with the model called by the test's own guided
noise function. Then what the engine adds around it: batching (a batch gives each row its
solo result), cancel (a stopped row is None, the others untouched), the result file's
tensors, and verify sampling back with each method's own sampler.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from ddim_inversion import estimates
from ddim_inversion.params import InversionParams
from ddim_inversion.scheduler_config import resolve_scheduler_config
from tests.conftest import EVENT_GUARD_S
from tests.rounding import figure_tolerance
from worker.engine.dispatch import invert
from worker.engine.types import InversionRequest, load_result, progress_total
from worker.methods.ddpm import ddpm_invert
from worker.methods.dpmsolver import dpmsolver_invert
from worker.methods.edict import edict_invert
from worker.tiny_model import SD15_SCHEDULER_CONFIG

STEPS = 6
PROMPT = "an astronaut"
EXACT = 1e-10
"""float64: the engine and the reference compute the same operations (batching exact).

They differ by float64 rounding only: the kernels' summation order (batch of one or two)
and the arrangement of the equations, measured 5e-13 at most over 6 steps (EDICT's
divisions by p and DDPM's by sigma_t amplify it). 1e-10 leaves 200x, and is 1e3 below
float32 rounding (1e-7 and more), so a step done in float32 anywhere fails it."""
FIGURE = {"rel": 1e-6, "abs": 1e-9}
"""A figure from the latents (error, PSNR) batched against alone. Its relative change is
the latents' (1e-13): rel 1e-6 leaves 1e7. An exact method's error is itself float64
rounding (1e-12) and moves absolutely by ||dz|| / ||z_0|| for the sampled-back dz (5e-13
an element at most, as the latents): 5e-13 * sqrt(256) / ||z_0|| (0.3 and more) = 3e-11,
measured 2e-13; abs 1e-9 leaves 30x over the estimate."""


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class Noise:
    """The model as the methods take it, written here: unet(z, t, c), or under guidance g
    eps_u + g (eps_c - eps_u) with the empty prompt's embedding as u."""

    def __init__(self, ref: Any, prompt: str, guidance: float) -> None:
        self.ref, self.guidance = ref, guidance
        self.cond, self.uncond = ref.encode_text(prompt), ref.encode_text("")

    def __call__(self, z: torch.Tensor, t: int, step_index: int) -> torch.Tensor:
        return self.ref.eps(z, t, self.cond, self.uncond, self.guidance)


CASES: dict[str, dict[str, Any]] = {
    "edict": {"method": "edict"},
    "edict mixing 0.7 guided": {"method": "edict", "edict_mixing": 0.7, "guidance_scale": 3.0},
    "ddpm": {"method": "ddpm", "seed": 11},
    "ddpm eta 0.5 guided": {"method": "ddpm", "eta": 0.5, "guidance_scale": 3.0},
    "dpmsolver": {"inverse_scheduler": "dpmsolver"},
    "dpmsolver guided": {"inverse_scheduler": "dpmsolver", "guidance_scale": 3.0},
    "negative_prompt": {"method": "negative_prompt", "guidance_scale": 7.5},
    "negative_prompt dpmsolver": {
        "method": "negative_prompt",
        "inverse_scheduler": "dpmsolver",
        "guidance_scale": 7.5,
    },
}


def params(**fields: Any) -> InversionParams:
    return InversionParams(**({"prompt": PROMPT, "num_inference_steps": STEPS} | fields))


@torch.no_grad()
def reference(ref: Any, array: np.ndarray, p: InversionParams) -> dict[str, Any]:
    """The method's function on the latent and embeddings encoded by the reference."""
    z0 = ref.encode_image(array)
    # negative_prompt inverts at guidance 1 under the prompt; the others at the job's.
    guidance = 1.0 if p.method == "negative_prompt" else p.guidance_scale
    noise = Noise(ref, p.prompt, guidance)
    if p.inverse_scheduler == "dpmsolver":
        config = resolve_scheduler_config(SD15_SCHEDULER_CONFIG, {}, STEPS, "dpmsolver")
        out = dpmsolver_invert(noise, z0, config, STEPS, keep_trajectory=True)
        found = {"latents": out.latents, "trajectory": out.trajectory, "timesteps": out.timesteps}
    elif p.method == "edict":
        out = edict_invert(
            noise, z0, SD15_SCHEDULER_CONFIG, STEPS, mixing=p.mixing, keep_trajectory=True
        )
        found = {"latents": out.latents, "latents_pair": out.latents_pair}
        found |= {"trajectory": out.trajectory, "timesteps": out.timesteps}
    elif p.method == "ddpm":
        out = ddpm_invert(
            noise, z0, SD15_SCHEDULER_CONFIG, STEPS, seeds=[p.seed or 0], eta=p.ddpm_eta
        )
        found = {
            "latents": out.latents,
            "noise_maps": out.noise_maps,
            "noisy_latents": out.noisy_latents,
            "trajectory": out.noisy_latents,
            "timesteps": out.timesteps,
        }
    else:  # negative_prompt under DDIM: the DDIM equations (tests/engine/conftest.py)
        timesteps, path = ref.invert(array, p.prompt, STEPS)
        found = {"latents": path[-1], "trajectory": path[:, 0][None], "timesteps": timesteps}
    if p.method == "negative_prompt":
        found["null_embeddings"] = noise.cond.expand(STEPS, -1, -1)
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_each_method_is_its_function_on_the_encoded_latent(case, tiny64, ref64, sample_arrays):
    p = params(**CASES[case], return_trajectory=True)
    array = sample_arrays["astronaut"]
    (result,) = invert(tiny64, [InversionRequest(array, p)])
    want = reference(ref64, array, p)
    assert [int(t) for t in result.timesteps] == want.pop("timesteps")
    # Engine tensors are per row: (1, C, h, w), or (steps [+ 1], 1, C, h, w).
    got = result.tensors()
    for name, value in want.items():
        if name in ("trajectory", "noise_maps", "noisy_latents"):
            value = value[0].unsqueeze(1)
        assert got[name].shape == value.shape, name
        assert relative(got[name], value) < EXACT, name
    assert set(got) == {"latents", "timesteps", *want}
    # The latents moved: the equality above is not met by an engine that does nothing.
    assert relative(result.latents, ref64.encode_image(array)) > 0.1


def test_the_result_file_holds_each_methods_tensors(tiny, sample_arrays):
    """Shapes as the README documents them; the result's dtype; the metadata to sample back."""
    array = sample_arrays["chelsea"]
    c, h, w = 4, 8, 8
    cases = {
        "edict": ({"latents_pair": (1, c, h, w)}, {"edict_mixing": 0.5}),
        "ddpm": (
            {"noise_maps": (STEPS, 1, c, h, w), "noisy_latents": (STEPS + 1, 1, c, h, w)},
            {"eta": 0.8, "seed": 5},
        ),
        "negative_prompt": ({"null_embeddings": (STEPS, 77, 32)}, {"guidance_scale": 4.0}),
    }
    for method, (shapes, fields) in cases.items():
        p = params(method=method, result_dtype="float16", **fields)
        (result,) = invert(tiny, [InversionRequest(array, p)])
        tensors, metadata = load_result(result.to_safetensors())
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {
            "latents": (1, c, h, w),
            "timesteps": (STEPS,),
            **shapes,
        }
        assert all(v.dtype == torch.float16 for k, v in tensors.items() if k != "timesteps")
        assert metadata.method == method and metadata.inverse_scheduler == "ddim"
        assert metadata.guidance_scale == p.guidance_scale
    assert metadata.edict_mixing is None and metadata.eta is None  # negative_prompt, last
    (edict,) = invert(tiny, [InversionRequest(array, params(method="edict"))])
    assert edict.metadata.edict_mixing == 0.93  # the paper's, when absent
    (ddpm,) = invert(tiny, [InversionRequest(array, params(method="ddpm"))])
    assert (ddpm.metadata.eta, ddpm.metadata.seed) == (1.0, 0)
    (dpm,) = invert(tiny, [InversionRequest(array, params(inverse_scheduler="dpmsolver"))])
    assert dpm.metadata.inverse_scheduler == "dpmsolver"
    assert dpm.metadata.scheduler_config["algorithm_type"] == "dpmsolver++"


BATCHES: dict[str, list[dict[str, Any]]] = {
    # What a method takes per row differs between the two rows: mixing, seed, guidance.
    "edict": [
        {"edict_mixing": 0.93, "guidance_scale": 2.0},
        {"edict_mixing": 0.5, "guidance_scale": 3.0},
    ],
    "ddpm": [
        {"seed": 1, "eta": 0.6, "guidance_scale": 2.0},
        {"seed": 2, "eta": 0.6, "guidance_scale": 3.0},
    ],
    "dpmsolver": [{"guidance_scale": 2.0}, {"guidance_scale": 3.0}],
    "negative_prompt": [{"guidance_scale": 7.5}, {"guidance_scale": 2.0}],
}
METHOD_OF = {"dpmsolver": {"inverse_scheduler": "dpmsolver"}}


def batch(name: str, sample_arrays: dict[str, np.ndarray], **common: Any) -> list:
    method = METHOD_OF.get(name, {"method": name})
    images = [("chelsea", "a cat"), ("coffee", "a cup of coffee")]
    return [
        InversionRequest(sample_arrays[image], params(prompt=prompt, **method, **fields, **common))
        for (image, prompt), fields in zip(images, BATCHES[name], strict=True)
    ]


def unet_calls_per_step(p: InversionParams) -> int:
    return 2 if p.method == "edict" else 1


@pytest.mark.parametrize("name", list(BATCHES))
def test_a_batch_gives_each_row_its_solo_result(name, tiny64, sample_arrays, count_unet_calls):
    requests = batch(name, sample_arrays, return_trajectory=True, verify=True)
    calls = count_unet_calls(tiny64)
    seen: list[tuple[int, int]] = []
    together = invert(tiny64, requests, progress=lambda done, total: seen.append((done, total)))
    total = progress_total(requests[0].params)
    assert seen == [(done, total) for done in range(1, total + 1)]
    # One UNet call per step (two for EDICT) for both rows, in each phase.
    per_step = unet_calls_per_step(requests[0].params)
    assert len(calls) == 2 * STEPS * per_step
    assert sum(calls) == sum(estimates.unet_calls(r.params) for r in requests)
    for request, row in zip(requests, together, strict=True):
        (alone,) = invert(tiny64, [request])
        assert row is not None and alone is not None
        for tensor, value in row.tensors().items():
            assert float((value - alone.tensors()[tensor]).abs().max()) <= EXACT, tensor
        for figure in ("reconstruction_latent_error", "reconstruction_psnr"):
            assert getattr(row.metadata, figure) == pytest.approx(
                getattr(alone.metadata, figure), **FIGURE
            )
    first, second = together
    assert not torch.equal(first.latents, second.latents)


@pytest.mark.parametrize("phase", ["inversion", "verify"])
@pytest.mark.parametrize("name", ["edict", "ddpm", "dpmsolver"])
def test_a_cancel_drops_its_row_only(name, phase, tiny64, sample_arrays, count_unet_calls):
    requests = batch(name, sample_arrays, verify=True)
    requests.insert(1, batch(name, sample_arrays, verify=True)[1])  # the victim, in the middle
    calls = count_unet_calls(tiny64)
    per_phase = STEPS * unet_calls_per_step(requests[0].params)
    at = per_phase // 2 + (per_phase if phase == "verify" else 0)

    def check_canceled(active: list[int]) -> list[int]:
        return [1] if len(calls) >= at and 1 in active else []

    results = invert(tiny64, requests, check_canceled=check_canceled)
    assert results[1] is None
    # The row left the UNet batches right after the check (between two steps).
    assert calls == [3 * 2] * at + [2 * 2] * (2 * per_phase - at)
    calls.clear()
    for index in (0, 2):
        (alone,) = invert(tiny64, [requests[index]])
        assert float((results[index].latents - alone.latents).abs().max()) <= EXACT
        assert results[index].metadata.reconstruction_latent_error == pytest.approx(
            alone.metadata.reconstruction_latent_error, **FIGURE
        )


@pytest.mark.parametrize(
    ("guidance", "scheduler"),
    [(1.0, {}), (3.0, {}), (3.0, {"prediction_type": "v_prediction"})],  # SD 2.x's v too
)
@pytest.mark.parametrize("method", ["edict", "ddpm"])
def test_edict_and_ddpm_sample_back_exactly_in_float64(
    method, guidance, scheduler, tiny64, sample_arrays
):
    p = params(
        method=method,
        guidance_scale=guidance,
        scheduler=scheduler,
        verify=True,
        num_inference_steps=10,
    )
    (result,) = invert(tiny64, [InversionRequest(sample_arrays["astronaut"], p)])
    # float64 rounding there and back, amplified by EDICT's divisions by p and DDPM's by
    # sigma_t: 6.4e-12 at most (measured); 1e-9 leaves 150x and is 1e3 below float32's.
    assert result.metadata.reconstruction_latent_error < 1e-9
    assert result.reconstruction_png is not None
    # Plain DDIM on the same image and steps is far from exact on the random tiny model.
    (ddim,) = invert(tiny64, [InversionRequest(sample_arrays["astronaut"], params(verify=True))])
    assert ddim.metadata.reconstruction_latent_error > 1e-3


@torch.no_grad()
def guided_ddim_error(model, ref, result, uncond: list[torch.Tensor], guidance: float) -> float:
    """A diffusers user's guided DDIM loop from the result's latents: ||x_rec - x0|| / ||x0||."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(result.metadata.scheduler_config)
    scheduler.set_timesteps(result.metadata.num_inference_steps)
    cond = ref.encode_text(result.metadata.prompt)
    z = result.latents.to(model.dtype)
    for i, t in enumerate(scheduler.timesteps):
        z = scheduler.step(ref.eps(z, int(t), cond, uncond[i], guidance), t, z).prev_sample
    return relative(z, result.clean)


def test_negative_prompt_beats_the_empty_prompt_under_guidance(tiny, ref, sample_arrays):
    p = params(method="negative_prompt", guidance_scale=7.5, verify=True, num_inference_steps=10)
    (result,) = invert(tiny, [InversionRequest(sample_arrays["chelsea"], p)])
    nulls = [n[None] for n in result.null_embeddings.float()]
    with_nulls = guided_ddim_error(tiny, ref, result, nulls, 7.5)
    empty = guided_ddim_error(tiny, ref, result, [ref.encode_text("")] * 10, 7.5)
    # verify sampled back with the null embeddings: the figure it reports is this one. Both
    # loops in float32, measured 3e-9 apart relative; tests/rounding.py's figure_tolerance
    # (6.5e-3 relative for 10 steps at 7.5) is far below the 2x that tells the null
    # embeddings from the empty prompt.
    tolerance = figure_tolerance(10, 7.5, with_nulls)
    assert abs(result.metadata.reconstruction_latent_error - with_nulls) <= tolerance
    assert with_nulls * 2 < empty


@torch.no_grad()
def test_dpmsolver_verify_samples_back_with_the_forward_solver(tiny, ref, sample_arrays):
    from diffusers import DPMSolverMultistepScheduler

    p = params(inverse_scheduler="dpmsolver", verify=True, num_inference_steps=10)
    (result,) = invert(tiny, [InversionRequest(sample_arrays["chelsea"], p)])
    scheduler = DPMSolverMultistepScheduler.from_config(result.metadata.scheduler_config)
    scheduler.set_timesteps(10)
    cond = ref.encode_text(PROMPT)
    z = result.latents
    for t in scheduler.timesteps:
        z = scheduler.step(tiny.unet(z, t, encoder_hidden_states=cond).sample, t, z).prev_sample
    error = relative(z, result.clean)
    # Both loops in float32, measured 1e-8 apart relative: tests/rounding.py's
    # figure_tolerance, 1.2e-3 relative for 10 unguided steps.
    tolerance = figure_tolerance(10, 1.0, error)
    assert abs(result.metadata.reconstruction_latent_error - error) <= tolerance


def test_cli_local_runs_a_method(cli, cli_env, tmp_path):
    import json
    import subprocess

    from tests.engine.conftest import REPO

    out = tmp_path / "cat.safetensors"
    args = ["samples/chelsea.png", "--prompt", "a cat", "--steps", "4", "--verify"]
    args += ["--method", "ddpm", "--eta", "0.5", "--seed", "3", "--out", str(out)]
    proc = subprocess.run(
        [*cli, "local", *args],
        env=cli_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=EVENT_GUARD_S,
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(text) for text in proc.stdout.splitlines() if text.strip()]
    assert line["method"] == "ddpm"
    tensors, metadata = load_result(out.read_bytes())
    assert tuple(tensors["noise_maps"].shape) == (4, 1, 4, 8, 8)
    assert (metadata.eta, metadata.seed) == (0.5, 3)
    # float32 on the CPU: exact to float32 rounding, there and back over 4 steps, amplified
    # by the division by sigma_t: measured 1.2e-5 (7e-6 at 3 steps); plain DDIM is off by
    # 0.1 and more. 1e-3 leaves 80x.
    assert metadata.reconstruction_latent_error < 1e-3
