"""The contract shared by the HTTP gateway and the GPU worker.

One small module, pydantic only: the parameters of an inversion, the states of a job, the
error codes a client can rely on and the metadata of a result. Both sides read these
definitions; neither redefines them. Nothing here imports torch, diffusers or fastapi.
"""

from __future__ import annotations

import enum
import json
import math
import time
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENGINE_VERSION = "1.0.0"
"""Written into every result's metadata; bumped whenever the engine's numbers may change."""

QUEUE_NAME = "inversions"
"""The RQ queue that gateways fill and workers drain."""

KEY_PREFIX = "inversion:"
"""Prefix of every Redis key the service writes besides RQ's own."""

MAX_TRAIN_TIMESTEPS = 10_000
"""Upper bound on `num_train_timesteps`: an override cannot allocate without limit."""


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


class ErrorCode(str, enum.Enum):
    """Stable codes: the HTTP `code` of a problem and the `code` of a failed job."""

    # A job's failure codes.
    INVALID_INPUT = "invalid_input"
    TIMEOUT = "timeout"
    GPU_OUT_OF_MEMORY = "gpu_out_of_memory"
    WORKER_LOST = "worker_lost"
    CANCELED = "canceled"
    INTERNAL = "internal"
    RESULT_TOO_LARGE = "result_too_large"
    """The result is larger than Redis takes in one value (its `proto-max-bulk-len`)."""
    STORAGE_FULL = "storage_full"
    """Redis refused to store the result: out of memory (`maxmemory`); submit again later."""
    # Errors of a request, before any job exists.
    VALIDATION_ERROR = "validation_error"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    IMAGE_TOO_LARGE = "image_too_large"
    NOT_FOUND = "not_found"
    NOT_FINISHED = "not_finished"
    NO_RESULT = "no_result"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    QUEUE_FULL = "queue_full"
    QUOTA_EXCEEDED = "quota_exceeded"
    SERVICE_UNAVAILABLE = "service_unavailable"


class InvalidParameter(ValueError):
    """A parameter that cannot be honoured; `field` names it, the message says what is valid."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# Every DDIMInverseScheduler constructor parameter a job may override, with the values it admits.
SCHEDULER_OVERRIDES: dict[str, str] = {
    "num_train_timesteps": "int",
    "beta_start": "float",
    "beta_end": "float",
    "beta_schedule": "linear|scaled_linear|squaredcos_cap_v2",
    "trained_betas": "list[float]",
    "clip_sample": "bool",
    "clip_sample_range": "float",
    "set_alpha_to_one": "bool",
    "steps_offset": "int",
    "prediction_type": "epsilon|sample|v_prediction",
    "timestep_spacing": "leading|trailing",
    "rescale_betas_zero_snr": "bool",
}

SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}
"""DDIMInverseScheduler's own constructor defaults, used where a model's config is silent."""


def _finite_number(value: Any) -> bool:
    """An int or float (not a bool) within the float range and not NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past the float range
        return False


