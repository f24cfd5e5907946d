"""Null-text inversion: guided DDIM sampling with the returned null embeddings follows the pivot.

The check is independent of the engine's own sampling: diffusers' DDIMScheduler, configured
from the result's scheduler config, samples the returned latents back under classifier-free
guidance, with the null embedding of each step as the unconditional embedding, and lands on
the clean latent far closer than with the negative prompt's embedding. The tiny model is
random, so the optimisation gets a large learning rate and more inner steps than a real
model needs.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ddim_inversion.contract import ResultMetadata
from ddim_inversion.params import InversionParams
from tests.conftest import EVENT_GUARD_S
from tests.rounding import figure_tolerance
from worker.engine.dispatch import invert
from worker.engine.encoding import encode_prompts
from worker.engine.types import InversionRequest, InversionResult, load_result, progress_total
from worker.models import LoadedModel

PROMPT = "a cat on a sofa"
STEPS = 10
GUIDANCE = 7.5
FAST = {
    "prompt": PROMPT,
    "num_inference_steps": STEPS,
    "method": "null_text",
    "guidance_scale": GUIDANCE,
    "null_text_inner_steps": 30,
    "null_text_learning_rate": 0.5,
    "null_text_early_stop": 0.0,
}


@torch.inference_mode()
def guided_reconstruction_error(
    model: LoadedModel, result: InversionResult, nulls: torch.Tensor | None, clean: torch.Tensor
) -> float:
    """||x_rec - x0|| / ||x0||, sampled back with guidance; `nulls` None: the negative prompt."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(result.metadata.scheduler_config)
    scheduler.set_timesteps(result.metadata.num_inference_steps)
    cond = encode_prompts(model, [result.metadata.prompt])[0].embeds
    negative = encode_prompts(model, [result.metadata.negative_prompt])[0].embeds
    z = result.latents.to(model.dtype)
    for i, t in enumerate(scheduler.timesteps):
        uncond = nulls[i : i + 1].to(model.dtype) if nulls is not None else negative
        eps_u, eps_c = model.unet(
            torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, cond])
        ).sample.chunk(2)
        z = scheduler.step(eps_u + GUIDANCE * (eps_c - eps_u), t, z).prev_sample
    return float((z - clean).norm() / clean.norm())


@pytest.fixture(scope="module")
def chelsea(sample_arrays: dict[str, np.ndarray]) -> np.ndarray:
    return sample_arrays["chelsea"]


@pytest.fixture(scope="module")
def null_text_result(tiny: LoadedModel, chelsea: np.ndarray) -> tuple[InversionResult, list]:
    seen: list[tuple[int, int]] = []
    params = InversionParams(**FAST, return_trajectory=True, verify=True)
    (result,) = invert(
        tiny, [InversionRequest(chelsea, params)], progress=lambda a, b: seen.append((a, b))
    )
    assert result is not None
    return result, seen


def test_null_embeddings_reconstruct_10x_better_than_the_negative_prompt(tiny, null_text_result):
    result, _ = null_text_result
    assert result.trajectory is not None
    clean = result.trajectory[0]
    with_nulls = guided_reconstruction_error(tiny, result, result.null_embeddings, clean)
    plain = guided_reconstruction_error(tiny, result, None, clean)
    assert with_nulls * 10 <= plain, (with_nulls, plain)
    # verify sampled back the same way, with the same embeddings.
    measured = result.metadata.reconstruction_latent_error
    # The same float32 loop twice: tests/rounding.py's figure_tolerance (6.5e-3 for 10 steps
    # at 7.5), against the 10x between the null embeddings' figure and the negative's.
    tolerance = figure_tolerance(STEPS, GUIDANCE, with_nulls)
    assert measured is not None and abs(measured - with_nulls) <= tolerance


def test_result_carries_null_embeddings_and_losses(tiny, null_text_result):
    result, seen = null_text_result
    hidden = tiny.text_encoder.config.hidden_size
    assert result.null_embeddings is not None
    assert result.null_embeddings.shape == (STEPS, tiny.tokenizer_max_length, hidden)
    metadata = result.metadata
    assert metadata.method == "null_text"
    assert metadata.guidance_scale == GUIDANCE
    assert metadata.null_text_losses is not None and len(metadata.null_text_losses) == STEPS
    assert all(loss >= 0 for loss in metadata.null_text_losses)
    # The pivot's trajectory: index 0 is the clean latent, the last the returned latents.
    assert result.trajectory is not None and result.trajectory.shape[0] == STEPS + 1
    assert torch.equal(result.trajectory[-1], result.latents)

    tensors, header = load_result(result.to_safetensors())
    assert torch.equal(tensors["null_embeddings"], result.null_embeddings)
    assert header.method == "null_text"
    assert header.null_text_losses == metadata.null_text_losses
    assert header.reconstruction_latent_error == metadata.reconstruction_latent_error
    assert header.reconstruction_psnr == metadata.reconstruction_psnr

    # verify: a PNG at the job's resolution.
    assert result.reconstruction_png is not None
    image = Image.open(io.BytesIO(result.reconstruction_png))
    assert image.size == (metadata.width, metadata.height) and image.mode == "RGB"
    assert metadata.reconstruction_psnr is not None and metadata.reconstruction_psnr > 0

    # Progress counts the inner iterations and the verification and ends at its total.
    total = progress_total(InversionParams(**FAST, verify=True))
    assert total == STEPS + STEPS * 30 + STEPS
    assert all(t == total for _, t in seen)
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == total


