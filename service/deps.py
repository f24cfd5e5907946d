"""Annotated dependencies, so that route signatures read like prose.

`OwnerDep` is where authentication will plug in: today every caller is the anonymous
owner "", and every job lookup already compares it with the job's recorded owner.
"""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import Depends, Request
from rq import Queue
from rq.serializers import JSONSerializer

from service.metrics import GatewayMetrics
from service.settings import GatewaySettings, get_settings


def get_redis(request: Request) -> redis.Redis:
    """The client the lifespan opened; tests override this with a FakeRedis."""
    return request.app.state.redis


SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]


def get_queue(connection: RedisDep, settings: SettingsDep) -> Queue:
    """The RQ queue, with the JSON serializer the contract mandates (never pickle)."""
    return Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)


def get_owner() -> str:
    """The caller's owner id (a hash of its API key once auth exists); "" means anonymous."""
    return ""


def get_metrics(request: Request) -> GatewayMetrics:
    """The metrics of the app serving this request (each app has its own registry)."""
    return request.app.state.metrics


QueueDep = Annotated[Queue, Depends(get_queue)]
MetricsDep = Annotated[GatewayMetrics, Depends(get_metrics)]
OwnerDep = Annotated[str, Depends(get_owner)]
