"""The gateway's settings: every limit it enforces, read once from `INVERSION_*` variables.

Nothing else in the gateway reads the environment. `create_app` takes them once (its
argument, or `get_settings()`) and keeps them on `app.state`, where routes read them.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ddim_inversion import imaging, scheduler_config, webhook_policy
from ddim_inversion.keys import QUEUE_NAME
from ddim_inversion.params import MODEL_NAME_PATTERN


class GatewaySettings(BaseSettings):
    """Limits and connections of one gateway replica; all replicas should share them."""

    model_config = SettingsConfigDict(env_prefix="INVERSION_", extra="ignore", frozen=True)

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="The Redis that holds the queue and results.",
    )
    queue_name: str = Field(
        default=QUEUE_NAME,
        description="Prefix of the RQ queues: a model's jobs wait in `<queue_name>:<model>`, "
        "which the workers serving that model drain.",
    )
    default_model: str = Field(
        default="",
        pattern=r"^$|" + MODEL_NAME_PATTERN,
        description="The model a job that names none runs on, queued even before any worker "
        "announced it; empty: the one model the pool serves, and 422 (`model`) while it "
        "serves several or none.",
    )
    host: str = Field(default="127.0.0.1", description="Interface `ddim-invert gateway` binds to.")
    port: int = Field(
        default=8000, ge=1, le=65535, description="Port `ddim-invert gateway` binds to."
    )
    http_workers: int = Field(
        1, ge=1, le=64, description="uvicorn worker processes of one gateway."
    )
    max_retries: int = Field(
        2, ge=0, le=10, description="How often a job whose worker died is run again."
    )
    max_upload_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1, description="Largest image upload, in bytes (413 above)."
    )
    max_pixels: int = Field(
        default=imaging.DEFAULT_MAX_PIXELS,
        ge=1,
        description="Largest width x height an upload may declare (413 above, before decoding).",
    )
    decode_workers: int = Field(
        default=2,
        ge=1,
        description="Image decoder processes of one gateway process: uploads are decoded in "
        "them, never in a request thread.",
    )
    max_decodes_per_key: int = Field(
        default=1,
        ge=1,
        description="Image decodes one API key may have waiting or running at once, per "
        "gateway process (429 `rate_limited` above); keep it below decode_workers.",
    )
    decode_cpu_s: int = Field(
        default=10,
        ge=1,
        description="CPU seconds one image's decode may use: past them its decoder process "
        "is killed and replaced (422 `invalid_input`, field `image`).",
    )
    decode_memory_bytes: int = Field(
        default=imaging.DEFAULT_MAX_DECODE_BYTES,
        ge=16 * 1024 * 1024,
        description="Memory one image's decode may use: an image whose mode and size need "
        "more is refused from its header (413 `image_too_large`); a decoder process whose "
        "allocations pass it (address-space limit) ends, 422 `invalid_input`.",
    )
    decode_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Wall-clock seconds one image's decode may take before its decoder "
        "process is killed (422 `invalid_input`); the CPU limit ends it first unless the "
        "machine is starved.",
    )
    max_jpeg_scans: int = Field(
        default=imaging.DEFAULT_MAX_JPEG_SCANS,
        ge=1,
        description="Most scans a JPEG may hold (progressive ones have about 10; each scan "
        "costs a pass over every pixel): 422 `invalid_input` above, before decoding.",
    )
    max_image_frames: int = Field(
        default=imaging.DEFAULT_MAX_FRAMES,
        ge=1,
        description="Most frames an APNG or WebP may declare (only the first is used): 422 "
        "`invalid_input` above, before decoding.",
    )
    max_steps: int = Field(
        default=1000, ge=1, le=1000, description="Largest num_inference_steps a job may ask for."
    )
    max_train_timesteps: int = Field(
        default=scheduler_config.MAX_TRAIN_TIMESTEPS,
        ge=1,
        le=scheduler_config.MAX_TRAIN_TIMESTEPS,
        description="Largest scheduler num_train_timesteps a job may ask for, and so the "
        "longest trained_betas; every list and object of a JSON body is cut off at this "
        "many members while it is parsed (422).",
    )
    max_prompt_chars: int = Field(
        default=2000, ge=1, description="Longest prompt and negative_prompt, in characters."
    )
    prompt_overflow: Literal["truncate", "reject"] = Field(
        "truncate",
        description="A prompt over the model's token limit (77 for CLIP): truncated and "
        "reported as `truncated: true`, or refused with 422.",
    )
    max_queue_depth: int = Field(
        default=10_000,
        ge=1,
        description="Jobs waiting in the queue beyond which submissions get 429.",
    )
    job_timeout_s: int = Field(
        default=600, ge=1, description="RQ job timeout: a job running longer fails."
    )
    result_ttl_s: int = Field(
        default=86_400, ge=1, description="How long a succeeded job and its latents are kept."
    )
    failure_ttl_s: int = Field(default=86_400, ge=1, description="How long a failed job is kept.")
    redis_timeout_s: float = Field(
        default=2.0,
        gt=0,
        description="Socket connect/read timeout towards Redis (503 when exceeded).",
    )
    worker_stale_s: float = Field(
        default=30.0,
        gt=0,
        description="A worker whose last heartbeat is older than this is ignored.",
    )
    allowed_formats: tuple[str, ...] = Field(
        default=imaging.ALLOWED_FORMATS, description="Image formats accepted, as Pillow names them."
    )
    api_key_hashes: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description=(
            "Hex SHA-256 of each accepted API key (JSON list or comma-separated). Clients send "
            "the key as `Authorization: Bearer <key>` or `X-API-Key: <key>`; the key's hash "
            "owns the jobs it submits."
        ),
    )
    auth_disabled: bool = Field(
        default=False,
        description=(
            "Serve without API keys (local use only): every caller is one anonymous owner. "
            "Without it, the gateway refuses to start when no api_key_hashes are set."
        ),
    )
    metrics_token_hash: str = Field(
        default="",
        pattern=r"^$|^[0-9a-fA-F]{64}$",
        description="Hex SHA-256 of the token a scraper presents to `GET /metrics` as "
        "`Authorization: Bearer <token>`; empty: /metrics answers 401 (unless auth is "
        "disabled). API keys do not open it: it shows every tenant's queues.",
    )
    max_queued_per_key: int = Field(
        default=100,
        ge=1,
        description="Jobs one API key may have queued or running at once (429 above).",
    )
    rate_limit_per_minute: int = Field(
        default=600,
        ge=1,
        description="Submissions one API key may make per clock minute (429 above).",
    )
    max_resolution_scale: float = Field(
        default=2.0,
        ge=1.0,
        description="Largest `resolution` per side, as a multiple of the live model's native "
        "size (422 above).",
    )
    max_resolution_side: int = Field(
        default=2048,
        ge=64,
        description="Largest width or height of `resolution` whatever the model, also while "
        "no worker is alive (422 above).",
    )
    max_job_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        description="Most bytes one job may keep in Redis: its input plus its worst-case "
        "result (latents, trajectory, null embeddings, reconstruction, metadata); 422 above.",
    )
    max_job_cost: int = Field(
        default=100_000_000,
        ge=1,
        description="Most GPU work one job may ask for, in UNet image-calls x latent pixels "
        "(a 50-step guided 512x512 job with verify costs 819200); 422 above.",
    )
    max_held_bytes_per_key: int = Field(
        default=1024 * 1024 * 1024,
        ge=1,
        description="Bytes one API key's jobs may keep in Redis at once (queued inputs and "
        "unexpired results); 429 `quota_exceeded` above.",
    )
    max_queued_cost_per_key: int = Field(
        default=1_000_000_000,
        ge=1,
        description="GPU cost (as max_job_cost counts it) one API key may have queued or "
        "running at once; 429 `quota_exceeded` above.",
    )
    max_gpu_seconds_per_key: float = Field(
        default=3600.0,
        gt=0,
        description="Estimated GPU seconds (each job's cost over its model's measured "
        "cost/s) one API key may have queued or running at once; 429 `quota_exceeded` "
        "above. Jobs admitted before any worker of their model measured count 0.",
    )
    run_time_margin: float = Field(
        default=1.0,
        ge=1.0,
        description="A job is refused (422 `run_time_exceeded`) when its estimated run time "
        "(cost over the fastest live worker's measured cost/s) times this is over "
        "job_timeout_s; no check before a worker of the model measured.",
    )
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description=(
            "Browser origins allowed by CORS (JSON list or comma-separated); empty: CORS off."
        ),
    )
    cors_allow_credentials: bool = Field(
        default=False,
        description="Let browsers send credentials cross-origin (never with a `*` origin).",
    )
    max_prefer_wait_s: int = Field(
        default=60,
        ge=0,
        le=3600,
        description="Longest `Prefer: wait=N` a submission may hold its request open for.",
    )
    max_waiters_per_key: int = Field(
        default=100,
        ge=1,
        description="`Prefer: wait` submissions and event streams one API key may hold open at "
        "once, per gateway process: a stream over it gets 429, a wait over it answers 202 at "
        "once (the preference is not applied).",
    )
    max_stream_s: float = Field(
        default=900.0,
        gt=0,
        description="Longest life of one event stream: it then ends with a `reconnect` event.",
    )
    http_keepalive_s: int = Field(
        default=5,
        ge=1,
        description="An idle keep-alive connection is closed after this many seconds (set it "
        "above the load balancer's idle timeout).",
    )
    http_header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="A connection must deliver each request's line and headers within this "
        "many seconds of opening (or of the request's first byte); else it is closed.",
    )
    http_max_header_bytes: int = Field(
        default=32 * 1024,
        ge=1024,
        description="Largest request line plus headers, in bytes (431 and closed above).",
    )
    http_body_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="A request's whole body must arrive within this many seconds of its "
        "headers; else 408 and the connection is closed (its upload discarded).",
    )
    http_body_min_rate: int = Field(
        default=8 * 1024,
        ge=1,
        description="Slowest average rate, in bytes per second, at which a request body may "
        "arrive once its grace time has passed (408 and closed below).",
    )
    http_body_rate_grace_s: float = Field(
        default=10.0,
        ge=0,
        description="Seconds a request body may take before http_body_min_rate applies.",
    )
    http_linger_s: float = Field(
        default=2.0,
        gt=0,
        description="After an answer sent before its request's body ended (401, 404, 413, "
        "429...), the rest of the body is read and dropped for at most this many seconds "
        "before the connection is closed, so that a client still sending reads the answer.",
    )
    max_uploads_per_key: int = Field(
        default=16,
        ge=1,
        description="Request bodies one API key may be sending at once to one gateway "
        "process (429 above).",
    )
    max_upload_bytes_in_progress: int = Field(
        default=1024 * 1024 * 1024,
        ge=1,
        description="Bytes of request bodies one gateway process takes in at once, each "
        "counted at its declared length (503 with Retry-After above).",
    )
    http_max_concurrency: int = Field(
        default=1000,
        ge=1,
        description="Open connections (or requests in progress) of one gateway process beyond "
        "which uvicorn answers 503.",
    )
    http_backlog: int = Field(
        default=2048, ge=1, description="Connections the kernel queues before uvicorn accepts."
    )
    webhook_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description=(
            "Hosts a `webhook_url` may name (comma-separated; exact, or `*.suffix`); "
            "empty: webhooks are refused."
        ),
    )
    webhook_allowed_ports: Annotated[tuple[int, ...], NoDecode] = Field(
        default=webhook_policy.DEFAULT_PORTS,
        description="Ports a `webhook_url` may name (comma-separated); others: 422. Workers "
        "check their own `INVERSION_WEBHOOK_ALLOWED_PORTS` at delivery.",
    )
    webhook_allow_private: bool = Field(
        default=False,
        description="Accept a `webhook_url` whose host is a loopback, private, link-local or "
        "other non-public IP literal (tests, closed networks); off: 422.",
    )

    @field_validator("api_key_hashes", "cors_origins", "webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """A JSON list or a comma-separated string (as environment variables give them)."""
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = json.loads(text)
            else:
                value = [part for part in (p.strip() for p in text.split(",")) if part]
        if isinstance(value, (list, tuple)):
            return tuple(str(v).strip() for v in value if str(v).strip())
        return value

    @field_validator("webhook_allowed_ports", mode="before")
    @classmethod
    def _ports(cls, value: Any) -> Any:
        return webhook_policy.parse_ports(value)

    @field_validator("api_key_hashes")
    @classmethod
    def _hex_sha256(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """Each hash is 64 hex digits, compared in lower case."""
        hashes = tuple(v.lower() for v in value)
        bad = [v for v in hashes if not _SHA256_HEX.fullmatch(v)]
        if bad:
            raise ValueError(
                f"{len(bad)} entries are not a hex SHA-256 (64 hex digits); store the "
                "hash of each key, never the key itself"
            )
        return hashes

    @model_validator(mode="after")
    def _no_wildcard_with_credentials(self) -> GatewaySettings:
        if self.cors_allow_credentials and "*" in self.cors_origins:
            raise ValueError(
                "cors_origins '*' together with cors_allow_credentials=true would let any "
                "site act with a user's credentials; list the allowed origins explicitly"
            )
        return self

    @model_validator(mode="after")
    def _one_job_fits_its_keys_budget(self) -> GatewaySettings:
        for job, key in (
            ("max_job_bytes", "max_held_bytes_per_key"),
            ("max_job_cost", "max_queued_cost_per_key"),
        ):
            if getattr(self, job) > getattr(self, key):
                raise ValueError(
                    f"{job} is above {key}: a job allowed alone could never be admitted"
                )
        return self

    @model_validator(mode="after")
    def _one_long_job_fits_its_keys_gpu_budget(self) -> GatewaySettings:
        # A job admitted runs at most job_timeout_s by its estimate (run_time_margin >= 1).
        if self.max_gpu_seconds_per_key < self.job_timeout_s:
            raise ValueError(
                "max_gpu_seconds_per_key is below job_timeout_s: a job allowed alone could "
                "never be admitted"
            )
        return self

    @model_validator(mode="after")
    def _one_body_fits_the_upload_budget(self) -> GatewaySettings:
        # The largest body is a JSON one: the image's base64 (4/3) plus the fields, under 2x.
        if self.max_upload_bytes_in_progress < 2 * self.max_upload_bytes:
            raise ValueError(
                "max_upload_bytes_in_progress is below twice max_upload_bytes: the largest "
                "body allowed alone (a JSON one, base64) could never be admitted"
            )
        return self

    @property
    def input_ttl_s(self) -> int:
        """How long a job's input is kept: long enough to wait, run and be retried."""
        return self.job_timeout_s + self.result_ttl_s

    def require_auth_configured(self) -> None:
        """Raise unless API keys are configured or auth is explicitly disabled (startup)."""
        if not self.auth_disabled and not self.api_key_hashes:
            raise RuntimeError(
                "no API keys are configured: set INVERSION_API_KEY_HASHES or "
                "INVERSION_AUTH_DISABLED=true for local use"
            )


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@lru_cache
def get_settings() -> GatewaySettings:
    """The process's settings from the environment, validated once."""
    return GatewaySettings()
