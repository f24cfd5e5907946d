"""The tiny SDXL and v-prediction models through the HTTP service: a real gateway and two
real workers, one serving tiny-xl, one tiny-v, on one Redis. Submit, status, latents
(equal to the engine run in this process), verify, null-text; SDXL-only parameters
refused for the v-prediction model."""

from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import load

from ddim_inversion import imaging
from ddim_inversion.params import InversionParams
from tests.conftest import SAMPLES, worker_threads
from tests.e2e.service_calls import status, submit, wait_status
from tests.rounding import drift, size
from worker.engine.dispatch import invert
from worker.engine.types import InversionRequest
from worker.models import load_model

pytestmark = pytest.mark.e2e


def test_sdxl_and_v_prediction_models_end_to_end(processes, model_cache_dir):
    for name in ("tiny-xl", "tiny-v"):
        processes.worker(INVERSION_MODEL=name, INVERSION_MODEL_NAME=name)
    url = processes.gateway(INVERSION_DEFAULT_MODEL="")
    models = {m["name"]: m for m in httpx.get(f"{url}/v1/models").json()["models"]}
    assert models["tiny-xl"]["family"] == "sdxl"
    assert models["tiny-v"]["prediction_type"] == "v_prediction"

    # SDXL: both prompts, the size conditioning, guidance with a negative prompt, verify.
    fields = {
        "model": "tiny-xl",
        "prompt": "a cup of coffee",
        "prompt_2": "film grain",
        "negative_prompt": "blurry",
        "guidance_scale": 3.0,
        "original_size": "512,512",
        "crops_coords_top_left": "0,16",
        "num_inference_steps": 6,
        "verify": "true",
    }
    job = submit(url, "coffee.png", **fields)
    done = wait_status(url, job["id"], {"succeeded", "failed"}, 120)
    assert done["status"] == "succeeded", done
    assert done["result"]["sdxl_conditioning"]["original_size"] == [512, 512]
    assert done["result"]["sdxl_conditioning"]["target_size"] == [64, 64]
    assert done["result"]["reconstruction_psnr"] is not None
    served = load(httpx.get(f"{url}/v1/inversions/{job['id']}/latents").content)
    png = httpx.get(f"{url}/v1/inversions/{job['id']}/reconstruction")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")

    array = imaging.normalize((SAMPLES / "coffee.png").read_bytes(), (64, 64))
    xl = load_model("tiny-xl", device="cpu", dtype="float32", cache_dir=model_cache_dir)
    params = {k: v for k, v in fields.items() if k not in ("model", "verify")}
    with worker_threads():
        (local,) = invert(xl, [InversionRequest(array, InversionParams(**params))])
    # The worker's run and this one: float32 rounding (tests/rounding.py), 6 steps at 3.
    tolerance = drift(6, fields["guidance_scale"], size(local.latents))
    assert float((served["latents"] - local.latents).abs().max()) <= tolerance

    # SDXL null-text: the result carries both optimised embeddings.
    job = submit(
        url,
        model="tiny-xl",
        method="null_text",
        guidance_scale=3.0,
        num_inference_steps=3,
        null_text_inner_steps=2,
        verify="true",
    )
    done = wait_status(url, job["id"], {"succeeded", "failed"}, 120)
    assert done["status"] == "succeeded", done
    tensors = load(httpx.get(f"{url}/v1/inversions/{job['id']}/latents").content)
    assert tensors["null_embeddings"].shape == (3, 77, 64)
    assert tensors["null_pooled_embeddings"].shape == (3, 32)
    assert torch.isfinite(tensors["null_pooled_embeddings"]).all()

    # v-prediction: refined inversion, verified; SDXL-only parameters are refused by name.
    job = submit(url, model="tiny-v", num_inference_steps=5, refine_iterations=5, verify="true")
    done = wait_status(url, job["id"], {"succeeded", "failed"}, 120)
    assert done["status"] == "succeeded", done
    assert done["result"]["scheduler_config"]["prediction_type"] == "v_prediction"
    assert done["result"]["reconstruction_latent_error"] is not None
    assert status(url, job["id"])["params"]["model"] == "tiny-v"
    with (SAMPLES / "chelsea.png").open("rb") as image:
        refused = httpx.post(
            f"{url}/v1/inversions",
            data={"prompt": "x", "model": "tiny-v", "target_size": "64,64"},
            files={"image": ("c.png", image, "image/png")},
        )
    assert refused.status_code == 422, refused.text
    assert refused.json()["field"] == "target_size"
    assert "SDXL" in refused.json()["detail"]
