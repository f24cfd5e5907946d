"""The FastAPI application: `create_app` wires settings, Redis, errors, metrics and routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import Gauge

from service import decode_pool, redis_conn
from service.auth_middleware import ApiKeyMiddleware
from service.body_limit import BodyLimitMiddleware
from service.errors import install_error_handlers
from service.metrics import GatewayMetrics, RequestMetricsMiddleware
from service.redirects import RelativeSlashRedirectMiddleware
from service.routes import (
    capacity,
    downloads,
    events,
    health,
    inversions,
    models,
    page,
    status,
)
from service.settings import GatewaySettings, get_settings
from service.upload_budget import UploadBudget, UploadBudgetMiddleware

CORS_REQUEST_HEADERS = ("Idempotency-Key", "Prefer", "Last-Event-ID")
"""Protocol headers a browser front end sends (see service/protocol.py)."""

CORS_RESPONSE_HEADERS = ("Preference-Applied", "Idempotent-Replayed")
"""Protocol headers a browser front end must be able to read."""

FORM_OVERHEAD_BYTES = 64 * 1024
"""Room for the multipart boundaries and the text fields besides the image itself."""

DESCRIPTION = """
DDIM inversion of real images under a text prompt with a Stable Diffusion model.

Submit an image with `POST /v1/inversions` (multipart, or JSON with the image as base64),
poll `GET /v1/inversions/{id}`, download `GET /v1/inversions/{id}/latents` (safetensors
or `?format=npy`). Errors are RFC 9457 `application/problem+json` with a stable `code`.
"""


def _open_waits(app: FastAPI) -> int:
    listener = getattr(app.state, "listener", None)  # None until the lifespan started
    return listener.open_waits if listener is not None else 0


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Redis's clients and the job-events listener (service/redis_conn.py), then the image
    decoders (service/decode_pool.py); all stopped at shutdown."""
    async with (
        redis_conn.lifespan(app),
        decode_pool.running(app.state.settings) as decoders,
    ):
        app.state.decoders = decoders
        try:
            yield
        finally:
            app.state.decoders = None


def create_app(
    settings: GatewaySettings | None = None,
    redis: Any = None,
    async_redis: Any = None,
) -> FastAPI:
    """A new app over `settings` (default: the environment's, `get_settings`).

    `redis` and `async_redis` are the blocking and asyncio clients the lifespan would
    otherwise open from `redis_url` (given ones are not closed at shutdown): the one way
    tests and embedders give the app theirs. Everything lives on `app.state`, where the
    dependencies (service/deps.py) read it. The lifespan refuses to start without API keys
    unless auth is disabled, and on a Redis that may evict keys.
    """
    app = FastAPI(
        title="DDIM inversion service",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app_settings = settings if settings is not None else get_settings()
    app.state.settings = app_settings
    app.state.redis = redis
    app.state.async_redis = async_redis
    app.state.metrics = GatewayMetrics()
    Gauge(
        "inversion_open_waits",
        "`Prefer: wait` submissions and event streams open in this gateway process.",
        registry=app.state.metrics.registry,
    ).set_function(lambda: _open_waits(app))
    app.state.decoders = None
    app.state.metrics.registry.register(
        decode_pool.DecodeMetrics(lambda: getattr(app.state, "decoders", None))
    )
    install_error_handlers(app)
    app.state.upload_budget = UploadBudget(
        app_settings.max_uploads_per_key, app_settings.max_upload_bytes_in_progress
    )
    # Inside the body limit: a declared length it refuses reserves nothing.
    app.add_middleware(UploadBudgetMiddleware, budget=app.state.upload_budget)
    app.add_middleware(
        BodyLimitMiddleware, max_body_bytes=app_settings.max_upload_bytes + FORM_OVERHEAD_BYTES
    )
    # Outside the body limit: a caller without a valid key is refused before any body byte.
    app.add_middleware(
        ApiKeyMiddleware,
        api_key_hashes=app_settings.api_key_hashes,
        disabled=app_settings.auth_disabled,
    )
    app.add_middleware(RelativeSlashRedirectMiddleware)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    if app_settings.cors_origins:
        # Outermost: preflights are answered before the body limit, metrics or auth.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(app_settings.cors_origins),
            allow_credentials=app_settings.cors_allow_credentials,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", *CORS_REQUEST_HEADERS],
            expose_headers=["Location", "Retry-After", *CORS_RESPONSE_HEADERS],
        )
    app.include_router(inversions.router)
    app.include_router(status.router)
    app.include_router(downloads.router)
    app.include_router(events.router)
    app.include_router(capacity.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(page.router)
    return app
