"""The worker's settings (and the local CLI's): one class, prefix INVERSION_, read once."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ddim_inversion import webhook_policy
from ddim_inversion.keys import QUEUE_NAME, queue_name_for
from ddim_inversion.params import MODEL_NAME_PATTERN
from worker.fair_share import parse_weights


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INVERSION_", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding the queue.")
    queue_name: str = Field(
        QUEUE_NAME,
        description="Prefix of the RQ queues: the worker drains `<queue_name>:<model_name>`.",
    )
    model: str = Field(
        "tiny",
        description="A diffusers SD 1.x/2.x or SDXL folder, a hub id, or an offline tiny model: "
        "tiny, tiny-v (v-prediction), tiny-xl (SDXL).",
    )
    model_name: str = Field(
        "",
        pattern=r"^$|" + MODEL_NAME_PATTERN,
        description="The name jobs give as `model` to run on this worker's model; empty: "
        "derived from `model` ('tiny' stays 'tiny', a folder its last part, a hub id as is).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if present.")
    dtype: Literal["auto", "float32", "float16", "bfloat16", "float64"] = Field(
        "auto", description="auto: float16 on CUDA, float32 on the CPU; float64 CPU only."
    )
    allow_download: bool = Field(
        False, description="Let a hub id that is not cached be downloaded at start-up."
    )
    model_cache_dir: Path | None = Field(
        None, description="Where the tiny model is generated; default ~/.cache/ddim-inversion."
    )
    max_batch_size: int = Field(
        0,
        ge=0,
        le=256,
        description="Most images in one UNet batch; 0: derived from free GPU memory (CPU: 8).",
    )
    max_batch_wait_ms: int = Field(
        20, ge=0, le=10_000, description="How long a worker holding one job waits for more."
    )
    fair_share_weights: str = Field(
        "",
        description="Weights of API keys in a batch's fair share of rows, `keyhash:weight,...` "
        "(a key's SHA-256 or its first 12 hex digits, the `owner` label of "
        "inversion_gpu_seconds_total; `anonymous` without auth); unlisted keys weigh 1.",
    )
    fair_share_half_life_s: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="Half-life of the recent GPU time that decides, between keys of equal "
        "share, which gets a batch's left-over rows (the least first).",
    )
    progress_every: int = Field(1, ge=1, description="Write progress to Redis every N steps.")
    cancel_check_interval_s: float = Field(
        1.0,
        ge=0,
        le=5,
        description="Cancels arrive by pub/sub and stop a job at the next step; the flags are "
        "also read from Redis this often, for a cancel published while disconnected.",
    )
    progress_interval_s: float = Field(
        0.1,
        ge=0,
        le=10,
        description="...and at most this often: fast steps do not each cost a Redis write.",
    )
    heartbeat_s: float = Field(
        2.0, gt=0, le=60, description="How often a worker proves it is alive while running jobs."
    )
    lost_after_s: float = Field(
        10.0,
        gt=0,
        description="A running job whose worker has not been heard from for this long is lost.",
    )
    redis_outage_wait_s: float = Field(
        300.0,
        ge=0,
        le=3600,
        description="How long a worker holding finished results waits for Redis to come back "
        "(or, full, to have room for them); past it the batch is given up and its jobs run "
        "again (a full Redis: they fail `storage_full`).",
    )
    compile: Literal["none", "torch", "torch-cudagraphs"] = Field(
        "none",
        description="Compile the UNet per batch-size bucket (batches padded to powers of two), "
        "warmed up before the worker reports ready; torch-cudagraphs adds CUDA graphs.",
    )
    threads: int = Field(
        0,
        ge=0,
        description="torch CPU threads; 0 leaves torch's default. Results depend on it in "
        "their last bits: give a worker and `ddim-invert local` the same count to compare.",
    )
    warmup: bool = Field(
        True,
        description="Run a short inversion before registering as ready, so that the first "
        "job does not pay for lazy initialisation.",
    )
    webhook_secret: str = Field(
        "",
        description="HMAC-SHA256 key of `X-Inversion-Signature` on webhook deliveries; "
        "empty: deliveries go unsigned.",
    )
    webhook_attempts: int = Field(
        5, ge=1, le=20, description="Tries per webhook delivery before it is dropped."
    )
    webhook_backoff_s: float = Field(
        1.0, ge=0, le=600, description="Wait before a webhook's 2nd try; doubled for each next."
    )
    webhook_timeout_s: float = Field(
        5.0,
        gt=0,
        le=60,
        description="Deadline of one webhook delivery attempt, all of it: connecting, sending "
        "and reading the answer's status and headers.",
    )
    webhook_concurrency: int = Field(
        4, ge=1, le=64, description="Webhook deliveries a worker makes at once (its threads)."
    )
    webhook_host_concurrency: int = Field(
        2,
        ge=1,
        le=64,
        description="Of those, how many may be connected to one resolved address at once, "
        "whatever names lead there: a slow receiver holds only these.",
    )
    webhook_owner_concurrency: int = Field(
        2,
        ge=1,
        le=64,
        description="Of those, how many one API key's jobs may use at once, keys taken in "
        "turn (the anonymous owner, auth disabled, is not bounded).",
    )
    webhook_allowed_ports: Annotated[tuple[int, ...], NoDecode] = Field(
        webhook_policy.DEFAULT_PORTS,
        description="Ports a webhook may be delivered to (comma-separated).",
    )
    webhook_allow_private: bool = Field(
        False,
        description="Deliver webhooks to loopback, private, link-local and other non-public "
        "addresses too (tests, closed networks); off: refused at each attempt.",
    )

    @property
    def served_model_name(self) -> str:
        """The name the worker serves its model under (`model_name`, else derived)."""
        if self.model_name:
            return self.model_name
        path = Path(self.model).expanduser()
        return path.resolve().name if path.is_dir() else self.model

    @property
    def served_queue_name(self) -> str:
        """The one queue this worker drains: its model's."""
        return queue_name_for(self.served_model_name, self.queue_name)

    @field_validator("fair_share_weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        parse_weights(value)  # refused at start-up, not at the first batch
        return value

    @field_validator("webhook_allowed_ports", mode="before")
    @classmethod
    def _ports(cls, value: Any) -> Any:
        return webhook_policy.parse_ports(value)


@lru_cache
def get_settings() -> WorkerSettings:
    return WorkerSettings()
