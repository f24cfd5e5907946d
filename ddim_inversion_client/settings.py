"""The client's settings, read from INVERSION_CLIENT_* environment variables."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseSettings):
    """Defaults of `InversionClient`, `AsyncInversionClient` and `ddim-invert submit`."""

    model_config = SettingsConfigDict(env_prefix="INVERSION_CLIENT_", extra="ignore", frozen=True)

    url: str = Field("http://127.0.0.1:8000", description="Base URL of the gateway.")
    api_key: SecretStr | None = Field(
        None, description="API key sent as `Authorization: Bearer <key>`; none: no header."
    )
    timeout_s: float = Field(30.0, gt=0, description="Timeout of one HTTP request, in seconds.")
    max_retries: int = Field(
        5,
        ge=0,
        description="Retries of a request answered 429 or 503, or that could not connect.",
    )
    backoff_s: float = Field(
        0.5,
        ge=0,
        description=(
            "First retry delay, doubled on each retry; a `Retry-After` header takes precedence."
        ),
    )