def _check_override(name: str, value: Any) -> Any:
    """One override's type and value, or InvalidParameter naming the valid choices."""
    field = f"scheduler.{name}"
    kind = SCHEDULER_OVERRIDES.get(name)
    if kind is None:
        raise InvalidParameter(
            field, f"unknown scheduler parameter; valid: {', '.join(SCHEDULER_OVERRIDES)}"
        )
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidParameter(field, "must be true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidParameter(field, "must be an integer")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidParameter(field, "must be a number")
        if not _finite_number(value):
            raise InvalidParameter(field, "must be finite")
        return float(value)
    if kind == "list[float]":
        if value is None:
            return None
        if not isinstance(value, list) or not all(_finite_number(v) for v in value):
            raise InvalidParameter(field, "must be a list of finite numbers or null")
        return [float(v) for v in value]
    choices = kind.split("|")
    if value not in choices:
        raise InvalidParameter(field, f"must be one of {', '.join(choices)}")
    return value


def resolve_scheduler_config(
    model_config: dict[str, Any], overrides: dict[str, Any], num_inference_steps: int
) -> dict[str, Any]:
    """The scheduler config a job runs with: the model's, then the job's overrides.

    Refuses, before any compute, every combination that DDIMInverseScheduler would reject
    or that would divide by zero in its first step.
    """
    config = {k: model_config.get(k, v) for k, v in SCHEDULER_DEFAULTS.items()}
    for name, value in overrides.items():
        config[name] = _check_override(name, value)

    n_train = config["num_train_timesteps"]
    if not 1 <= n_train <= MAX_TRAIN_TIMESTEPS:
        raise InvalidParameter(
            "scheduler.num_train_timesteps", f"must be between 1 and {MAX_TRAIN_TIMESTEPS}"
        )
    if num_inference_steps > n_train:
        raise InvalidParameter(
            "num_inference_steps",
            f"{num_inference_steps} exceeds the scheduler's num_train_timesteps ({n_train})",
        )
    betas = config["trained_betas"]
    if betas is not None:
        if len(betas) != n_train:
            raise InvalidParameter(
                "scheduler.trained_betas",
                f"has {len(betas)} values, num_train_timesteps is {n_train}",
            )
        if not all(0.0 < b < 1.0 for b in betas):
            raise InvalidParameter("scheduler.trained_betas", "every beta must lie in (0, 1)")
    else:
        start, end = config["beta_start"], config["beta_end"]
        if not (0.0 < start < 1.0 and 0.0 < end < 1.0):
            raise InvalidParameter(
                "scheduler.beta_start", "beta_start and beta_end must lie in (0, 1)"
            )
    if config["clip_sample_range"] <= 0:
        raise InvalidParameter("scheduler.clip_sample_range", "must be positive")
    if config["steps_offset"] < 0:
        raise InvalidParameter("scheduler.steps_offset", "must not be negative")
    if config["timestep_spacing"] == "leading":
        last = (num_inference_steps - 1) * (n_train // num_inference_steps) + config["steps_offset"]
        if last >= n_train:
            raise InvalidParameter(
                "scheduler.steps_offset",
                f"puts the last timestep at {last}, past num_train_timesteps - 1 ({n_train - 1})",
            )
    if config["prediction_type"] == "sample" and config["set_alpha_to_one"]:
        raise InvalidParameter(
            "scheduler.prediction_type",
            "'sample' with set_alpha_to_one=true divides by zero in the first step; "
            "set set_alpha_to_one to false",
        )
    return config


def parse_resolution(value: str | int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """`512` -> (512, 512); `768x512` -> (768, 512) as (width, height); multiples of 64 only."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise InvalidParameter("resolution", "must be two sizes, width and height")
        width, height = value
    elif isinstance(value, int) and not isinstance(value, bool):
        width = height = value
    elif isinstance(value, str):
        parts = value.lower().strip().split("x")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise InvalidParameter("resolution", f"{value!r} is not N or WxH, e.g. 512 or 768x512")
        width = int(parts[0])
        height = int(parts[-1])
    else:
        raise InvalidParameter("resolution", "must be N or WxH, e.g. 512 or 768x512")
    for size in (width, height):
        if isinstance(size, bool) or not isinstance(size, int) or size < 64 or size % 64:
            raise InvalidParameter(
                "resolution", f"{size} is not a multiple of 64 of at least 64 (e.g. 512 or 768x512)"
            )
    return int(width), int(height)


class InversionParams(BaseModel):
    """Everything a caller may choose about one inversion; names follow diffusers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(description="The text the image is inverted under.")
    negative_prompt: str = Field("", description="Unconditional prompt when guidance_scale > 1.")
    num_inference_steps: int = Field(50, ge=1, le=1000, description="DDIM inversion steps.")
    guidance_scale: float = Field(
        1.0,
        ge=0.0,
        le=50.0,
        description="1.0: one conditional UNet pass per step; above: classifier-free guidance.",
    )
    resolution: tuple[int, int] | None = Field(
        None, description="(width, height), multiples of 64; None: the model's native size."
    )
    resize_mode: Literal["center_crop", "stretch"] = "center_crop"
    encode_mode: Literal["mean", "sample"] = "mean"
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="For encode_mode 'sample'.")
    return_trajectory: bool = False
    result_dtype: Literal["float32", "float16"] = "float32"
    scheduler: dict[str, Any] = Field(
        default_factory=dict, description="DDIMInverseScheduler overrides, by parameter name."
    )
    refine_iterations: int = Field(
        0,
        ge=0,
        le=50,
        description=(
            "Fixed-point iterations per step making the step the exact inverse of DDIM "
            "sampling (AIDI, Pan et al. 2023); each costs one more UNet call per step. "
            "0: plain DDIM inversion."
        ),
    )
    refine_tolerance: float = Field(
        1e-4,
        gt=0,
        le=1,
        description=(
            "A step's refinement stops once the relative change ||dz|| / ||z|| of the "
            "iterate falls below this (or refine_iterations run out)."
        ),
    )
    method: Literal["ddim", "null_text"] = Field(
        "ddim",
        description=(
            "ddim: (refined) DDIM inversion. null_text: null-text inversion (Mokady et al. "
            "2022): a DDIM inversion at guidance 1 is the pivot, then an unconditional "
            "embedding per step is optimised so that guided DDIM sampling at guidance_scale "
            "(> 1) follows the pivot; the result adds `null_embeddings`."
        ),
    )
    null_text_inner_steps: int = Field(
        10, ge=1, le=100, description="null_text: Adam iterations per step (UNet forward+backward)."
    )
    null_text_learning_rate: float = Field(
        1e-2, gt=0, le=1, description="null_text: Adam learning rate of the null embedding."
    )
    null_text_early_stop: float = Field(
        1e-5,
        ge=0,
        allow_inf_nan=False,
        description="null_text: a step's optimisation stops once its latent MSE is below this.",
    )
    verify: bool = Field(
        False,
        description=(
            "Sample back from the latents (DDIMScheduler, same prompt and guidance, the null "
            "embeddings for null_text) and decode: reports reconstruction_latent_error and "
            "reconstruction_psnr and stores a reconstruction PNG. Costs one more pass of "
            "num_inference_steps UNet calls and a VAE decode."
        ),
    )

    @field_validator("resolution", mode="before")
    @classmethod
    def _parse_resolution(cls, value: Any) -> Any:
        if value is None or value == "":
            return None
        try:
            return parse_resolution(value)
        except InvalidParameter as exc:
            raise ValueError(exc.message) from None

    @field_validator("guidance_scale")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_overrides(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name, item in value.items():
            try:
                _check_override(name, item)
            except InvalidParameter as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _seed_needs_sample(self) -> InversionParams:
        if self.encode_mode == "sample" and self.seed is None:
            raise ValueError(
                "encode_mode 'sample' needs a seed, so that the result is reproducible"
            )
        return self

    @model_validator(mode="after")
    def _null_text_needs_guidance(self) -> InversionParams:
        if self.method == "null_text" and not self.guidance_scale > 1.0:
            raise ValueError(
                "method 'null_text' needs guidance_scale > 1 (e.g. 7.5, the usual value): "
                "it optimises the unconditional embedding of classifier-free guidance, "
                f"which guidance_scale {self.guidance_scale} does not use"
            )
        return self

    @property
    def uses_guidance(self) -> bool:
        """Classifier-free guidance runs two UNet passes per step; 1.0 runs one."""
        return self.guidance_scale != 1.0


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
    seed: int | None
    num_inference_steps: int
    timesteps: list[int]
    scheduler_config: dict[str, Any]
    latents_shape: list[int]
    trajectory_shape: list[int] | None
    dtype: str
    engine_version: str = ENGINE_VERSION
    refine_iterations: list[int] | None = Field(
        None, description="Per step, the fixed-point refinement iterations that ran; None: off."
    )
    refine_residuals: list[float] | None = Field(
        None, description="Per step, the refinement's final relative change ||dz|| / ||z||."
    )
    method: str = Field("ddim", description="ddim or null_text.")
    null_text_losses: list[float] | None = Field(
        None,
        description=(
            "null_text: per sampling step (highest t first), the MSE between the guided "
            "sampling step with the optimised null embedding and the pivot latent."
        ),
    )
    reconstruction_latent_error: float | None = Field(
        None, description="verify: ||x_rec - x0|| / ||x0|| of the latent sampled back."
    )
    reconstruction_psnr: float | None = Field(
        None, description="verify: PSNR (dB) of the decoded reconstruction against the input."
    )

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


class JobError(BaseModel):
    code: ErrorCode
    message: str


class Progress(BaseModel):
    step: int
    total: int


# -- the queue protocol between gateways and workers ------------------------------------
#
# A job is an RQ job (JSON serializer, never pickle) whose id is a server-made UUID4 and
# whose function is JOB_FUNCTION, called with one keyword argument `payload` (a
# JobPayload as JSON). The normalised image travels beside it as raw RGB bytes. The
# worker writes progress, errors and the result's metadata into the job's meta, the
# result bytes into their own key, and returns the metadata as the job's RQ result.

JOB_FUNCTION = "worker.jobs.run_inversion"
"""What RQ records as the job's function; a plain `rq worker` can run it one at a time."""

WORKERS_KEY = KEY_PREFIX + "workers"
"""Hash: worker name -> WorkerRecord JSON; how gateways learn that a model is loaded."""


THROUGHPUT_KEY = KEY_PREFIX + "throughput"
"""Hash: worker name -> {"images_per_s": EWMA, "updated_at": unix time}, after each batch."""


def input_key(job_id: str) -> str:
    """Raw RGB uint8 bytes of the normalised upload, row-major (height, width, 3)."""
    return f"{KEY_PREFIX}input:{job_id}"


def result_key(job_id: str) -> str:
    """The safetensors bytes of a succeeded job; expires with the job's result TTL."""
    return f"{KEY_PREFIX}result:{job_id}"


def reconstruction_key(job_id: str) -> str:
    """The PNG of a `verify` job's reconstruction; expires with the job's result TTL."""
    return f"{KEY_PREFIX}reconstruction:{job_id}"


def cancel_key(job_id: str) -> str:
    """Set by a gateway to ask the worker running the job to stop it at the next step."""
    return f"{KEY_PREFIX}cancel:{job_id}"


CANCEL_CHANNEL = f"{KEY_PREFIX}cancels"
"""Pub/sub channel a gateway publishes a job id on right after setting its cancel_key: the
worker running the job hears it and stops at the next step without polling Redis per step
(workers still read the flags now and then, for a message missed while disconnected)."""


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


def tokenizer_key(digest: str) -> str:
    """A model's tokenizer (tokenizers JSON) by content hash, so gateways can count tokens."""
    return f"{KEY_PREFIX}tokenizer:{digest}"


def ended_key(job_id: str) -> str:
    """A one-element list the worker pushes when the job ends: waiters block on it (BLMOVE
    onto itself, so any number of them can) instead of polling the job's status."""
    return f"{KEY_PREFIX}ended:{job_id}"


ENDED_TTL_S = 600
"""How long a job's `ended` signal is kept: long enough for any waiter to see it."""

JOB_EVENTS_CHANNEL = f"{KEY_PREFIX}job-events"
"""Pub/sub channel that carries a job's id each time its progress or its end is written:
each gateway process holds one subscription and wakes that job's `Prefer: wait` and event
stream waiters, which then read the job (no waiter polls Redis)."""


def publish_job_event(pipe: Any, job_id: str) -> None:
    """Announce a change of the job on JOB_EVENTS_CHANNEL: queued in `pipe` (a redis client
    or pipeline) after the writes it announces, so that a woken reader sees them."""
    pipe.publish(JOB_EVENTS_CHANNEL, job_id)


# -- per-key budgets and fair ordering -------------------------------------------------
#
# Each API key's (owner's) jobs in flight and the bytes they hold in Redis are counted
# under the owner's hash (the anonymous owner "" is not counted). Gateways admit a job with
# one Lua script over these keys (service/limits.py); a job's bytes are settled by whoever
# changes them: the worker when it stores a result or ends a job otherwise, the gateway
# when it cancels or deletes one (`settle_held_bytes`).


def rate_key(owner: str, window: int) -> str:
    """Counter of the owner's submissions in one clock minute (`window`: unix minute)."""
    return f"{KEY_PREFIX}owner:{owner}:rate:{window}"


def owner_jobs_key(owner: str) -> str:
    """Hash: job id -> GPU cost (`job_cost`) of each of the owner's jobs admitted and not
    yet seen ended; ended ones are pruned at the owner's next admission."""
    return f"{KEY_PREFIX}owner:{owner}:jobs"


def owner_held_key(owner: str) -> str:
    """Sorted set: job id -> unix time after which the job's bytes are surely gone."""
    return f"{KEY_PREFIX}owner:{owner}:held"


def owner_held_bytes_key(owner: str) -> str:
    """Hash: job id -> bytes the job holds in Redis (its input, then its result)."""
    return f"{KEY_PREFIX}owner:{owner}:held:bytes"


def owner_held_total_key(owner: str) -> str:
    """The sum of `owner_held_bytes_key`'s values: what the per-key byte budget compares."""
    return f"{KEY_PREFIX}owner:{owner}:held:total"


ADMITTING_KEY = KEY_PREFIX + "admitting"
"""Sorted set: job id -> unix time it was admitted, until the transaction that enqueues it
removes it; counted in the queue depth, so that concurrent admissions cannot overfill."""


def fair_rounds_key(queue: str) -> str:
    """Sorted set: queued job id -> its round; the queue list is kept sorted by round."""
    return f"{KEY_PREFIX}fair:{queue}:rounds"


def fair_owners_key(queue: str) -> str:
    """Hash: owner -> the round of the owner's last job queued."""
    return f"{KEY_PREFIX}fair:{queue}:owners"


SETTLE_HELD_LUA = """
-- KEYS: held, held bytes, held total, the job's input. ARGV: job, bytes kept, deadline, ttl.
-- Deleting comes first: a full Redis (noeviction) refuses a script whose first write may
-- need memory, and accepts what follows a delete.
local old = redis.call('HGET', KEYS[2], ARGV[1])
if ARGV[2] == '0' then
  redis.call('DEL', KEYS[4])
  if old then
    redis.call('HDEL', KEYS[2], ARGV[1])
    redis.call('ZREM', KEYS[1], ARGV[1])
    redis.call('DECRBY', KEYS[3], old)
  end
  return 0
end
if not old then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - tonumber(old))
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
if ARGV[4] ~= '' then
  for i = 1, 3 do
    if redis.call('TTL', KEYS[i]) < tonumber(ARGV[4]) then
      redis.call('EXPIRE', KEYS[i], ARGV[4])
    end
  end
end
return 1
"""


def settle_held_bytes(
    client: Any, owner: str, job_id: str, kept_bytes: int = 0, keep_s: float | None = 0
) -> None:
    """Record what a job now holds against its owner's byte budget, on `client` (a Redis
    client or a pipeline, where it is queued).

    `kept_bytes` > 0: the job keeps that many bytes (its result) for `keep_s` more seconds
    (None: without expiry). 0: its bytes are gone: its input is deleted (if still there) and
    its share released; this much works on a Redis that is out of memory.
    """
    if kept_bytes <= 0:
        kept_bytes, deadline, ttl = 0, "0", ""
    elif keep_s is None:
        deadline, ttl = "+inf", ""
    else:
        deadline, ttl = repr(time.time() + keep_s), str(math.ceil(keep_s) + 60)
    client.eval(
        SETTLE_HELD_LUA,
        4,
        owner_held_key(owner),
        owner_held_bytes_key(owner),
        owner_held_total_key(owner),
        input_key(job_id),
        job_id,
        str(kept_bytes),
        deadline,
        ttl,
    )


# -- service-wide job metrics, kept in Redis so that every gateway exports the same ------

JOB_METRICS_KEY = KEY_PREFIX + "metrics:jobs"
"""Hash: `ended:<status>` counters, and per histogram `<name>:in:<bound>` (observations
in that bucket alone, `+Inf` for those above the last bound) and `<name>:sum`, written by
workers as jobs end; gateways sum the buckets into Prometheus' cumulative ones at scrape
time, so a job's end costs one increment per histogram, not one per bucket."""

DURATION_BUCKETS_S: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
"""Upper bounds of the job duration histograms, in seconds (Prometheus `le`)."""

JOB_HISTOGRAMS = ("queue_wait", "run")
"""Histograms kept per job: seconds queued before a worker took it, and seconds running."""


def histogram_bound(seconds: float) -> str:
    """The label of the one bucket an observation falls in: its smallest upper bound."""
    return next((f"{bound:g}" for bound in DURATION_BUCKETS_S if seconds <= bound), "+Inf")


def histogram_field(name: str, seconds: float) -> str:
    """The field one observation of histogram `name` increments."""
    return f"{name}:in:{histogram_bound(seconds)}"


# -- what a job stores in Redis and costs on a GPU, from its parameters -----------------
#
# Computed by the gateway at submit, so that a job's bytes and GPU time are bounded per job
# and per key before anything is queued. Model facts come from a live worker's ModelInfo;
# without one, the widest supported model is assumed.

FALLBACK_LATENT_CHANNELS = 4
"""Latent channels assumed without a live worker (every SD 1.x/2.x VAE has 4)."""
FALLBACK_VAE_SCALE_FACTOR = 8
"""Pixels per latent pixel, per side, assumed without a live worker."""
FALLBACK_TEXT_HIDDEN_SIZE = 1024
"""Text embedding width assumed without a live worker: SD 2.x's, the widest supported."""
FALLBACK_TOKENS = 77
"""Tokens per prompt assumed without a live worker: CLIP's."""

RECORD_BYTES = 8192
"""The job hash, RQ's bookkeeping and the fixed part of the result metadata."""
METADATA_BYTES_PER_STEP = 64
"""Per step, the metadata's lists at their longest: timestep, refinement iterations and
residual, null-text loss."""
METADATA_BYTES_PER_CHAR = 12
"""A prompt character in JSON at worst: an astral code point as two `\\uXXXX` escapes."""
METADATA_COPIES = 3
"""The result metadata is stored three times: the safetensors header, the job's meta and
RQ's result entry."""


class StoredBytes(NamedTuple):
    """The most bytes a job keeps in Redis, by what holds them."""

    input: int
    """The normalised RGB upload, until the job ends."""
    latents: int
    """`latents` and `timesteps` of the result."""
    trajectory: int
    """`trajectory`: every step's latent (return_trajectory)."""
    null_embeddings: int
    """`null_embeddings`: one unconditional embedding per step (method null_text)."""
    reconstruction: int
    """The reconstruction PNG (verify), at its largest: incompressible pixels."""
    records: int
    """The metadata copies, the job hash and its parameters."""

    @property
    def total(self) -> int:
        return sum(self)

    @property
    def largest_field(self) -> str:
        """The parameter that drives the largest part, for an error to name."""
        parts = {
            "resolution": self.input + self.latents,
            "return_trajectory": self.trajectory,
            "method": self.null_embeddings,
            "verify": self.reconstruction,
            "prompt": self.records,
        }
        return max(parts, key=lambda name: parts[name])


def result_element_bytes(params: InversionParams, model: ModelInfo | None) -> int:
    """Bytes per value of the result's tensors: float16 when asked; else float32, or float64
    from a float64 model (the engine's rule; assumed without a live worker)."""
    if params.result_dtype == "float16":
        return 2
    return 4 if model is not None and model.dtype != "float64" else 8


def png_bytes_bound(width: int, height: int) -> int:
    """The largest RGB PNG of this size: every row (a filter byte and the pixels) stored
    uncompressed, plus deflate's block headers, the chunk headers and the fixed chunks."""
    raw = height * (1 + 3 * width)
    return raw + raw // 1000 + 1024


def stored_bytes(
    params: InversionParams,
    model: ModelInfo | None,
    input_size: tuple[int, int],
    size: tuple[int, int],
) -> StoredBytes:
    """The most a job keeps in Redis: its input (`input_size`, width x height as stored) and
    its worst-case result at `size` (the resolution the worker inverts at)."""
    channels = model.latent_channels if model else FALLBACK_LATENT_CHANNELS
    factor = model.vae_scale_factor if model else FALLBACK_VAE_SCALE_FACTOR
    hidden = (model.text_hidden_size if model else None) or FALLBACK_TEXT_HIDDEN_SIZE
    tokens = model.tokenizer_max_length if model else FALLBACK_TOKENS
    element = result_element_bytes(params, model)
    steps = params.num_inference_steps
    latent = channels * (size[0] // factor) * (size[1] // factor) * element
    scheduler_text = len(json.dumps(params.scheduler))
    if model is not None:
        scheduler_text += len(json.dumps(model.scheduler_config))
    prompts = len(params.prompt) + len(params.negative_prompt)
    # The scheduler config is JSON inside the header's JSON: each quote escaped, twice as long.
    metadata = METADATA_BYTES_PER_STEP * steps + METADATA_BYTES_PER_CHAR * prompts
    metadata += 2 * scheduler_text
    return StoredBytes(
        input=input_size[0] * input_size[1] * 3,
        latents=latent + 8 * steps,  # timesteps: int64
        trajectory=(steps + 1) * latent if params.return_trajectory else 0,
        null_embeddings=steps * tokens * hidden * element if params.method == "null_text" else 0,
        reconstruction=png_bytes_bound(*size) if params.verify else 0,
        records=RECORD_BYTES + METADATA_COPIES * metadata + len(params.model_dump_json()),
    )


NULL_TEXT_CALLS_PER_INNER_STEP = 3
"""A null-text inner step: one UNet forward and its backward, about two forwards."""


def unet_calls(params: InversionParams) -> int:
    """UNet image-calls of one job at most (refinement and null-text never stop early):

    - ddim: steps x (2 under guidance) x (1 + refine_iterations);
    - null_text: the pivot, steps x (1 + refine_iterations) at guidance 1, then per step one
      conditional call, the inner steps' forward and backward passes and the step itself;
    - verify: one more sampling pass, steps x (2 under guidance).
    """
    steps = params.num_inference_steps
    passes = 2 if params.uses_guidance else 1
    refined = 1 + params.refine_iterations
    if params.method == "null_text":
        inner = NULL_TEXT_CALLS_PER_INNER_STEP * params.null_text_inner_steps
        calls = steps * refined + steps * (1 + inner + 1)
    else:
        calls = steps * passes * refined
    if params.verify:
        calls += steps * passes
    return calls


def job_cost(params: InversionParams, model: ModelInfo | None, size: tuple[int, int]) -> int:
    """GPU work of a job: UNet image-calls times latent pixels at `size`. The VAE's encode
    (and verify's decode) are not counted: one each per job, bounded by the resolution."""
    factor = model.vae_scale_factor if model else FALLBACK_VAE_SCALE_FACTOR
    return unet_calls(params) * (size[0] // factor) * (size[1] // factor)
