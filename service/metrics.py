"""Prometheus metrics of one app, in its own registry (several apps may share a process).

Request counts come from a small ASGI middleware. Jobs end inside workers, and gateways
are many, so job outcomes and durations are counted by the workers in one Redis hash and
every gateway exports them at scrape time, together with the queue depth, the size of
each RQ registry and the number of live workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from rq import Queue
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import contract
from service.jobs import live_workers


class JobMetricsCollector(Collector):
    """Jobs by final state and job duration histograms, as all workers recorded them.

    Workers count each job's end in one Redis hash (contract.JOB_METRICS_KEY), so every
    gateway replica exports the same service-wide figures, read at scrape time.
    """

    def __init__(self) -> None:
        self.connection: redis.Redis | None = None

    def collect(self) -> Iterator[Any]:
        if self.connection is None:
            return
        raw = self.connection.hgetall(contract.JOB_METRICS_KEY)
        fields = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}
        ended = CounterMetricFamily(
            "inversion_jobs_ended", "Jobs that ended, by final status.", labels=["status"]
        )
        for status in ("succeeded", "failed", "canceled"):
            ended.add_metric([status], fields.get(f"ended:{status}", 0.0))
        yield ended
        for name, meaning in (
            ("queue_wait", "Seconds a job waited in the queue before a worker took it."),
            ("run", "Seconds a job ran on a worker, batch included."),
        ):
            bounds = [f"{b:g}" for b in contract.DURATION_BUCKETS_S] + ["+Inf"]
            buckets, below = [], 0.0
            for bound in bounds:  # Prometheus buckets are cumulative; the hash's are not
                below += fields.get(f"{name}:in:{bound}", 0.0)
                buckets.append((bound, below))
            yield HistogramMetricFamily(
                f"inversion_job_{name}_seconds",
                meaning,
                buckets=buckets,
                sum_value=fields.get(f"{name}:sum", 0.0),
            )


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
        self.jobs = JobMetricsCollector()
        self.registry.register(self.jobs)
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
        self.jobs.connection = connection
        try:
            return generate_latest(self.registry)
        finally:
            self.jobs.connection = None


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
