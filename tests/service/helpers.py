"""Helpers of the gateway's unit tests: the problem+json check every refusal passes, the
stored RQ job of an id, and the record of a worker that serves SD 1.5."""

from __future__ import annotations

import time
from typing import Any

from rq.job import Job
from rq.serializers import JSONSerializer

from ddim_inversion.contract import ModelInfo, WorkerRecord

PROBLEM = "application/problem+json"
"""The media type of every error answer (RFC 9457)."""

SERVED_MODEL = "stable-diffusion-v1-5"
"""The model of the fake workers' records, and the gateways' default model here: a job
submitted without any worker queues for it."""

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
"""Stable Diffusion 1.5's scheduler config, as its model folder has it."""


def assert_problem(response: Any, status: int, code: str, field: str | None = None) -> dict:
    """The answer is an RFC 9457 problem of `status` and `code` (naming `field`, if given);
    its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"https://ddim-inversion.dev/problems/{code}"
    assert body["title"] and body["detail"] and body["instance"].startswith("/")
    if field is not None:
        assert body.get("field") == field, body
    return body


def fetch_job(connection: Any, job_id: str) -> Job:
    """The RQ job as the gateway stored it."""
    return Job.fetch(job_id, connection=connection, serializer=JSONSerializer)


def worker_record_of(name: str = "gpu-0", age_s: float = 0.0, **model: Any) -> WorkerRecord:
    """A live worker of SD 1.5 (fp16 on cuda:0); `model` overrides ModelInfo fields."""
    info = {
        "name": SERVED_MODEL,
        "native_resolution": (512, 512),
        "latent_channels": 4,
        "vae_scale_factor": 8,
        "tokenizer_max_length": 77,
        "scheduler_config": SD15_SCHEDULER,
        "dtype": "float16",
        "device": "cuda:0",
        **model,
    }
    return WorkerRecord(
        name=name,
        model=ModelInfo(**info),
        heartbeat_at=time.time() - age_s,
        max_batch_size=4,
    )
