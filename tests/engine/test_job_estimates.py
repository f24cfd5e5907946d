"""The contract's submit-time estimates against what the engine really does and stores.

stored_bytes must bound the bytes a worker keeps for a job (its input, the
safetensors result, the reconstruction PNG, the metadata copies) without being far above;
unet_calls must count the UNet image-calls the engine makes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ddim_inversion import estimates, imaging
from ddim_inversion.estimates import (
    NULL_TEXT_CALLS_PER_INNER_STEP,
    job_cost,
    stored_bytes,
)
from ddim_inversion.params import InversionParams
from worker.engine.dispatch import invert
from worker.engine.types import InversionRequest

SLACK_BYTES = 24 * 1024
"""How far above the actual bytes the bound may be for a small job: the fixed allowance
for the job hash and metadata (RECORD_BYTES) and per-step list allowances."""

CASES = {
    "plain": {},
    "trajectory": {"return_trajectory": True, "num_inference_steps": 40},
    "float16 trajectory": {"return_trajectory": True, "result_dtype": "float16"},
    "verify": {"verify": True, "resolution": (128, 64)},
    "null_text": {
        "method": "null_text",
        "guidance_scale": 7.5,
        "null_text_inner_steps": 2,
        "verify": True,
        "return_trajectory": True,
    },
    "long prompt": {"prompt": "🐱 a cat\n" * 40, "negative_prompt": "blurry \u0000" * 20},
    "negative_prompt": {"method": "negative_prompt", "guidance_scale": 7.5, "verify": True},
    "edict": {"method": "edict", "return_trajectory": True, "verify": True},
    "ddpm": {"method": "ddpm", "return_trajectory": True, "verify": True},
    "ddpm float16": {"method": "ddpm", "result_dtype": "float16"},
    "dpmsolver": {"inverse_scheduler": "dpmsolver", "return_trajectory": True},
    "sdxl conditioning": {
        "prompt_2": "film grain " * 30,
        "negative_prompt_2": "noisy",
        "original_size": (4096, 4096),
        "crops_coords_top_left": (0, 0),
        "target_size": (1024, 1024),
    },
}


def actual_bytes(image: np.ndarray, result) -> int:
    """What a worker keeps for a succeeded job: the input until it ends, the safetensors
    result and reconstruction, and the metadata in the job's meta and RQ's result entry."""
    metadata = json.dumps(result.metadata.model_dump(mode="json"))
    png = len(result.reconstruction_png or b"")
    return image.nbytes + len(result.to_safetensors()) + png + 2 * len(metadata)


@pytest.mark.parametrize(
    ("case", "model_name"),
    [(case, "tiny") for case in CASES if case != "sdxl conditioning"]
    + [(case, "tiny64") for case in ("trajectory", "null_text", "edict", "ddpm")]
    + [(case, "tiny_xl") for case in ("null_text", "negative_prompt", "sdxl conditioning")],
)
def test_stored_bytes_bound_the_real_result_closely(case, model_name, request, sample_bytes):
    model = request.getfixturevalue(model_name)
    fields = {"prompt": "a photo", "num_inference_steps": 8} | CASES[case]
    params = InversionParams(**fields)
    size = params.resolution or model.native_resolution
    image = imaging.normalize(sample_bytes["astronaut"], size)
    (result,) = invert(model, [InversionRequest(image, params)])

    estimate = stored_bytes(params, model.info(), (size[0], size[1]), size)
    actual = actual_bytes(image, result)
    assert estimate.total >= actual
    assert estimate.total <= actual * 1.1 + SLACK_BYTES
    # Each tensor is bounded on its own too: the largest part names the right field.
    tensors = result.tensors()
    assert estimate.latents == tensors["latents"].nbytes + tensors["timesteps"].nbytes
    if params.return_trajectory:
        assert estimate.trajectory == tensors["trajectory"].nbytes
    if params.method in ("null_text", "negative_prompt"):
        pooled = tensors.get("null_pooled_embeddings")  # SDXL's
        pooled_bytes = pooled.nbytes if pooled is not None else 0
        assert estimate.null_embeddings == tensors["null_embeddings"].nbytes + pooled_bytes
    added = ("latents_pair", "noise_maps", "noisy_latents")
    assert estimate.method_latents == sum(tensors[n].nbytes for n in added if n in tensors)
    if params.verify:
        assert len(result.reconstruction_png) <= estimate.reconstruction


def test_without_a_live_worker_the_widest_model_is_assumed(tiny, sample_arrays):
    params = InversionParams(
        prompt="a photo",
        num_inference_steps=8,
        method="null_text",
        guidance_scale=7.5,
        null_text_inner_steps=1,
    )
    known = stored_bytes(params, tiny.info(), (64, 64), (64, 64))
    unknown = stored_bytes(params, None, (64, 64), (64, 64))
    # float64 elements and SD 2.x's 1024-wide embeddings instead of the tiny model's 32.
    assert unknown.null_embeddings == known.null_embeddings * 2 * 1024 // 32


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"guidance_scale": 4.0},
        {"refine_iterations": 2, "refine_tolerance": 1e-300},
        {"refine_iterations": 2, "refine_tolerance": 1e-300, "guidance_scale": 2.0, "verify": True},
        {"verify": True},
        {
            "method": "null_text",
            "guidance_scale": 7.5,
            "null_text_inner_steps": 3,
            "null_text_early_stop": 0.0,
            "verify": True,
        },
        {"method": "negative_prompt", "guidance_scale": 7.5, "verify": True},
        {"method": "negative_prompt", "refine_iterations": 2, "refine_tolerance": 1e-300},
        {"method": "edict", "verify": True},
        {"method": "edict", "guidance_scale": 3.0, "verify": True},
        {"method": "ddpm", "guidance_scale": 3.0, "verify": True},
        {"inverse_scheduler": "dpmsolver", "guidance_scale": 3.0, "verify": True},
        {"method": "negative_prompt", "inverse_scheduler": "dpmsolver", "verify": True},
    ],
)
def test_unet_calls_count_the_engines_calls(fields, tiny, unet_calls, sample_arrays):
    params = InversionParams(prompt="a photo", num_inference_steps=5, **fields)
    invert(tiny, [InversionRequest(sample_arrays["astronaut"][:64, :64], params)])
    forward_images = sum(unet_calls)
    # The hook sees forwards only: a null-text inner step's backward is counted at two.
    backward = 0
    if params.method == "null_text":
        per_step = NULL_TEXT_CALLS_PER_INNER_STEP - 1
        backward = per_step * params.null_text_inner_steps * params.num_inference_steps
    assert estimates.unet_calls(params) == forward_images + backward


def test_job_cost_is_calls_times_latent_pixels(tiny):
    params = InversionParams(prompt="x", num_inference_steps=50, guidance_scale=7.5, verify=True)
    # 50 guided steps and 50 guided sampling steps at 64x64 latent pixels.
    assert job_cost(params, None, (512, 512)) == (100 + 100) * 64 * 64
    assert job_cost(params, tiny.info(), (512, 768)) == 200 * 64 * 96
