"""RQ's job lifecycle for a whole batch, in one Redis round trip at each end.

RQ's own worker writes a job's start in two pipelines and its success in five round trips
(a WATCH of the job's dependents among them). Around a job of a hundred milliseconds that
bookkeeping is a tenth of its latency, and a batch of eight pays it eight times. Here the
same records are written, with RQ's own methods, in one MULTI/EXEC per batch, so that
`rq info` and rq-dashboard see exactly what RQ's worker would have written:

1. Start: each job's Execution in the StartedJobRegistry and the worker's execution set,
   the job's `started` status, heartbeats and worker name, its removal from the
   intermediate queue, its first progress, and the worker's `busy` state. The same round
   trip reads each job's cancel flag and input image.
2. Success: the result bytes (and reconstruction), the input and any cancel flag deleted,
   the job's meta (final progress, result metadata, engine time), RQ's Result stream
   entry, `finished` status, FinishedJobRegistry and TTLs, the execution's cleanup, the
   worker's counters, the job-ended signal that waiting gateways block on, the
   service-wide job metrics, the bytes the job now holds against its key's budget, and
   this worker's throughput. One transaction: a gateway that
   sees `finished` always finds the result.

Every ended job, and everything of its, expires: a success with its result TTL, a
failure or a cancel with its failure TTL (`kept_for_s`); RQ's cancel sets none, which
`expire_canceled` makes up for, and `clean_registries` drops expired registry entries.

The gateway never enqueues a job with `depends_on`, so no job has dependents to release
and RQ's WATCH loop over the dependents key has nothing to guard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from redis import Redis
from rq import Queue
from rq.defaults import DEFAULT_FAILURE_TTL
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp, now
from rq.worker.base import WorkerStatus

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
    publish_job_event,
    reconstruction_key,
    result_key,
)

if TYPE_CHECKING:
    from worker.batching import InversionWorker, Running


@dataclass
class StartReply:
    """What the start's round trip read for one job."""

    canceled: bool
    image: bytes | None


@dataclass
class Success:
    """One succeeded job's outputs, ready to be written."""

    result: bytes
    reconstruction_png: bytes | None
    metadata: dict[str, Any]


def start_batch(
    worker: InversionWorker, queue: Queue, batch: Sequence[Running], progress_total: int | None
) -> list[StartReply]:
    """Step 1: mark every job of the batch started; read its cancel flag and input."""
    ttl = worker.get_heartbeat_ttl(batch[0].job)
    positions: list[int] = []  # of each job's two reads among the replies
    with worker.connection.pipeline() as pipe:
        worker.set_state(WorkerStatus.BUSY, pipeline=pipe)
        worker.heartbeat(ttl, pipeline=pipe)
        for item in batch:
            job = item.job
            item.execution = Execution.create(job, ttl, pipeline=pipe, worker_name=worker.name)
            worker.executions[item.execution.id] = item.execution
            job.heartbeat(now(), ttl, pipeline=pipe)
            job.prepare_for_execution(worker.name, pipeline=pipe)
            pipe.persist(job.key)
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            item.meta = dict(job.meta)
            if item.error is None and progress_total is not None:
                item.meta[META_PROGRESS] = {"step": 0, "total": progress_total}
                pipe.hset(job.key, "meta", JSONSerializer.dumps(item.meta))
            positions.append(len(pipe))
            pipe.get(cancel_key(job.id))
            pipe.get(input_key(job.id))
        replies = pipe.execute()
    return [StartReply(canceled=replies[i] is not None, image=replies[i + 1]) for i in positions]


def record_job_metrics(pipe: Any, job: Job, status: str) -> None:
    """Count the job's end and its durations in the service-wide metrics hash."""
    pipe.hincrby(JOB_METRICS_KEY, f"ended:{status}", 1)
    started, enqueued = job.started_at, job.enqueued_at
    ended = job.ended_at or datetime.now(timezone.utc).replace(tzinfo=None)
    spans = {
        "queue_wait": (started - enqueued).total_seconds() if started and enqueued else None,
        "run": (ended - started).total_seconds() if started else None,
    }
    for name, seconds in spans.items():
        if seconds is None or seconds < 0:
            continue
        pipe.hincrby(JOB_METRICS_KEY, histogram_field(name, seconds), 1)
        pipe.hincrbyfloat(JOB_METRICS_KEY, f"{name}:sum", seconds)


def kept_for_s(job: Job, status: str) -> int:
    """How long an ended job and everything of its are kept: its result TTL once succeeded,
    its failure TTL once failed or canceled."""
    ttl = job.result_ttl if status == "succeeded" else job.failure_ttl
    return ttl if ttl is not None and ttl > 0 else DEFAULT_FAILURE_TTL


