"""Probes and metrics: liveness without Redis, readiness with Redis (workers or not)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response

from service import auth
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
    summary="Readiness: Redis answers",
    responses={503: {"description": "Redis does not answer", "content": {PROBLEM_MEDIA_TYPE: {}}}},
)
def readyz(redis: RedisDep) -> Readiness:
    """Ready when the gateway can serve: its settings are valid (checked at start) and
    Redis answers. Workers do not decide it: while none is alive, submissions queue and
    every read is served, so a worker rollout or a pool scaled to zero keeps gateways in
    the load balancer. It says no more than that to a caller without a key: the live
    workers and the queues are `/v1/capacity`'s (behind the key) and `/metrics`'."""
    redis.ping()
    return Readiness()


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}},
        401: {"description": "No valid metrics token", "content": {PROBLEM_MEDIA_TYPE: {}}},
        503: {"description": "Redis does not answer", "content": {PROBLEM_MEDIA_TYPE: {}}},
    },
)
def metrics(
    metrics: MetricsDep,
    redis: RedisDep,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """Request counters plus queue and RQ registry gauges read from Redis at scrape time.

    Behind the metrics token (INVERSION_METRICS_TOKEN_HASH), not an API key: the queues
    and workers it shows are every tenant's. Open while auth is disabled."""
    if not settings.auth_disabled:
        auth.check_metrics_token(authorization, settings.metrics_token_hash)
    body = metrics.render(redis, settings)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
