"""float64 models run on the CPU and give float64 results, matching the equations closely."""

from __future__ import annotations

import torch

from ddim_inversion.params import InversionParams
from tests.rounding import drift, size
from worker.engine.dispatch import invert
from worker.engine.types import InversionRequest


def test_float64_model_and_results(tiny64, ref64, tiny, sample_arrays, diff):
    assert tiny64.dtype == torch.float64
    assert next(tiny64.unet.parameters()).dtype == torch.float64
    array = sample_arrays["astronaut"]
    params = InversionParams(prompt="an astronaut", num_inference_steps=10, return_trajectory=True)
    (result,) = invert(tiny64, [InversionRequest(array, params)])
    assert result.latents.dtype == torch.float64
    assert result.trajectory.dtype == torch.float64
    assert result.metadata.dtype == "float64"

    _, expected = ref64.invert(array, "an astronaut", 10)
    assert expected.dtype == torch.float64
    # The same float64 operations: tests/rounding.py's float64 drift is 2.4e-13 for 10 steps
    # (measured 0); 1e-10 leaves 400x and is 1e4 below float32's rounding, so a step
    # computed in float32 anywhere fails it.
    assert diff(result.trajectory, expected) <= 1e-10

    (single,) = invert(tiny, [InversionRequest(array, params)])
    assert single.latents.dtype == torch.float32
    # float32 against float64: float32's rounding, drift 1.2e-4 for 10 steps (measured 2.4e-6).
    assert diff(single.latents, result.latents) <= drift(10, 1.0, size(result.latents))

    half = params.model_copy(update={"result_dtype": "float16"})
    (result16,) = invert(tiny64, [InversionRequest(array, half)])
    assert result16.latents.dtype == torch.float16
