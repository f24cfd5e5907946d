"""Prometheus metrics of one app, in its own registry (several apps may share a process).

Request counts come from a small ASGI middleware. Jobs end inside workers, and gateways
are many, so job outcomes and durations are counted by the workers in one Redis hash and
every gateway exports them at scrape time, together with the queue depth, the size of
each RQ registry, the live workers and their throughput, and the failed jobs by code.
Every gateway replica therefore exports the same service-wide values for these: aggregate
them across replicas with `max`, never `sum` (docker/monitoring/ does).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ddim_inversion.contract import JobStatus
from ddim_inversion.errors import ErrorCode
from ddim_inversion.job_metrics import DURATION_BUCKETS_S
from ddim_inversion.keys import (
    GPU_SECONDS_KEY,
    JOB_METRICS_KEY,
    THROUGHPUT_KEY,
    WORKERS_KEY,
    model_job_metrics_key,
)
from service import pool, rq_adapter, views, workers
from service.rq_adapter import Queue
from service.settings import GatewaySettings

HISTOGRAMS: tuple[tuple[str, str], ...] = (
    ("queue_wait", "Seconds a job waited in the queue before a worker took it."),
    ("run", "Seconds a job ran on a worker, batch included."),
)
"""The job duration histograms workers record (job_metrics.JOB_HISTOGRAMS), described."""


def _fields(raw: dict[Any, Any]) -> dict[str, float]:
    return {_text(k): float(v) for k, v in raw.items()}


class JobMetricsCollector(Collector):
    """Jobs by final state and job duration histograms, as all workers recorded them: for
    the whole service, and per known model (`inversion_model_*`, labelled `model`); and the
    GPU seconds per API key (`inversion_gpu_seconds_total`, labelled `owner`).

    Workers count each job's end in Redis hashes (JOB_METRICS_KEY, model_job_metrics_key),
    so every gateway replica exports the same service-wide figures, read at scrape time.
    Only models a worker announced get series: a job cannot invent a label.
    """

    def __init__(self) -> None:
        self.scrape: tuple[redis.Redis, Sequence[str]] | None = None

    def collect(self) -> Iterator[Any]:
        if self.scrape is None:
            return
        connection, models = self.scrape
        pipe = connection.pipeline(transaction=False)
        pipe.hgetall(GPU_SECONDS_KEY)
        pipe.hgetall(JOB_METRICS_KEY)
        for model in models:
            pipe.hgetall(model_job_metrics_key(model))
        gpu, total, *per_model = [_fields(raw) for raw in pipe.execute()]
        yield from self._families("inversion_", [], [([], total)])
        rows = [([model], fields) for model, fields in zip(models, per_model, strict=True)]
        yield from self._families("inversion_model_", ["model"], rows)
        # Owners come from authenticated keys (their short hash), so they are bounded by the
        # configured keys: a job cannot invent a label.
        seconds = CounterMetricFamily(
            "inversion_gpu_seconds",
            "Seconds of model calls run for each API key (owner: the first 12 hex digits of "
            "its SHA-256), a batch's time split between its rows by their UNet calls.",
            labels=["owner"],
        )
        for owner, value in sorted(gpu.items()):
            seconds.add_metric([owner], value)
        yield seconds

    @staticmethod
    def _families(
        prefix: str, labels: list[str], rows: list[tuple[list[str], dict[str, float]]]
    ) -> Iterator[Any]:
        ended = CounterMetricFamily(
            f"{prefix}jobs_ended", "Jobs that ended, by final status.", labels=[*labels, "status"]
        )
        for values, fields in rows:
            for status in ("succeeded", "failed", "canceled"):
                ended.add_metric([*values, status], fields.get(f"ended:{status}", 0.0))
        yield ended
        bounds = [f"{b:g}" for b in DURATION_BUCKETS_S] + ["+Inf"]
        for name, meaning in HISTOGRAMS:
            family = HistogramMetricFamily(
                f"{prefix}job_{name}_seconds", meaning, labels=labels or None
            )
            for values, fields in rows:
                buckets, below = [], 0.0
                for bound in bounds:  # Prometheus buckets are cumulative; the hash's are not
                    below += fields.get(f"{name}:in:{bound}", 0.0)
                    buckets.append((bound, below))
                family.add_metric(values, buckets, fields.get(f"{name}:sum", 0.0))
            yield family


FAILED_SCAN_LIMIT = 1000
"""Most failed jobs of one queue a scrape classifies by code: the newest ones. Each is read
once per gateway process (its code never changes), so a scrape costs one ZREVRANGE plus the
jobs that failed since the last one."""


@dataclass(frozen=True)
class Failure:
    """What a failed job contributes to the failure series."""

    code: str
    failed_at: float | None


class PoolCollector(Collector):
    """Series whose labels come and go with the pool, read from Redis at scrape time.

    Per model and its queue: jobs queued and running (RQ's started registry), its live
    workers, the estimated wait of a job submitted now, and the failed jobs still held
    (failure TTL) by code with the time of the latest failure of each code. Per live
    worker: its images/s. Yielded afresh at each scrape, so a worker that left or a code
    no longer held leaves no stale series behind.
    """

    def __init__(self) -> None:
        self.scrape: tuple[redis.Redis, Sequence[tuple[str, Queue]], float] | None = None
        self._failures: dict[str, Failure] = {}

    def collect(self) -> Iterator[Any]:
        if self.scrape is None:
            return
        connection, queues, stale_s = self.scrape
        pipe = connection.pipeline(transaction=False)
        for _model, queue in queues:
            pipe.llen(rq_adapter.queue_key(queue))
            pipe.zcard(rq_adapter.started_key(queue))
            pipe.zrevrange(rq_adapter.failed_key(queue), 0, FAILED_SCAN_LIMIT - 1)
        pipe.hgetall(WORKERS_KEY)
        pipe.hgetall(THROUGHPUT_KEY)
        *per_queue, raw_workers, raw_rates = pipe.execute()
        rates = workers.rates_by_worker(raw_rates)

        per_worker = GaugeMetricFamily(
            "inversion_worker_images_per_second",
            "Images per second of each live worker (its moving average over recent batches).",
            labels=["worker", "model"],
        )
        model_rates: dict[str, float] = {}
        model_workers: dict[str, int] = {}
        for record in workers.fresh_workers(raw_workers, stale_s):
            model = record.model.name
            model_workers[model] = model_workers.get(model, 0) + 1
            rate = rates.get(record.name)
            if rate is not None:
                per_worker.add_metric([record.name, model], rate)
                model_rates[model] = model_rates.get(model, 0.0) + rate
        yield per_worker
        serving = GaugeMetricFamily(
            "inversion_model_live_workers",
            "Live workers serving each known model; 0: its jobs wait until one starts.",
            labels=["model"],
        )
        for model, _queue in queues:
            serving.add_metric([model], model_workers.get(model, 0))
        yield serving

        depth = GaugeMetricFamily(
            "inversion_queue_jobs",
            "Jobs of each queue by state: queued (waiting) and running (RQ's started "
            "registry). Their sum is the work the pool still owes: what workers scale on.",
            labels=["queue", "model", "state"],
        )
        wait = GaugeMetricFamily(
            "inversion_queue_estimated_wait_seconds",
            "Seconds until a job submitted now would have run: the queued jobs and it, over "
            "the live workers' images/s of its model; absent while none has a measured rate.",
            labels=["queue", "model"],
        )
        failed = GaugeMetricFamily(
            "inversion_failed_jobs",
            "Failed jobs still held (INVERSION_FAILURE_TTL_S), by failure code.",
            labels=["queue", "model", "code"],
        )
        last = GaugeMetricFamily(
            "inversion_last_failure_timestamp_seconds",
            "Unix time of the latest failure of each code among the failed jobs held.",
            labels=["queue", "model", "code"],
        )
        held: dict[str, Failure] = {}
        for index, (model, queue) in enumerate(queues):
            queued, running, failed_ids = per_queue[3 * index : 3 * index + 3]
            name = rq_adapter.queue_name(queue)
            depth.add_metric([name, model, "queued"], queued)
            depth.add_metric([name, model, "running"], running)
            estimate = workers.estimate_wait_s(queued, model_rates.get(model))
            if estimate is not None:
                wait.add_metric([name, model], estimate)
            counts: dict[str, int] = {}
            latest: dict[str, float] = {}
            for failure in self._classify(connection, [_text(i) for i in failed_ids], held):
                counts[failure.code] = counts.get(failure.code, 0) + 1
                if failure.failed_at is not None:
                    latest[failure.code] = max(latest.get(failure.code, 0.0), failure.failed_at)
            for code, count in sorted(counts.items()):
                failed.add_metric([name, model, code], count)
            for code, moment in sorted(latest.items()):
                last.add_metric([name, model, code], moment)
        self._failures = held  # forget jobs no longer in any failed registry
        yield depth
        yield wait
        yield failed
        yield last

    def _classify(
        self, connection: redis.Redis, job_ids: list[str], held: dict[str, Failure]
    ) -> Iterator[Failure]:
        """Each failed job's code (as its status shows it) and time, read once per process."""
        unknown = [job_id for job_id in job_ids if job_id not in self._failures]
        for job in rq_adapter.fetch_many(connection, unknown):
            if job is None:  # expired while still listed: RQ cleans registries lazily
                continue
            error = views.job_error(job, JobStatus.FAILED)
            code = error.code.value if error is not None else ErrorCode.INTERNAL.value
            self._failures[job.id] = Failure(code, rq_adapter.failed_at(job))
        for job_id in job_ids:
            if job_id in self._failures:
                held[job_id] = self._failures[job_id]
                yield held[job_id]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
            "Jobs waiting in the RQ queues of every model, read at scrape time.",
            registry=self.registry,
        )
        self.registry_jobs = Gauge(
            "inversion_rq_registry_jobs",
            "Jobs in each RQ registry (started, finished, failed, canceled, deferred, "
            "scheduled) of every model's queue, read at scrape time; finished and failed "
            "forget jobs after their TTL.",
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
        self.pool = PoolCollector()
        self.registry.register(self.pool)
        # The scrape-time collectors hold one scrape's connection: one scrape at a time.
        self._scraping = threading.Lock()

    def render(self, connection: redis.Redis, settings: GatewaySettings) -> bytes:
        """Refresh the scrape-time gauges from Redis, then serialise everything."""
        with self._scraping:
            return self._render(connection, settings)

    def _render(self, connection: redis.Redis, settings: GatewaySettings) -> bytes:
        known, live = pool.read_pool(connection, settings.worker_stale_s)
        models = sorted({*known, *([settings.default_model] if settings.default_model else [])})
        queues = [(model, pool.model_queue(connection, settings, model)) for model in models]
        self.queue_depth.set(sum(rq_adapter.queue_depth(queue) for _model, queue in queues))
        totals: dict[str, int] = {}
        for _model, queue in queues:
            for name, count in rq_adapter.registry_counts(queue).items():
                totals[name] = totals.get(name, 0) + count
        for name, count in totals.items():
            self.registry_jobs.labels(name).set(count)
        self.live_workers.set(len(live))
        self.jobs.scrape = (connection, models)
        self.pool.scrape = (connection, queues, settings.worker_stale_s)
        try:
            return generate_latest(self.registry)
        finally:
            self.jobs.scrape = None
            self.pool.scrape = None


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
