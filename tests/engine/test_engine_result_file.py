"""The result file: safetensors names, header metadata, .npy, float16, token counts."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ddim_inversion.contract import ENGINE_VERSION
from ddim_inversion.params import InversionParams
from worker.engine.dispatch import invert
from worker.engine.types import InversionRequest, load_result


@pytest.fixture(scope="module")
def result(tiny, sample_arrays):
    params = InversionParams(
        prompt="a photo of a cat", num_inference_steps=10, return_trajectory=True
    )
    return invert(tiny, [InversionRequest(sample_arrays["chelsea"], params)])[0]


def test_round_trip_load_result(result):
    tensors, metadata = load_result(result.to_safetensors())
    assert set(tensors) == {"latents", "trajectory", "timesteps"}
    assert torch.equal(tensors["latents"], result.latents)
    assert torch.equal(tensors["trajectory"], result.trajectory)
    assert torch.equal(tensors["timesteps"], result.timesteps)
    assert tensors["timesteps"].dtype == torch.int64
    assert metadata == result.metadata


def test_safe_open_names_and_header(result, tmp_path, tiny):
    path = tmp_path / "r.safetensors"
    path.write_bytes(result.to_safetensors())
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"latents", "trajectory", "timesteps"}
        assert f.get_tensor("latents").shape == (1, 4, 8, 8)
        assert f.get_tensor("trajectory").shape == (11, 1, 4, 8, 8)
        assert f.get_tensor("timesteps").shape == (10,)
        header = f.metadata()
    assert header["model"] == "tiny"
    assert header["prompt"] == "a photo of a cat"
    assert json.loads(header["token_count"]) == len(tiny.tokenizer("a photo of a cat").input_ids)
    assert json.loads(header["truncated"]) is False
    config = json.loads(header["scheduler_config"])
    assert config["beta_schedule"] == "scaled_linear" and config["steps_offset"] == 1
    assert header["engine_version"] == ENGINE_VERSION
    assert json.loads(header["timesteps"]) == result.timesteps.tolist()


def test_without_trajectory(tiny, sample_arrays, tmp_path):
    params = InversionParams(prompt="a cat", num_inference_steps=3)
    (plain,) = invert(tiny, [InversionRequest(sample_arrays["chelsea"], params)])
    assert plain.trajectory is None
    tensors, metadata = load_result(plain.to_safetensors())
    assert set(tensors) == {"latents", "timesteps"}
    assert metadata.trajectory_shape is None


def test_npy(result):
    loaded = np.load(io.BytesIO(result.to_npy()), allow_pickle=False)
    assert loaded.dtype == np.float32
    assert np.array_equal(loaded, result.latents.numpy())


def test_float16_results(tiny, sample_arrays, result):
    params = InversionParams(
        prompt="a photo of a cat",
        num_inference_steps=10,
        return_trajectory=True,
        result_dtype="float16",
    )
    (half,) = invert(tiny, [InversionRequest(sample_arrays["chelsea"], params)])
    assert half.latents.dtype == torch.float16
    assert half.trajectory.dtype == torch.float16
    assert half.metadata.dtype == "float16"
    tensors, _ = load_result(half.to_safetensors())
    assert tensors["latents"].dtype == torch.float16
    assert tensors["trajectory"].dtype == torch.float16
    assert np.load(io.BytesIO(half.to_npy())).dtype == np.float16
    # Computed in float32 (the same kernels, in this process) and rounded once at the end:
    # the float32 result rounded to float16, bit for bit; no tolerance to choose.
    assert torch.equal(half.latents, result.latents.half())
    assert torch.equal(half.trajectory, result.trajectory.half())


def test_long_prompt_is_truncated(tiny, sample_arrays):
    long_prompt = "a photograph of a small cat " * 4  # over 77 byte-level tokens
    assert len(tiny.tokenizer(long_prompt).input_ids) > 77
    params = InversionParams(prompt=long_prompt, num_inference_steps=2)
    (result,) = invert(tiny, [InversionRequest(sample_arrays["chelsea"], params)])
    assert result.metadata.truncated is True
    assert result.metadata.token_count == 77
    header = load_result(result.to_safetensors())[1]
    assert header.truncated is True and header.token_count == 77
