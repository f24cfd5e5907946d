"""A batch gives each request exactly its solo result, with one UNet call per step."""

from __future__ import annotations

import pytest

from ddim_inversion.params import InversionParams
from worker.engine.dispatch import invert
from worker.engine.types import InversionRequest

STEPS = 10


def _requests(sample_arrays, sample_bytes, **common):
    return [
        InversionRequest(sample_arrays["chelsea"], InversionParams(prompt="a cat", **common)),
        # Raw file bytes decoded as a PIL image: normalised inside the engine.
        InversionRequest(
            sample_arrays["astronaut"], InversionParams(prompt="an astronaut in space", **common)
        ),
        InversionRequest(
            sample_arrays["coffee"],
            InversionParams(prompt="coffee", encode_mode="sample", seed=7, **common),
        ),
    ]


# float64 shows that batching is exact (no row leaks into another); float32 differs only by
# the rounding of batched kernels, amplified by the guidance scale.
@pytest.mark.parametrize(
    ("dtype", "guidance", "tolerance"),
    [
        ("float32", 1.0, 1e-5),
        ("float32", 2.5, 3e-5),
        ("float64", 1.0, 1e-10),
        ("float64", 2.5, 1e-10),
    ],
)
def test_batch_equals_solo(
    request, sample_arrays, sample_bytes, count_unet_calls, diff, dtype, guidance, tolerance
):
    model = request.getfixturevalue("tiny" if dtype == "float32" else "tiny64")
    unet_calls = count_unet_calls(model)
    common = {"num_inference_steps": STEPS, "guidance_scale": guidance, "return_trajectory": True}
    requests = _requests(sample_arrays, sample_bytes, **common)
    batched = invert(model, requests)
    rows = 3 * (2 if guidance != 1.0 else 1)
    assert unet_calls == [rows] * STEPS, "one UNet call per step for the whole batch"
    unet_calls.clear()
    for request_, together in zip(requests, batched, strict=True):
        (alone,) = invert(model, [request_])
        assert together.metadata == alone.metadata
        assert diff(together.latents, alone.latents) <= tolerance
        assert diff(together.trajectory, alone.trajectory) <= tolerance
    assert len(unet_calls) == 3 * STEPS


def test_sample_encoding_is_seeded(tiny, sample_arrays, diff):
    array = sample_arrays["coffee"]

    def run(**kw):
        params = InversionParams(prompt="coffee", num_inference_steps=5, **kw)
        return invert(tiny, [InversionRequest(array, params)])[0].latents

    first, again = run(encode_mode="sample", seed=7), run(encode_mode="sample", seed=7)
    assert diff(first, again) == 0.0
    assert diff(first, run(encode_mode="sample", seed=8)) > 0
    assert diff(first, run()) > 0


def test_incompatible_requests_are_grouped(tiny, sample_arrays, unet_calls, diff):
    array = sample_arrays["chelsea"]
    params = [
        InversionParams(prompt="a", num_inference_steps=10),
        InversionParams(prompt="b", num_inference_steps=20),
        InversionParams(prompt="c", num_inference_steps=10, resolution=128),
        InversionParams(prompt="d", num_inference_steps=10),
        InversionParams(prompt="e", num_inference_steps=10, guidance_scale=2.0),
    ]
    requests = [InversionRequest(array, p) for p in params]
    results = invert(tiny, requests)
    # Groups {a, d}, {b}, {c}, {e}: 10 + 20 + 10 + 10 UNet calls.
    assert sorted(unet_calls) == sorted([2] * 10 + [1] * 20 + [1] * 10 + [2] * 10)
    assert [r.metadata.prompt for r in results] == ["a", "b", "c", "d", "e"]
    assert [r.metadata.num_inference_steps for r in results] == [10, 20, 10, 10, 10]
    assert [r.latents.shape[-1] for r in results] == [8, 8, 16, 8, 8]
    for request, together in zip(requests, results, strict=True):
        (alone,) = invert(tiny, [request])
        assert diff(together.latents, alone.latents) <= 1e-5
