"""Annotated dependencies, so that route signatures read like prose.

Settings, the Redis clients and the listener are the app's own (`create_app` and its
lifespan put them on `app.state`); every dependency reads them from there, and tests
give theirs to `create_app`.

`OwnerDep` authenticates the caller: its value is the SHA-256 of the caller's API key (""
while auth is disabled), and every job lookup compares it with the job's recorded owner.

Every dependency here is `async def` although none awaits: FastAPI runs a plain `def`
dependency in the threadpool, a hop (~0.15 ms here) per dependency per request, for
work (a lookup, a hash) far cheaper than the hop.
"""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service import auth
from service.auth_middleware import owner_of
from service.decode_pool import DecodePool
from service.listener import JobListener
from service.metrics import GatewayMetrics
from service.settings import GatewaySettings


async def get_redis(request: Request) -> redis.Redis:
    """The app's blocking client: given to `create_app`, or opened by the lifespan."""
    return request.app.state.redis


async def get_app_settings(request: Request) -> GatewaySettings:
    """The app's settings: given to `create_app`, or the environment's (`get_settings`)."""
    return request.app.state.settings


SettingsDep = Annotated[GatewaySettings, Depends(get_app_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]


_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`")
_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="The API key, instead of a Bearer token."
)


async def get_owner(
    request: Request,
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    x_api_key: Annotated[str | None, Security(_api_key_header)],
) -> str:
    """The caller's owner id: the SHA-256 of its API key, "" while auth is disabled.

    `ApiKeyMiddleware` has already authenticated the request from its headers (before its
    body was read) and left the owner in the request's state; the check here stands in
    for an app without it. 401 (`unauthorized`, `WWW-Authenticate: Bearer`) without a key
    or with an unknown one.
    """
    owner = owner_of(request.scope)
    if owner is not None:
        return owner
    if settings.auth_disabled:
        return auth.ANONYMOUS
    authorization = f"{bearer.scheme} {bearer.credentials}" if bearer is not None else None
    return auth.authenticate(auth.presented_key(authorization, x_api_key), settings.api_key_hashes)


async def get_listener(request: Request) -> JobListener:
    """The process's job-events listener, which waits and event streams sleep on."""
    return request.app.state.listener


async def get_metrics(request: Request) -> GatewayMetrics:
    """The metrics of the app serving this request (each app has its own registry)."""
    return request.app.state.metrics


async def get_decoders(request: Request) -> DecodePool:
    """The process's image decoders (service/decode_pool.py), opened by the lifespan."""
    return request.app.state.decoders


DecodersDep = Annotated[DecodePool, Depends(get_decoders)]
MetricsDep = Annotated[GatewayMetrics, Depends(get_metrics)]
ListenerDep = Annotated[JobListener, Depends(get_listener)]
OwnerDep = Annotated[str, Depends(get_owner)]
