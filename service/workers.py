"""The worker pool as a gateway reads it: live workers, their throughput, the capacity.

Workers publish a record (WORKERS_KEY) with a heartbeat and, after each batch, their
images and job cost per second (THROUGHPUT_KEY); a record older than `INVERSION_WORKER_STALE_S` is a
worker gone. Nothing here decides whether the gateway serves: submissions queue while no
worker is alive, and capacity is reported per model (service/pool.py: /v1/models,
/v1/capacity; /metrics).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import redis
from pydantic import ValidationError

from ddim_inversion.contract import WorkerRecord
from ddim_inversion.keys import THROUGHPUT_KEY, WORKERS_KEY
from service.schemas import WorkerView

logger = logging.getLogger(__name__)


def fresh_workers(raw_records: Mapping[Any, Any], stale_s: float) -> list[WorkerRecord]:
    """`live_workers` from a WORKERS_KEY hash already read (e.g. in a caller's pipeline)."""
    now = time.time()
    records = []
    for name, raw in raw_records.items():
        try:
            record = WorkerRecord.model_validate_json(raw)
        except ValidationError:
            logger.warning("ignoring unreadable worker record %r", name)
            continue
        if now - record.heartbeat_at <= stale_s:
            records.append(record)
    return sorted(records, key=lambda r: r.heartbeat_at, reverse=True)


def live_workers(connection: redis.Redis, stale_s: float) -> list[WorkerRecord]:
    """Workers whose heartbeat is fresher than `stale_s`, the most recent first."""
    return fresh_workers(connection.hgetall(WORKERS_KEY), stale_s)


def images_per_s(raw: Any) -> float | None:
    """The `images_per_s` of one THROUGHPUT_KEY value, if readable, finite and positive."""
    return _rate(raw, "images_per_s")


def cost_per_s(raw: Any) -> float | None:
    """The `cost_per_s` (job_cost per second) of one THROUGHPUT_KEY value, if readable,
    finite and positive."""
    return _rate(raw, "cost_per_s")


def _rate(raw: Any, field: str) -> float | None:
    if raw is None:
        return None
    try:
        rate = float(json.loads(raw)[field])
    except (ValueError, KeyError, TypeError):
        return None
    return rate if math.isfinite(rate) and rate > 0 else None


def model_cost_rate(
    connection: redis.Redis, live: Iterable[WorkerRecord], model: str
) -> float | None:
    """The fastest cost/s measured by a live worker of `model` (a job runs on one worker);
    None until one of them has run a batch."""
    names = [record.name for record in live if record.model.name == model]
    if not names:
        return None
    rates = [cost_per_s(raw) for raw in connection.hmget(THROUGHPUT_KEY, names)]
    return max((rate for rate in rates if rate is not None), default=None)


def rates_by_worker(raw_rates: Mapping[Any, Any]) -> dict[str, float | None]:
    """A THROUGHPUT_KEY hash already read, by worker name."""
    return {text(name): images_per_s(raw) for name, raw in raw_rates.items()}


def summed_rate(rates: Iterable[float | None]) -> float | None:
    """The pool's images per second: the sum of the known rates; None when none is."""
    return sum(rate for rate in rates if rate is not None) or None


def estimate_wait_s(position: int | None, images_per_s: float | None) -> float | None:
    """Seconds until a job at 0-based `position` has run: (position + 1) / throughput."""
    if position is None or position < 0 or not images_per_s or images_per_s <= 0:
        return None
    return round((position + 1) / images_per_s, 3)


def worker_view(record: WorkerRecord, now: float) -> WorkerView:
    return WorkerView(
        name=record.name,
        model=record.model.name,
        heartbeat_age_s=round(now - record.heartbeat_at, 3),
    )


def text(value: bytes | str) -> str:
    """A Redis reply as text."""
    return value.decode() if isinstance(value, bytes) else value
