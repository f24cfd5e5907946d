"""Prometheus metrics of one app, in its own registry (several apps may share a process).

Request counts come from a small ASGI middleware. Job outcomes are not counted by the
gateway (a job ends inside a worker, and gateways are many): the queue depth and the size
of each RQ registry are read from Redis at scrape time and exported as gauges. Rates of
finished/failed jobs follow from them in PromQL, keeping in mind that registries forget
jobs after their TTL.
"""

from __future__ import annotations

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from rq import Queue
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.jobs import live_workers


class GatewayMetrics:
    """The metric objects of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "inversion_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.submissions = Counter(
            "inversion_jobs_submitted",
            "Inversion jobs this gateway enqueued.",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "inversion_queue_depth",
            "Jobs waiting in the RQ queue, read at scrape time.",
            registry=self.registry,
        )
        self.registry_jobs = Gauge(
            "inversion_rq_registry_jobs",
            "Jobs in each RQ registry (started, finished, failed, canceled, deferred, "
            "scheduled), read at scrape time; finished and failed forget jobs after their TTL.",
            ["registry"],
            registry=self.registry,
        )
        self.live_workers = Gauge(
            "inversion_live_workers",
            "Workers with a fresh heartbeat, read at scrape time.",
            registry=self.registry,
        )

    def render(self, connection: redis.Redis, queue: Queue, worker_stale_s: float) -> bytes:
        """Refresh the scrape-time gauges from Redis, then serialise everything."""
        self.queue_depth.set(queue.count)
        registries = {
            "started": queue.started_job_registry,
            "finished": queue.finished_job_registry,
            "failed": queue.failed_job_registry,
            "canceled": queue.canceled_job_registry,
            "deferred": queue.deferred_job_registry,
            "scheduled": queue.scheduled_job_registry,
        }
        for name, registry in registries.items():
            # No cleanup: a scrape must not move jobs between registries.
            self.registry_jobs.labels(name).set(registry.get_job_count(cleanup=False))
        self.live_workers.set(len(live_workers(connection, worker_stale_s)))
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Counts every HTTP response by route template (not raw path: ids would explode)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(template, scope["method"], str(status)).inc()
