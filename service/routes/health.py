"""Probes and metrics: liveness without Redis, readiness with Redis and a live worker."""

from __future__ import annotations

import time

from fastapi import APIRouter, Response

from ddim_inversion.errors import ErrorCode
from service import jobs
from service.deps import MetricsDep, QueueDep, RedisDep, SettingsDep
from service.errors import PROBLEM_MEDIA_TYPE, RETRY_AFTER_S, ProblemError
from service.schemas import Health, Readiness, WorkerView

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    """Touches nothing else: a Redis outage must not make the orchestrator restart gateways."""
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: Redis answers and a worker has a model loaded",
    responses={503: {"description": "Not ready", "content": {PROBLEM_MEDIA_TYPE: {}}}},
)
def readyz(redis: RedisDep, settings: SettingsDep) -> Readiness:
    """Ready only when a submitted job can actually run: Redis up and a fresh worker."""
    redis.ping()
    workers = jobs.live_workers(redis, settings.worker_stale_s)
    if not workers:
        raise ProblemError(
            503,
            ErrorCode.SERVICE_UNAVAILABLE,
            f"no worker has sent a heartbeat in the last {settings.worker_stale_s:g} s",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    now = time.time()
    return Readiness(
        workers=[
            WorkerView(
                name=w.name, model=w.model.name, heartbeat_age_s=round(now - w.heartbeat_at, 3)
            )
            for w in workers
        ]
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
def metrics(
    metrics: MetricsDep, redis: RedisDep, queue: QueueDep, settings: SettingsDep
) -> Response:
    """Request counters plus queue and RQ registry gauges read from Redis at scrape time."""
    body = metrics.render(redis, queue, settings.worker_stale_s)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
