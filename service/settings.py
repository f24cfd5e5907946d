"""The gateway's settings: every limit it enforces, read once from `INVERSION_*` variables.

Nothing else in the gateway reads the environment. Routes receive the settings through the
`get_settings` dependency, so a test (or `create_app(settings)`) can replace them whole.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

import contract
import imaging


class GatewaySettings(BaseSettings):
    """Limits and connections of one gateway replica; all replicas should share them."""

    model_config = SettingsConfigDict(env_prefix="INVERSION_", extra="ignore", frozen=True)

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="The Redis that holds the queue and results.",
    )
    queue_name: str = Field(default=contract.QUEUE_NAME, description="The RQ queue workers drain.")
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
    max_steps: int = Field(
        default=1000, ge=1, le=1000, description="Largest num_inference_steps a job may ask for."
    )
    max_prompt_chars: int = Field(
        default=2000, ge=1, description="Longest prompt and negative_prompt, in characters."
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


@lru_cache
def get_settings() -> GatewaySettings:
    """The process's settings, validated once; a FastAPI dependency that tests override."""
    return GatewaySettings()
