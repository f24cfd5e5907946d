"""Null-text inversion and every other method, with verify, through a real gateway, Redis
and worker."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from PIL import Image
from safetensors.torch import load

from tests.conftest import EVENT_GUARD_S
from tests.e2e.service_calls import submit, wait_status

pytestmark = pytest.mark.e2e


def test_null_text_with_verify_end_to_end(shared_service):
    base = shared_service.url
    fields = {
        "num_inference_steps": 4,
        "method": "null_text",
        "guidance_scale": 7.5,
        "null_text_inner_steps": 3,
        "null_text_learning_rate": 0.1,
        "verify": "true",
    }
    job = submit(base, "chelsea.png", **fields)
    url = f"{base}/v1/inversions/{job['id']}/reconstruction"
    early = httpx.get(url)
    assert early.status_code in (200, 409), early.text  # 409 until it succeeds

    done = wait_status(base, job["id"], {"succeeded", "failed"}, timeout=EVENT_GUARD_S)
    assert done["status"] == "succeeded", done
    result = done["result"]
    assert result["method"] == "null_text"
    assert result["reconstruction_latent_error"] > 0
    assert result["reconstruction_psnr"] > 0
    assert len(result["null_text_losses"]) == 4
    assert done["params"]["method"] == "null_text" and done["params"]["verify"] is True

    answer = httpx.get(url)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(answer.content))
    assert image.size == (result["width"], result["height"])

    latents = httpx.get(f"{base}/v1/inversions/{job['id']}/latents")
    assert latents.status_code == 200
    tensors = load(latents.content)
    assert tuple(tensors["null_embeddings"].shape[:2]) == (4, 77)

    # A job without verify has no reconstruction.
    plain = submit(base, "coffee.png", num_inference_steps=2)
    assert wait_status(base, plain["id"], {"succeeded", "failed"})["status"] == "succeeded"
    missing = httpx.get(f"{base}/v1/inversions/{plain['id']}/reconstruction")
    assert missing.status_code == 404


METHOD_JOBS = {
    "edict": ({"method": "edict", "edict_mixing": 0.9}, {"latents_pair": (1, 4, 8, 8)}),
    "ddpm": (
        {"method": "ddpm", "eta": 0.5, "seed": 4},
        {"noise_maps": (3, 1, 4, 8, 8), "noisy_latents": (4, 1, 4, 8, 8)},
    ),
    "negative_prompt": (
        {"method": "negative_prompt", "guidance_scale": 7.5},
        {"null_embeddings": (3, 77, 32)},
    ),
    "dpmsolver": ({"inverse_scheduler": "dpmsolver"}, {}),
}


def test_every_method_end_to_end(shared_service):
    """Each method through the gateway, the queue and a worker: its result file holds the
    tensors the method adds, and verify sampled back with the method's own sampler."""
    base = shared_service.url
    jobs = {
        name: submit(base, "chelsea.png", num_inference_steps=3, verify="true", **fields)
        for name, (fields, _) in METHOD_JOBS.items()
    }
    for name, job in jobs.items():
        fields, shapes = METHOD_JOBS[name]
        done = wait_status(base, job["id"], {"succeeded", "failed"}, timeout=EVENT_GUARD_S)
        assert done["status"] == "succeeded", done
        result = done["result"]
        assert result["method"] == fields.get("method", "ddim")
        assert result["inverse_scheduler"] == fields.get("inverse_scheduler", "ddim")
        assert result["reconstruction_psnr"] > 0
        if name in ("edict", "ddpm"):  # exact by construction: float32 rounding only
            # Measured 4.0e-5 (EDICT: its divisions by p amplify) and 7e-6 (DDPM) after 3
            # steps there and back; plain DDIM is off by 0.1 and more. 1e-3 leaves 25x.
            assert result["reconstruction_latent_error"] < 1e-3
        assert (result.get("edict_mixing"), result.get("eta")) == (
            fields.get("edict_mixing"),
            fields.get("eta"),
        )
        latents = httpx.get(f"{base}/v1/inversions/{job['id']}/latents")
        assert latents.status_code == 200
        tensors = load(latents.content)
        wanted = {"latents": (1, 4, 8, 8), "timesteps": (3,), **shapes}
        assert {k: tuple(v.shape) for k, v in tensors.items()} == wanted


def test_status_names_the_refinement_steps_that_did_not_converge(shared_service):
    """A tolerance no iterate can reach (1e-300, below float32's smallest normal) leaves
    every step unconverged, and the status says so; a tolerance of 1 (any iterate that
    moved by less than its own norm) leaves none."""
    base = shared_service.url
    unreachable = submit(base, num_inference_steps=3, refine_iterations=2, refine_tolerance=1e-300)
    reachable = submit(base, num_inference_steps=3, refine_iterations=2, refine_tolerance=1)
    for job, expected in ((unreachable, [0, 1, 2]), (reachable, [])):
        done = wait_status(base, job["id"], {"succeeded", "failed"}, timeout=120)
        assert done["status"] == "succeeded", done
        result = done["result"]
        assert result["refine_unconverged_steps"] == expected
        tolerance = done["params"]["refine_tolerance"]
        residuals = result["refine_residuals"]
        assert [i for i, r in enumerate(residuals) if not r < tolerance] == expected
        latents = httpx.get(f"{base}/v1/inversions/{job['id']}/latents")
        header = safe_open_header(latents.content)
        assert json.loads(header["refine_unconverged_steps"]) == expected


def safe_open_header(data: bytes) -> dict[str, str]:
    """The safetensors file's __metadata__: an 8-byte little-endian length, then JSON."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size])["__metadata__"]
