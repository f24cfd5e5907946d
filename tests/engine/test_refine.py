"""Exact inversion by fixed-point refinement: DDIM sampling undoes the refined inversion.

Each refined step is checked the strongest way there is: diffusers' own DDIMScheduler,
configured from the result's scheduler config, samples the returned latents back to the
clean latent, with the same prompt embedding and no guidance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddim_inversion import imaging
from ddim_inversion.contract import ResultMetadata
from ddim_inversion.params import InversionParams
from tests.rounding import drift, size
from worker.engine.dispatch import invert
from worker.engine.encoding import encode_prompts
from worker.engine.types import InversionRequest, InversionResult
from worker.models import LoadedModel

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
PROMPT = "a cat on a sofa"


@pytest.fixture(scope="module")
def tiny32(tiny: LoadedModel) -> LoadedModel:
    return tiny


@pytest.fixture(scope="module")
def chelsea() -> object:
    return imaging.open_image((SAMPLES / "chelsea.png").read_bytes())


def run(model: LoadedModel, image: object, **params: object) -> InversionResult:
    full = {"prompt": PROMPT, "num_inference_steps": 50, "return_trajectory": True} | params
    (result,) = invert(model, [InversionRequest(image, InversionParams(**full))])
    assert result is not None
    return result


@torch.inference_mode()
def reconstruction_error(model: LoadedModel, result: InversionResult) -> float:
    """||x_rec - x0|| / ||x0||, x_rec sampled back from the latents by diffusers' DDIMScheduler."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(result.metadata.scheduler_config)
    scheduler.set_timesteps(result.metadata.num_inference_steps)
    text = encode_prompts(model, [result.metadata.prompt])[0].embeds
    z = result.latents.to(model.dtype)
    for t in scheduler.timesteps:
        eps = model.unet(z, t, encoder_hidden_states=text).sample
        z = scheduler.step(eps, t, z).prev_sample
    clean = result.trajectory[0].to(model.dtype)
    return float((z - clean).norm() / clean.norm())


def test_refinement_makes_float32_inversion_500x_more_exact(tiny32, chelsea):
    plain = run(tiny32, chelsea)
    refined = run(tiny32, chelsea, refine_iterations=20, refine_tolerance=1e-7)
    plain_error = reconstruction_error(tiny32, plain)
    refined_error = reconstruction_error(tiny32, refined)
    assert torch.equal(plain.trajectory[0], refined.trajectory[0])
    assert plain_error > 0.1, plain_error  # plain DDIM inversion of a random model is far off
    # The float32 story: refined 2.1e-3 (float32 rounding of 50 steps there and back,
    # amplified by the random model's sampling, which takes plain's defects to 16): 7600x
    # better than plain, measured; 500x leaves 15x.
    assert refined_error * 500 <= plain_error, (plain_error, refined_error)

    assert plain.metadata.refine_iterations is None
    assert plain.metadata.refine_residuals is None
    counts = refined.metadata.refine_iterations
    residuals = refined.metadata.refine_residuals
    assert counts is not None and residuals is not None
    assert len(counts) == len(residuals) == 50
    assert all(1 <= n <= 20 for n in counts)
    assert all(r >= 0 for r in residuals)
    # A step stops early only once converged.
    assert all(n == 20 or r < 1e-7 for n, r in zip(counts, residuals, strict=True))
    # The metadata survives the safetensors header.
    header = ResultMetadata.from_header(refined.metadata.to_header())
    assert header.refine_iterations == counts
    assert header.refine_residuals == residuals
    # Headers written before refinement existed still parse.
    old = {k: v for k, v in plain.metadata.to_header().items() if not k.startswith("refine_")}
    assert ResultMetadata.from_header(old).refine_iterations is None


def test_refinement_in_float64_is_exact(tiny64, chelsea):
    refined = run(tiny64, chelsea, refine_iterations=50, refine_tolerance=1e-10)
    assert refined.latents.dtype == torch.float64
    error = reconstruction_error(tiny64, refined)
    residual = max(refined.metadata.refine_residuals)
    # 49 of the 50 steps reach the tolerance; the second, whose iteration contracts slowest,
    # stops at its 50th iteration at 9.9e-10 (measured): 1e-8 leaves 10x.
    assert residual < 1e-8, residual
    # Exact up to that residual, not to float32's 2e-3: the slow contraction (the defect is
    # the residual / (1 - rate)) and the sampling's growth make it 250 residuals (2.5e-7,
    # measured; float64 rounding adds 1e-13). 1e4 residuals leave 40x.
    assert error < 1e4 * residual, (error, residual)


def test_refinement_batched_equals_solo(tiny32, chelsea, count_unet_calls):
    coffee = imaging.open_image((SAMPLES / "coffee.png").read_bytes())
    common = {"num_inference_steps": 10, "refine_iterations": 8, "refine_tolerance": 1e-6}
    a = InversionParams(prompt=PROMPT, **common)
    b = InversionParams(prompt="a cup of coffee", **common)
    calls = count_unet_calls(tiny32)
    batched = invert(tiny32, [InversionRequest(chelsea, a), InversionRequest(coffee, b)])
    # Each row pays for its own iterations only: a converged row leaves the UNet batch.
    run_rows = sum(sum(r.metadata.refine_iterations) for r in batched if r is not None)
    assert sum(calls) == 2 * 10 + run_rows, (calls, run_rows)
    calls.clear()
    solo = [
        invert(tiny32, [InversionRequest(chelsea, a)])[0],
        invert(tiny32, [InversionRequest(coffee, b)])[0],
    ]
    for together, alone in zip(batched, solo, strict=True):
        assert together is not None and alone is not None
        # float32 rounding of the batched kernels over 10 steps (tests/rounding.py); the
        # fixed-point iteration contracts, so its iterations add nothing to it.
        tolerance = drift(10, 1.0, size(alone.latents))
        assert float((together.latents - alone.latents).abs().max()) <= tolerance
        assert together.metadata.refine_iterations is not None
        assert len(together.metadata.refine_iterations) == 10
        assert len(together.metadata.refine_residuals) == 10


def test_params_validate():
    for bad in ({"refine_iterations": -1}, {"refine_iterations": 51}, {"refine_tolerance": 0}):
        with pytest.raises(ValueError):
            InversionParams(prompt="x", **bad)
