"""The engine's trajectory equals DDIM inversion written from the equations, to float32's
rounding (tests/rounding.py)."""

from __future__ import annotations

import pytest

from ddim_inversion.params import InversionParams
from tests.rounding import drift, size
from worker.engine.dispatch import invert
from worker.engine.types import InversionRequest


@pytest.mark.parametrize(
    ("image", "prompt", "steps", "guidance", "negative"),
    [
        ("chelsea", "a photo of a cat", 10, 1.0, ""),
        ("astronaut", "an astronaut", 20, 1.0, ""),
        ("coffee", "a cup of coffee", 10, 3.0, "blurry, low quality"),
        ("chelsea", "a cat", 20, 3.0, ""),
    ],
)
def test_trajectory_matches_equations(
    tiny, ref, sample_arrays, diff, image, prompt, steps, guidance, negative
):
    array = sample_arrays[image]
    params = InversionParams(
        prompt=prompt,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        return_trajectory=True,
    )
    (result,) = invert(tiny, [InversionRequest(array, params)])
    timesteps, expected = ref.invert(array, prompt, steps, guidance, negative)

    assert result.timesteps.tolist() == timesteps
    assert result.metadata.timesteps == timesteps
    assert result.trajectory is not None
    assert result.trajectory.shape == (steps + 1, 1, 4, 8, 8)
    assert result.metadata.trajectory_shape == [steps + 1, 1, 4, 8, 8]
    # Both loops in float32, their kernels summing in other orders (the reference's guided
    # UNet call is one batch of two, as the engine's): tests/rounding.py's drift, 1.2e-4 to
    # 5.7e-4 here; a wrong timestep or alpha-bar moves z by more than 0.1 (asserted below).
    tolerance = drift(steps, guidance, size(expected))
    for i in range(steps + 1):
        assert diff(result.trajectory[i], expected[i]) <= tolerance, f"step {i}"
    assert diff(result.latents, expected[-1]) <= tolerance
    assert result.latents.shape == (1, 4, 8, 8)
    # The loop did something: the inverted latent is far from the clean one.
    assert diff(expected[-1], expected[0]) > 0.1


def test_guidance_changes_the_result(tiny, sample_arrays, diff):
    array = sample_arrays["chelsea"]
    plain, guided = (
        invert(tiny, [InversionRequest(array, InversionParams(prompt="a cat", **kw))])[0]
        for kw in ({"num_inference_steps": 10}, {"num_inference_steps": 10, "guidance_scale": 3})
    )
    assert diff(plain.latents, guided.latents) > 1e-3
