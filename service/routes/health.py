"""Probes and metrics: liveness without Redis, readiness with Redis (workers or not)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Response

from service import workers
from service.deps import MetricsDep, RedisDep, SettingsDep
from service.errors import PROBLEM_MEDIA_TYPE
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    """Touches nothing else: a Redis outage must not make the orchestrator restart gateways."""
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: Redis answers; the live workers, if any, are listed",
    responses={503: {"description": "Redis does not answer", "content": {PROBLEM_MEDIA_TYPE: {}}}},
)
def readyz(redis: RedisDep, settings: SettingsDep) -> Readiness:
    """Ready when the gateway can serve: its settings are valid (checked at start) and
    Redis answers. Workers do not decide it: while none is alive, submissions queue and
    every read is served, so a worker rollout or a pool scaled to zero keeps gateways in
    the load balancer. The body lists the live workers (capacity: /v1/capacity)."""
    redis.ping()
    now = time.time()
    live = workers.live_workers(redis, settings.worker_stale_s)
    return Readiness(workers=[workers.worker_view(w, now) for w in live])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}},
        503: {"description": "Redis does not answer", "content": {PROBLEM_MEDIA_TYPE: {}}},
    },
)
def metrics(metrics: MetricsDep, redis: RedisDep, settings: SettingsDep) -> Response:
    """Request counters plus queue and RQ registry gauges read from Redis at scrape time."""
    body = metrics.render(redis, settings)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
