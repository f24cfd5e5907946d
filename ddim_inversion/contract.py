"""The contract between the HTTP gateway and the GPU worker (cog style): the states of a
job, what a worker publishes about its model, the payload of a queued job and the metadata
of a result. Both sides read these definitions; neither redefines them.
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_serializer

from ddim_inversion.params import InversionParams

ENGINE_VERSION = "1.1.0"
"""Written into every result's metadata; bumped whenever the engine's numbers may change."""


class JobStatus(str, enum.Enum):
    """What a client sees of a job: queued -> running -> succeeded | failed | canceled."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class ModelInfo(BaseModel):
    """What a worker publishes about its loaded model, so that gateways validate against it."""

    name: str
    native_resolution: tuple[int, int]
    latent_channels: int
    vae_scale_factor: int
    tokenizer_max_length: int
    text_hidden_size: int | None = Field(
        None,
        description="Width of the text encoder's token embeddings (null_text stores one per "
        "token per step); None from workers older than this field.",
    )
    family: str = Field(
        "sd",
        description="sd: Stable Diffusion 1.x/2.x (one text encoder); sdxl: SDXL (two text "
        "encoders, pooled embedding, size conditioning).",
    )
    text_pooled_size: int | None = Field(
        None,
        description="sdxl: width of the pooled text embedding (null_text stores one per step).",
    )
    tokenizer_key: str | None = Field(
        None, description="Redis key of the tokenizer as tokenizers JSON, for prompt checks."
    )
    scheduler_config: dict[str, Any]
    dtype: str
    device: str


class ResultMetadata(BaseModel):
    """What the result's header and the job status say about the latents."""

    model: str
    width: int
    height: int
    prompt: str
    negative_prompt: str
    guidance_scale: float
    token_count: int
    truncated: bool
    encode_mode: str
    # None fields are left out of a job's status body (exclude_none), so none is required.
    seed: int | None = Field(
        None, description="The job's seed (encode_mode sample, ddpm); None: none."
    )
    num_inference_steps: int
    timesteps: list[int]
    scheduler_config: dict[str, Any]
    latents_shape: list[int]
    trajectory_shape: list[int] | None = Field(
        None, description="Shape of the trajectory, with return_trajectory; None: not kept."
    )
    dtype: str
    engine_version: str = ENGINE_VERSION
    refine_iterations: list[int] | None = Field(
        None, description="Per step, the fixed-point refinement iterations that ran; None: off."
    )
    refine_residuals: list[float] | None = Field(
        None,
        description="Per step, the refinement's residual ||g(z) - z|| / ||g(z)|| at the "
        "returned iterate.",
    )
    refine_unconverged_steps: list[int] | None = Field(
        None,
        description="Refinement on: the steps (0-based, in the order of timesteps) whose "
        "residual stayed at or above refine_tolerance after refine_iterations; [] when every "
        "step converged. None: off.",
    )
    method: str = Field("ddim", description="ddim, null_text, negative_prompt, edict or ddpm.")
    inverse_scheduler: str = Field(
        "ddim", description="ddim or dpmsolver: the solver the inversion stepped with."
    )
    edict_mixing: float | None = Field(
        None, description="edict: the mixing coefficient p that sampling back must use."
    )
    eta: float | None = Field(
        None, description="ddpm: the sampler's eta that the noise maps were made for."
    )
    null_text_losses: list[float] | None = Field(
        None,
        description=(
            "null_text: per sampling step (highest t first), the MSE between the guided "
            "sampling step with the optimised null embedding and the pivot latent."
        ),
    )
    sdxl_conditioning: dict[str, Any] | None = Field(
        None,
        description=(
            "SDXL models: the conditioning beside the prompts, as the SDXL pipeline takes it: "
            "prompt_2, negative_prompt_2, original_size, crops_coords_top_left, target_size."
        ),
    )
    reconstruction_latent_error: float | None = Field(
        None, description="verify: ||x_rec - x0|| / ||x0|| of the latent sampled back."
    )
    reconstruction_psnr: float | None = Field(
        None, description="verify: PSNR (dB) of the decoded reconstruction against the input."
    )

    # JSON has no NaN or Infinity: a verify figure of an exact reconstruction (PSNR +inf)
    # or of one that overflowed would fail every answer that carries it. Null instead.
    @field_serializer(
        "edict_mixing",
        "eta",
        "reconstruction_latent_error",
        "reconstruction_psnr",
        when_used="json",
    )
    def _finite_number(self, value: float | None) -> float | None:
        return finite_or_null(value)

    @field_serializer("refine_residuals", "null_text_losses", when_used="json")
    def _finite_numbers(self, value: list[float] | None) -> list[float | None] | None:
        return finite_or_null(value)

    @field_serializer("scheduler_config", when_used="json")
    def _finite_config(self, value: dict[str, Any]) -> dict[str, Any]:
        return finite_or_null(value)

    @field_serializer("sdxl_conditioning", when_used="json")
    def _finite_values(self, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return finite_or_null(value)

    def to_header(self) -> dict[str, str]:
        """safetensors metadata is str -> str: scalars as text, structures as JSON."""
        out: dict[str, str] = {}
        for key, value in self.model_dump().items():
            out[key] = value if isinstance(value, str) else json.dumps(value)
        return out

    @classmethod
    def from_header(cls, header: dict[str, str]) -> ResultMetadata:
        fields: dict[str, Any] = {}
        for key, value in header.items():
            if key not in cls.model_fields:
                continue
            annotation = str(cls.model_fields[key].annotation)
            fields[key] = value if annotation in ("str", "<class 'str'>") else json.loads(value)
        return cls(**fields)


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN and infinite float, however nested, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite_or_null(item) for item in value]
    return value


class Progress(BaseModel):
    step: int
    total: int


JOB_FUNCTION = "worker.jobs.run_inversion"
"""The name RQ records as every job's function. No module by that name exists any more:
the batching worker matches jobs by this name and runs them itself, never importing it;
keeping the name lets jobs queued before an upgrade run as they are."""


class JobPayload(BaseModel):
    """The one argument of JOB_FUNCTION."""

    model_config = ConfigDict(extra="forbid")

    params: InversionParams
    image_width: int = Field(ge=1, description="Width of the stored RGB array.")
    image_height: int = Field(ge=1, description="Height of the stored RGB array.")
    owner: str = Field("", description="Hash of the API key that created the job; '' if none.")
    webhook_url: str | None = Field(
        None, description="Where the worker POSTs the job's end (not an engine parameter)."
    )


class WorkerRecord(BaseModel):
    """What a live worker publishes under WORKERS_KEY, refreshed every heartbeat."""

    name: str
    model: ModelInfo
    heartbeat_at: float = Field(description="Unix time of the last heartbeat.")
    max_batch_size: int


# Keys of the RQ job meta the worker writes and the gateway reads.
META_PROGRESS = "progress"
"""{"step": int, "total": int} while running."""


META_ERROR = "error"
"""{"code": ErrorCode, "message": str} once failed or canceled."""


META_RESULT = "result"
"""ResultMetadata as JSON once succeeded."""


META_ENGINE_S = "engine_s"
"""Seconds the engine spent on the job's batch: what the service adds is the rest."""


META_OWNER = "owner"
"""The owner's key hash, copied from the payload so that a status read needs no payload."""


META_IDEMPOTENCY_KEY = "idempotency_key"
"""The Idempotency-Key the job was submitted with, if any: its record is deleted with it."""
