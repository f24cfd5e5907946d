"""The gateway's one Redis client: opened by the app's lifespan, closed when it stops.

Responses stay bytes (`decode_responses=False`): RQ stores zlib-compressed job data and
reads it back as bytes. Short socket timeouts turn a Redis outage into a quick 503 rather
than a hung request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI

from service.settings import GatewaySettings, get_settings


def open_redis(settings: GatewaySettings) -> redis.Redis:
    """A pooled client; it connects lazily, so a gateway starts even while Redis is down."""
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        decode_responses=False,
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the client with the app's settings (an override if a test installed one)."""
    settings_factory = app.dependency_overrides.get(get_settings, get_settings)
    client = open_redis(settings_factory())
    app.state.redis = client
    try:
        yield
    finally:
        client.close()
