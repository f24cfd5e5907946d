"""A batch's start and its successes, RQ's records and the service's, in one round trip each.

RQ's own worker writes a job's start in two pipelines and its success in five round trips
(a WATCH of the job's dependents among them). Around a job of a hundred milliseconds that
bookkeeping is a tenth of its latency, and a batch of eight pays it eight times. Here the
same records (rq_adapter) are written in one MULTI/EXEC per batch, together with the
service's own:

1. Start: RQ's start of each job (rq_adapter.start_jobs) and its first progress; the same
   round trip reads each job's cancel flag and input image.
2. Success: the result bytes (and reconstruction), the input and any cancel flag deleted,
   the job's meta (final progress, result metadata, engine time), RQ's success records
   (rq_adapter.record_success), the job-ended signal that waiting gateways block on, the
   service-wide job metrics, the bytes the job now holds against its key's budget, and
   this worker's throughput. One transaction: a gateway that sees `finished` always finds
   the result.

Every ended job, and everything of its, expires: a success with its result TTL, a
failure or a cancel with its failure TTL; RQ's cancel sets none, which `expire_canceled`
makes up for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from redis import Redis

from ddim_inversion.contract import META_OWNER, META_PROGRESS
from ddim_inversion.held_bytes import settle_held_bytes
from ddim_inversion.job_metrics import histogram_field
from ddim_inversion.keys import (
    ENDED_TTL_S,
    JOB_METRICS_KEY,
    THROUGHPUT_KEY,
    cancel_key,
    ended_key,
    input_key,
    model_job_metrics_key,
    publish_job_event,
    reconstruction_key,
    result_key,
)
from worker import rq_adapter
from worker.job_state import Running, Success
from worker.rq_adapter import Queue
from worker.rq_worker import BaseWorker


@dataclass
class StartReply:
    """What the start's round trip read for one job."""

    canceled: bool
    image: bytes | None


def start_batch(
    worker: BaseWorker, queue: Queue, batch: Sequence[Running], progress_total: int | None
) -> list[StartReply]:
    """Step 1: mark every job of the batch started; read its cancel flag and input."""
    positions: list[int] = []  # of each job's two reads among the replies
    with worker.connection.pipeline() as pipe:
        executions = rq_adapter.start_jobs(worker, pipe, queue, [item.job for item in batch])
        for item, execution in zip(batch, executions, strict=True):
            item.execution = execution
            item.meta = rq_adapter.meta_of(item.job)
            if item.error is None and progress_total is not None:
                item.meta[META_PROGRESS] = {"step": 0, "total": progress_total}
                rq_adapter.write_meta(pipe, item.job, item.meta)
            positions.append(len(pipe))
            pipe.get(cancel_key(item.job.id))
            pipe.get(input_key(item.job.id))
        replies = pipe.execute()
    return [StartReply(canceled=replies[i] is not None, image=replies[i + 1]) for i in positions]


def write_progress(pipe: Any, items: Sequence[Running], step: int, total: int) -> None:
    """Each job's progress in its meta, and an event for those who follow it."""
    for item in items:
        item.meta[META_PROGRESS] = {"step": step, "total": total}
        rq_adapter.write_meta(pipe, item.job, item.meta)
        publish_job_event(pipe, item.job.id)


def record_job_metrics(pipe: Any, item: Running, status: str) -> None:
    """Count the job's end and its durations in the service-wide metrics hash, and in its
    model's (a job queued before jobs named models has none)."""
    model = item.payload.params.model if item.payload is not None else None
    keys = [JOB_METRICS_KEY] + ([model_job_metrics_key(model)] if model else [])
    for key in keys:
        pipe.hincrby(key, f"ended:{status}", 1)
    enqueued, started, ended = rq_adapter.times_of(item.job)
    ended = ended or datetime.now(timezone.utc).replace(tzinfo=None)
    spans = {
        "queue_wait": (started - enqueued).total_seconds() if started and enqueued else None,
        "run": (ended - started).total_seconds() if started else None,
    }
    for name, seconds in spans.items():
        if seconds is None or seconds < 0:
            continue
        for key in keys:
            pipe.hincrby(key, histogram_field(name, seconds), 1)
            pipe.hincrbyfloat(key, f"{name}:sum", seconds)


def signal_end(pipe: Any, item: Running, status: str) -> None:
    """The job-ended signal gateways block on (`Prefer: wait`), and the job's metrics. A job
    that did not succeed keeps no bytes: its input goes, and its key's budget gets them back."""
    job_id = item.job.id
    kept_for = rq_adapter.kept_for_s(item.job, succeeded=status == "succeeded")
    pipe.rpush(ended_key(job_id), status)
    pipe.expire(ended_key(job_id), min(ENDED_TTL_S, kept_for))
    publish_job_event(pipe, job_id)
    record_job_metrics(pipe, item, status)
    if status != "succeeded":
        settle_held_bytes(pipe, item.meta.get(META_OWNER, ""), job_id)


def expire_canceled(connection: Redis, queue: Queue, item: Running) -> None:
    """A canceled job expires like a failed one, and its input and cancel flag go now."""
    ttl = rq_adapter.kept_for_s(item.job, succeeded=False)
    with connection.pipeline() as pipe:
        rq_adapter.expire_canceled(pipe, queue, item.job, ttl)
        pipe.delete(input_key(item.job.id), cancel_key(item.job.id))
        pipe.execute()


def forget_failed_inputs(connection: Redis, job_ids: Sequence[str]) -> None:
    """Delete the input and cancel flag of those jobs that have failed: RQ's lost-job
    cleanup fails a job without touching the service's keys, which would outlive it."""
    failed = rq_adapter.with_status(connection, job_ids, "failed")
    if failed:
        connection.delete(*[key for i in failed for key in (input_key(i), cancel_key(i))])


def finish_successes(
    worker: BaseWorker,
    queue: Queue,
    done: Sequence[tuple[Running, Success]],
    throughput: str | None,
) -> None:
    """Step 2: every succeeded job of a batch, RQ's records and the service's, in one go."""
    with worker.connection.pipeline() as pipe:
        for item, success in done:
            job = item.job
            assert item.execution is not None
            ttl = rq_adapter.result_ttl(worker, job)
            expiry = ttl if ttl is not None and ttl > 0 else None
            pipe.set(result_key(job.id), success.result, ex=expiry)
            if success.reconstruction_png is not None:
                pipe.set(reconstruction_key(job.id), success.reconstruction_png, ex=expiry)
            pipe.delete(input_key(job.id), cancel_key(job.id))
            kept = len(success.result) + len(success.reconstruction_png or b"")
            settle_held_bytes(pipe, item.meta.get(META_OWNER, ""), job.id, kept, expiry)
            rq_adapter.write_meta(pipe, job, item.meta)
            rq_adapter.record_success(worker, pipe, job, item.execution, success.metadata)
            signal_end(pipe, item, "succeeded")
        if throughput is not None:
            pipe.hset(THROUGHPUT_KEY, worker.name, throughput)
        pipe.execute()
    for item, _ in done:
        worker.log.info("Worker %s: %s: Job OK (%s)", worker.name, queue.name, item.job.id)


def already_finished(connection: Redis, done: Sequence[tuple[Running, Success]]) -> bool:
    """After a connection lost mid-EXEC: whether the transaction went through anyway."""
    return bool(rq_adapter.with_status(connection, [done[0][0].job.id], "finished"))