def test_unet_calls_and_plain_results_unchanged(tiny, chelsea, count_unet_calls):
    calls = count_unet_calls(tiny)
    params = InversionParams(**(FAST | {"null_text_inner_steps": 3}))
    (result,) = invert(tiny, [InversionRequest(chelsea, params)])
    assert result is not None
    # Pivot: 1 per step; then per step 1 conditional + inner + 1 final unconditional.
    assert len(calls) == STEPS + STEPS * (1 + 3 + 1)
    assert result.metadata.reconstruction_psnr is None
    assert result.reconstruction_png is None
    plain = InversionParams(prompt=PROMPT, num_inference_steps=STEPS)
    (ddim,) = invert(tiny, [InversionRequest(chelsea, plain)])
    assert ddim is not None
    assert ddim.null_embeddings is None and ddim.metadata.method == "ddim"
    assert "null_embeddings" not in ddim.tensors()
    # The pivot is the plain inversion at guidance 1.
    assert torch.equal(result.latents, ddim.latents)


def test_early_stop_skips_inner_iterations(tiny, chelsea, count_unet_calls):
    calls = count_unet_calls(tiny)
    params = InversionParams(**(FAST | {"null_text_inner_steps": 5, "null_text_early_stop": 1e6}))
    (result,) = invert(tiny, [InversionRequest(chelsea, params)])
    assert result is not None
    # Every first loss is below 1e6: one evaluation, no update, then the step.
    assert len(calls) == STEPS + STEPS * 3


@pytest.mark.parametrize("cancel_at", [3, 25])  # in the pivot, among the inner iterations
def test_cancel_mid_way_gives_none(tiny, chelsea, cancel_at):
    checks: list[int] = []

    def check_canceled(active: list[int]) -> list[int]:
        checks.append(1)
        return list(active) if len(checks) >= cancel_at else []

    params = InversionParams(**(FAST | {"null_text_inner_steps": 5}))
    (result,) = invert(tiny, [InversionRequest(chelsea, params)], check_canceled=check_canceled)
    assert result is None
    assert len(checks) == cancel_at


def test_batched_rows_keep_their_own_results(tiny64, sample_arrays):
    # float64: Adam turns float32 rounding noise in tiny gradients into visible updates.
    common = FAST | {"null_text_inner_steps": 4}
    a = InversionParams(**common)
    b = InversionParams(**(common | {"prompt": "a cup of coffee", "guidance_scale": 3.0}))
    requests = [InversionRequest(sample_arrays["chelsea"], a)]
    requests.append(InversionRequest(sample_arrays["coffee"], b))
    canceled: list[Any] = []
    batched = invert(tiny64, requests, check_canceled=lambda active: canceled)
    solo = [invert(tiny64, [request])[0] for request in requests]
    for together, alone in zip(batched, solo, strict=True):
        assert together is not None and alone is not None
        assert together.null_embeddings is not None and alone.null_embeddings is not None
        assert together.null_embeddings.dtype == torch.float64
        # Adam divides by sqrt(v) + 1e-8, so a gradient's float64 rounding (the batch's other
        # summation order) moves a near-zero gradient's update by lr * dg / 1e-8: measured
        # 1.5e-10 on embeddings of size 14; 1e-6 leaves 6000x.
        assert float((together.null_embeddings - alone.null_embeddings).abs().max()) <= 1e-6
        assert together.metadata.guidance_scale == alone.metadata.guidance_scale


def test_params_validate():
    with pytest.raises(ValueError, match="guidance_scale"):
        InversionParams(prompt="x", method="null_text")
    for bad in (
        {"null_text_inner_steps": 0},
        {"null_text_inner_steps": 101},
        {"null_text_learning_rate": 0},
        {"null_text_learning_rate": 1.5},
        {"null_text_early_stop": -1},
        {"null_text_early_stop": float("inf")},
        {"method": "other"},
    ):
        with pytest.raises(ValueError):
            InversionParams(**({"prompt": "x", "method": "null_text", "guidance_scale": 7.5} | bad))
    params = InversionParams(prompt="x", method="null_text", guidance_scale=7.5)
    assert params.null_text_inner_steps == 10 and params.null_text_learning_rate == 1e-2
    assert ResultMetadata.model_fields["method"].default == "ddim"


def test_cli_local_null_text_with_verify(cli, cli_env, tmp_path):
    import json
    import subprocess

    from tests.engine.conftest import REPO

    out = tmp_path / "cat.safetensors"
    args = ["samples/chelsea.png", "--prompt", "a cat", "--steps", "4", "--verify"]
    args += ["--method", "null_text", "--null-text-inner-steps", "2"]
    args += ["--null-text-learning-rate", "0.1", "--null-text-early-stop", "0", "--out", str(out)]
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
    assert line["method"] == "null_text"
    assert line["reconstruction_latent_error"] > 0 and line["reconstruction_psnr"] > 0
    png = tmp_path / "cat.reconstruction.png"
    assert line["reconstruction"] == str(png)
    assert Image.open(png).size == (64, 64)
    tensors, metadata = load_result(out.read_bytes())
    assert tensors["null_embeddings"].shape[0] == 4
    assert metadata.guidance_scale == 7.5  # the CLI's default for null_text
    assert metadata.null_text_losses is not None and len(metadata.null_text_losses) == 4
