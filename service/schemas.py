"""Response bodies of the HTTP API, as pydantic models so that OpenAPI documents them.

The contract's models (InversionParams, ResultMetadata, JobError, Progress) are reused
as they are: a client sees the same names the worker writes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from ddim_inversion.contract import JobStatus, Progress, ResultMetadata
from ddim_inversion.errors import JobError
from ddim_inversion.params import InversionParams


class JobUrls(BaseModel):
    """Where to poll, download and cancel; relative to the gateway's base URL."""

    self: str
    latents: str
    cancel: str

    @classmethod
    def for_job(cls, job_id: str) -> JobUrls:
        base = f"/v1/inversions/{job_id}"
        return cls(self=base, latents=f"{base}/latents", cancel=base)


class JobAccepted(BaseModel):
    """The answer to a submission: the job exists and waits in the queue."""

    id: str
    status: JobStatus = JobStatus.QUEUED
    created_at: datetime
    urls: JobUrls

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "id": "4b7f2c1e-2f8e-4a57-9a51-0d3c7a3b9e10",
                    "status": "queued",
                    "created_at": "2025-01-01T12:00:00Z",
                    "urls": {
                        "self": "/v1/inversions/4b7f2c1e-2f8e-4a57-9a51-0d3c7a3b9e10",
                        "latents": "/v1/inversions/4b7f2c1e-2f8e-4a57-9a51-0d3c7a3b9e10/latents",
                        "cancel": "/v1/inversions/4b7f2c1e-2f8e-4a57-9a51-0d3c7a3b9e10",
                    },
                }
            ]
        }
    }


class Timings(BaseModel):
    """When the job moved between states; durations in seconds once both ends are known."""

    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_wait_s: float | None = None
    run_s: float | None = None


class JobParams(InversionParams):
    """The parameters as submitted, plus what they resolved to once a result exists."""

    resolved_resolution: tuple[int, int] | None = Field(
        None, description="(width, height) the latents were computed at."
    )
    resolved_scheduler_config: dict[str, Any] | None = Field(
        None, description="The full DDIMInverseScheduler config the job ran with."
    )


class JobView(BaseModel):
    """Everything a client may know about one job."""

    id: str
    status: JobStatus
    created_at: datetime
    queue_position: int | None = Field(None, description="0-based, while queued.")
    estimated_wait_s: float | None = Field(
        None,
        description="While queued: (queue_position + 1) / the live workers' recent images/s; "
        "absent while unknown.",
    )
    live_workers: int | None = Field(
        None,
        description="While queued: the live workers serving the job's model; 0: none does "
        "now, and the job waits until one starts.",
    )
    progress: Progress | None = Field(None, description="While running.")
    timings: Timings
    params: JobParams | None = None
    result: ResultMetadata | None = Field(None, description="Once succeeded.")
    error: JobError | None = Field(None, description="Once failed or canceled.")
    urls: JobUrls


class WorkerView(BaseModel):
    """A live worker: its name, the model it serves, seconds since its heartbeat."""

    name: str
    model: str
    heartbeat_age_s: float


class Readiness(BaseModel):
    """The gateway can serve (Redis answers). Only a status word: the workers and queues
    are behind the API key (`GET /v1/capacity`) or the metrics token (`/metrics`)."""

    status: str = "ready"


class WorkerCapacity(WorkerView):
    images_per_s: float | None = Field(
        None, description="Its moving average over recent batches; null until it ran one."
    )


class ModelCapacity(BaseModel):
    """One model of the pool: whether its jobs run now, its queue and throughput."""

    name: str
    ready: bool = Field(
        description="A live worker serves it: its jobs run; false: they wait in its queue "
        "until one starts."
    )
    live_workers: int = Field(description="Live workers serving it.")
    queued: int = Field(description="Its jobs waiting in its queue.")
    running: int = Field(description="Its jobs its workers are running.")
    images_per_s: float | None = Field(
        None, description="Its live workers' images per second together; null while unknown."
    )
    estimated_wait_s: float | None = Field(
        None,
        description="Seconds until a job of it submitted now would have run: (queued + 1) "
        "/ images_per_s; null while unknown.",
    )


class ModelView(ModelCapacity):
    """A model the pool serves (or served: a model stays known while its workers are
    down), as its workers announced it: what jobs naming it are validated against."""

    family: str = Field(
        description=(
            "sd1 (CLIP ViT-L text encoder), sd2 (OpenCLIP ViT-H), sdxl (two text encoders, "
            "pooled embedding and size conditioning), or other."
        )
    )
    native_resolution: tuple[int, int] | None = Field(
        None, description="(width, height) a job without `resolution` runs at."
    )
    prediction_type: str | None = Field(None, description="epsilon or v_prediction.")
    scheduler_config: dict[str, Any] | None = Field(
        None, description="The model's scheduler config, which a job's `scheduler` overrides."
    )
    tokenizer_max_length: int | None = Field(
        None, description="Tokens of a prompt the text encoder reads (more are truncated)."
    )
    default: bool = Field(description="Jobs that name no model run on it.")


class Models(BaseModel):
    """GET /v1/models: every model a job may name."""

    models: list[ModelView]
    default: str | None = Field(
        None, description="The model a job that names none runs on; null: it must name one."
    )


class Capacity(BaseModel):
    """What the worker pool can take now. Submissions are accepted without any worker
    (they queue until one starts): this says how long they would wait."""

    workers: list[WorkerCapacity] = Field(description="Live workers, the most recent first.")
    models: list[str] = Field(description="The models the live workers serve.")
    by_model: list[ModelCapacity] = Field(
        description="Every known model: ready while a live worker serves it."
    )
    queued: int = Field(description="Jobs waiting in the queues of every model.")
    running: int = Field(description="Jobs the workers are running.")
    images_per_s: float | None = Field(
        None, description="The live workers' images per second together; null while unknown."
    )
    estimated_wait_s: float | None = Field(
        None,
        description="Seconds until a job submitted now would have run: (queued + 1) / "
        "images_per_s; null while unknown.",
    )


class Health(BaseModel):
    status: str = "ok"
