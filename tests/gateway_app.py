"""The real gateway app in-process, over one fake Redis: for tests of the gateway's and
the client's handling of HTTP that need no real process (no worker, no network)."""

from __future__ import annotations

from typing import Any

import fakeredis
from fastapi import FastAPI

from service.app import create_app
from service.settings import GatewaySettings

UNUSED_REDIS_URL = "redis://unused.invalid:6379/0"
"""The settings' Redis URL: never dialled, the app is given its clients."""

DEFAULT_MODEL = "tiny"
"""The pool's default model: with no worker announcing one, jobs queue for it."""


def gateway_app(server: fakeredis.FakeServer, connection: Any = None, **overrides: Any) -> FastAPI:
    """`create_app` over `server` (its blocking client `connection`, if given); keyword
    arguments override settings fields. Auth is disabled unless `auth_disabled=False`."""
    fields = {"redis_url": UNUSED_REDIS_URL, "auth_disabled": True, "default_model": DEFAULT_MODEL}
    return create_app(
        GatewaySettings(**{**fields, **overrides}),
        redis=fakeredis.FakeRedis(server=server) if connection is None else connection,
        async_redis=fakeredis.FakeAsyncRedis(server=server),
    )
