"""The FastAPI application: `create_app` wires settings, Redis, errors, metrics and routes."""

from __future__ import annotations

from fastapi import FastAPI

from service.body_limit import BodyLimitMiddleware
from service.errors import install_error_handlers
from service.metrics import GatewayMetrics, RequestMetricsMiddleware
from service.redis_conn import lifespan
from service.routes import health, inversions
from service.settings import GatewaySettings, get_settings

FORM_OVERHEAD_BYTES = 64 * 1024
"""Room for the multipart boundaries and the text fields besides the image itself."""

DESCRIPTION = """
DDIM inversion of real images under a text prompt with a Stable Diffusion model.

Submit an image with `POST /v1/inversions` (multipart), poll `GET /v1/inversions/{id}`,
download `GET /v1/inversions/{id}/latents` (safetensors or `?format=npy`). Errors are
RFC 9457 `application/problem+json` with a stable `code`.
"""


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """A new app; `settings` replaces the environment's (tests, embedding)."""
    app = FastAPI(
        title="DDIM inversion service",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    if settings is not None:
        app.dependency_overrides[get_settings] = lambda: settings
    effective = settings or get_settings()
    app.state.metrics = GatewayMetrics()
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware, max_body_bytes=effective.max_upload_bytes + FORM_OVERHEAD_BYTES
    )
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    app.include_router(inversions.router)
    app.include_router(health.router)
    return app
