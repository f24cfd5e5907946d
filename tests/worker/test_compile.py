"""Batches padded to their bucket give the unpadded results (float64: exact to rounding)."""

from __future__ import annotations

import copy

import pytest
import torch

from ddim_inversion import imaging
from ddim_inversion.params import InversionParams
from tests.jobs_helper import SAMPLES
from worker.compile import BucketedUNet, buckets_up_to, compile_unet
from worker.engine.dispatch import invert
from worker.engine.types import InversionRequest
from worker.models import load_model


@pytest.fixture(scope="module")
def model64(model_cache_dir):
    return load_model("tiny", device="cpu", dtype="float64", cache_dir=model_cache_dir)


def test_buckets_are_powers_of_two_covering_the_rows():
    assert buckets_up_to(1) == [1]
    assert buckets_up_to(6) == [1, 2, 4, 8]
    assert buckets_up_to(16) == [1, 2, 4, 8, 16]


def test_padded_batches_equal_unpadded(model64):
    calls: list[int] = []

    def recording_compiler(unet):
        def run(sample, timestep, encoder_hidden_states):
            calls.append(sample.shape[0])
            assert isinstance(timestep, torch.Tensor)  # a device tensor, made once per t
            return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states)

        return run

    padded = copy.copy(model64)
    padded.unet = BucketedUNet(model64.unet, buckets_up_to(8), recording_compiler)
    requests = [
        InversionRequest(
            imaging.open_image((SAMPLES / name).read_bytes()),
            InversionParams(prompt=f"p{i}", num_inference_steps=4, guidance_scale=2.0),
        )
        for i, name in enumerate(["chelsea.png", "coffee.png", "astronaut.png"])
    ]
    reference = invert(model64, requests)
    results = invert(padded, requests)
    # 3 requests under guidance are 6 rows, padded to the bucket of 8, once per step.
    assert calls == [8] * 4
    # float64: padding rows change only the kernels' summation order (tests/rounding.py's
    # float64 drift, 1.5e-13 for 4 steps at guidance 2); 1e-10 leaves 600x and is 1e3 below
    # float32's rounding, so a padded row leaking into a real one would fail it.
    for got, want in zip(results, reference, strict=True):
        assert (got.latents - want.latents).abs().max() <= 1e-10


def test_compile_modes_are_checked(model64):
    with pytest.raises(ValueError, match="none, torch, torch-cudagraphs"):
        compile_unet(copy.copy(model64), "tensorrt", max_rows=4)
