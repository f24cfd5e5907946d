"""The gateway's Redis clients: opened by the app's lifespan, closed when it stops.

A blocking client serves the routes (in the threadpool), an asyncio client the job-events
listener and the reads of waits (service/listener.py), which hold no thread.

Responses stay bytes (`decode_responses=False`): RQ stores zlib-compressed job data and
reads it back as bytes. Short socket timeouts and no retries turn a Redis outage into a
quick 503 rather than a hung request.

At startup the lifespan also refuses a Redis that may evict keys: an evicted job hash,
input or result would vanish without a trace.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
import redis.asyncio
from fastapi import FastAPI
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.listener import JobListener
from service.settings import GatewaySettings

logger = logging.getLogger(__name__)

REQUIRED_EVICTION_POLICY = "noeviction"


def open_redis(settings: GatewaySettings) -> redis.Redis:
    """A pooled client; it connects lazily, so a gateway starts even while Redis is down.

    No retries (redis-py retries 3 times with backoff by default): one request waits at most
    about `redis_timeout_s` per command before it answers 503.
    """
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )


HEALTH_CHECK_S = 30
"""An async connection idle this long is pinged before use: the job-events subscription
stays idle for long, and a connection dropped by a proxy must be noticed."""


def open_async_redis(settings: GatewaySettings) -> redis.asyncio.Redis:
    """The asyncio twin of `open_redis`, with the same timeouts and no retries."""
    return redis.asyncio.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        socket_keepalive=True,
        health_check_interval=HEALTH_CHECK_S,
        retry=AsyncRetry(NoBackoff(), 0),
        decode_responses=False,
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check_eviction_policy(client: Any) -> str | None:
    """Raise RuntimeError unless Redis's maxmemory-policy is noeviction.

    Returns the policy, or None when it could not be read: CONFIG refused (managed Redis:
    a warning) or Redis unreachable (the gateway starts anyway; /readyz answers 503).
    """
    try:
        reply = client.config_get("maxmemory-policy")
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        logger.warning("redis is unreachable at startup (%s); starting anyway", exc)
        return None
    except redis.exceptions.ResponseError as exc:
        logger.warning(
            "cannot read redis maxmemory-policy (%s); make sure it is %s, or jobs could be "
            "silently evicted",
            exc,
            REQUIRED_EVICTION_POLICY,
        )
        return None
    values = {_text(k): _text(v) for k, v in dict(reply or {}).items()}
    policy = values.get("maxmemory-policy")
    if policy is None:
        logger.warning("redis did not report its maxmemory-policy; starting anyway")
        return None
    if policy != REQUIRED_EVICTION_POLICY:
        raise RuntimeError(
            f"redis maxmemory-policy is {policy!r}: jobs, inputs and results could be silently "
            f"evicted; set `maxmemory-policy {REQUIRED_EVICTION_POLICY}` on this Redis"
        )
    return policy


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Check the settings (`create_app` put them on `app.state`), open the clients it was
    not given, check Redis's policy; at the end stop the job-events listener and close
    what it opened."""
    settings: GatewaySettings = app.state.settings
    settings.require_auth_configured()
    given = app.state.redis is not None
    client = app.state.redis if given else open_redis(settings)
    try:
        check_eviction_policy(client)
    except BaseException:
        if not given:
            client.close()
        raise
    given_async = app.state.async_redis is not None
    async_client = app.state.async_redis if given_async else open_async_redis(settings)
    app.state.redis, app.state.async_redis = client, async_client
    app.state.listener = JobListener(async_client)
    try:
        yield
    finally:
        await app.state.listener.close()
        if not given_async:
            await async_client.aclose()
            app.state.async_redis = None
        if not given:
            client.close()
            app.state.redis = None