def signal_end(pipe: Any, job: Job, status: str) -> None:
    """The job-ended signal gateways block on (`Prefer: wait`), and the job's metrics. A job
    that did not succeed keeps no bytes: its input goes, and its key's budget gets them back."""
    pipe.rpush(ended_key(job.id), status)
    pipe.expire(ended_key(job.id), min(ENDED_TTL_S, kept_for_s(job, status)))
    publish_job_event(pipe, job.id)
    record_job_metrics(pipe, job, status)
    if status != "succeeded":
        settle_held_bytes(pipe, job.meta.get(META_OWNER, ""), job.id)


def expire_canceled(connection: Redis, queue: Queue, job: Job) -> None:
    """A canceled job expires like a failed one: RQ's cancel keeps its hash forever and
    scores it in the canceled registry at the moment of the cancel; here the hash gets the
    failure TTL and the registry entry that expiry, which `clean_registries` honours."""
    ttl = kept_for_s(job, "canceled")
    with connection.pipeline() as pipe:
        queue.canceled_job_registry.add(job, ttl, pipeline=pipe)
        pipe.expire(job.key, ttl)
        pipe.delete(input_key(job.id), cancel_key(job.id))
        pipe.execute()


def forget_failed_inputs(connection: Redis, job_ids: Sequence[str]) -> None:
    """Delete the input and cancel flag of those jobs that have failed: RQ's lost-job
    cleanup fails a job without touching the service's keys, which would outlive it."""
    with connection.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "status")
        statuses = pipe.execute()
    failed = [
        job_id
        for job_id, status in zip(job_ids, statuses, strict=True)
        if status in (JobStatus.FAILED.value, JobStatus.FAILED.value.encode())
    ]
    if failed:
        connection.delete(*[key for i in failed for key in (input_key(i), cancel_key(i))])


def clean_registries(connection: Redis, queue: Queue) -> None:
    """Forget ended jobs whose TTL has passed from RQ's finished, failed and canceled
    registries (RQ cleans the first two every 10 minutes, the canceled one never)."""
    moment = current_timestamp()
    with connection.pipeline(transaction=False) as pipe:
        for registry in (
            queue.finished_job_registry,
            queue.failed_job_registry,
            queue.canceled_job_registry,
        ):
            pipe.zremrangebyscore(registry.key, 0, moment)
        pipe.execute()


def finish_successes(
    worker: InversionWorker,
    queue: Queue,
    done: Sequence[tuple[Running, Success]],
    throughput: str | None,
) -> None:
    """Step 2: every succeeded job of a batch, RQ's records and the service's, in one go."""
    with worker.connection.pipeline() as pipe:
        for item, success in done:
            job, execution = item.job, item.execution
            assert execution is not None and job.started_at is not None
            result_ttl = job.get_result_ttl(worker.default_result_ttl)
            expiry = result_ttl if result_ttl is not None and result_ttl > 0 else None
            pipe.set(result_key(job.id), success.result, ex=expiry)
            if success.reconstruction_png is not None:
                pipe.set(reconstruction_key(job.id), success.reconstruction_png, ex=expiry)
            pipe.delete(input_key(job.id), cancel_key(job.id))
            job.meta = item.meta
            kept = len(success.result) + len(success.reconstruction_png or b"")
            settle_held_bytes(pipe, job.meta.get(META_OWNER, ""), job.id, kept, expiry)
            pipe.hset(job.key, "meta", JSONSerializer.dumps(item.meta))
            # What RQ's _finalize_success and handle_job_success write, in their order.
            job.ended_at = now()
            job.heartbeat(job.ended_at, job.success_callback_timeout, pipeline=pipe)
            job._result = success.metadata
            job._status = JobStatus.FINISHED
            worker.increment_successful_job_count(pipeline=pipe)
            worker.increment_total_working_time(job.ended_at - job.started_at, pipe)
            if result_ttl != 0:
                job._handle_success(
                    result_ttl,
                    pipeline=pipe,
                    worker_name=worker.name,
                    execution_id=execution.id,
                    execution_started_at=execution.created_at,
                    execution_ended_at=job.ended_at,
                )
            job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
            job._status = JobStatus.FINISHED
            worker.cleanup_execution(job, pipeline=pipe, execution=execution)
            signal_end(pipe, job, "succeeded")
        if throughput is not None:
            pipe.hset(THROUGHPUT_KEY, worker.name, throughput)
        pipe.execute()
    for item, _ in done:
        worker.log.info("Worker %s: %s: Job OK (%s)", worker.name, queue.name, item.job.id)


def already_finished(worker: InversionWorker, done: Sequence[tuple[Running, Success]]) -> bool:
    """After a connection lost mid-EXEC: whether the transaction went through anyway."""
    status: Any = worker.connection.hget(done[0][0].job.key, "status")
    return status in (JobStatus.FINISHED.value, JobStatus.FINISHED.value.encode())
