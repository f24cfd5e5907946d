"""The gateway's side of the queue protocol (contract.py, bottom): enqueue and read jobs.

No FastAPI here: plain functions over a Redis client and an RQ queue, so that the routes
stay thin and the protocol reads in one place.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import numpy as np
import redis
from pydantic import ValidationError
from rq import Queue, Retry
from rq.defaults import DEFAULT_FAILURE_TTL
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import CanceledJobRegistry
from rq.serializers import JSONSerializer

from ddim_inversion.contract import (
    JOB_FUNCTION,
    META_ERROR,
    META_OWNER,
    META_PROGRESS,
    META_RESULT,
    JobPayload,
    JobStatus,
    Progress,
    ResultMetadata,
    WorkerRecord,
)
from ddim_inversion.errors import ErrorCode, JobError
from ddim_inversion.held_bytes import settle_held_bytes
from ddim_inversion.keys import (
    ENDED_TTL_S,
    JOB_METRICS_KEY,
    THROUGHPUT_KEY,
    WORKERS_KEY,
    cancel_key,
    ended_key,
    input_key,
    publish_job_event,
    reconstruction_key,
    result_key,
)
from ddim_inversion.params import InversionParams
from service import fairness, limits
from service.errors import ProblemError
from service.schemas import JobParams, JobUrls, JobView, Timings
from service.settings import GatewaySettings

logger = logging.getLogger(__name__)

STATUS_BY_RQ: dict[RQStatus, JobStatus] = {
    RQStatus.CREATED: JobStatus.QUEUED,
    RQStatus.QUEUED: JobStatus.QUEUED,
    RQStatus.DEFERRED: JobStatus.QUEUED,
    RQStatus.SCHEDULED: JobStatus.QUEUED,
    RQStatus.READY_TO_ENQUEUE: JobStatus.QUEUED,
    RQStatus.RATE_LIMITED: JobStatus.QUEUED,
    RQStatus.STARTED: JobStatus.RUNNING,
    RQStatus.FINISHED: JobStatus.SUCCEEDED,
    RQStatus.FAILED: JobStatus.FAILED,
    RQStatus.CANCELED: JobStatus.CANCELED,
    RQStatus.STOPPED: JobStatus.CANCELED,
}


def live_workers(connection: redis.Redis, stale_s: float) -> list[WorkerRecord]:
    """Workers whose heartbeat is fresher than `stale_s`, the most recent first."""
    return fresh_workers(connection.hgetall(WORKERS_KEY), stale_s)


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


def queue_depth_and_workers(
    connection: redis.Redis, queue: Queue, stale_s: float
) -> tuple[int, list[WorkerRecord]]:
    """The jobs waiting and the live workers, in one round trip: a submission needs both."""
    pipe = connection.pipeline(transaction=False)
    pipe.llen(queue.key)
    pipe.hgetall(WORKERS_KEY)
    depth, raw_records = pipe.execute()
    return int(depth), fresh_workers(raw_records, stale_s)


class AlreadyEnqueued(Exception):
    """The job id is already enqueued: another request of the same Idempotency-Key won."""


def enqueue(
    connection: redis.Redis,
    queue: Queue,
    settings: GatewaySettings,
    params: InversionParams,
    rgb: np.ndarray,
    owner: str,
    job_id: str | None = None,
    webhook_url: str | None = None,
    also: Callable[[Any], object] | None = None,
    exclusive: bool = False,
) -> Job:
    """Store the image and enqueue the job in one MULTI/EXEC: a queued job never lacks its
    input, and one round trip does what took three. The job takes its fair place among
    other keys' jobs (service/fairness.py). `also` queues further writes that must land
    with the job (its admission's confirmation) on the same transaction.

    RQ queues its own writes (SADD rq:queues, the job hash, RPUSH) on the pipeline it is
    given, so they land with the input or not at all: if `execute` raises, nothing was
    written, or (a reply lost in flight) everything was, and the input must then stay.

    `exclusive`: the id may be another request's (the same Idempotency-Key); WATCH lets
    only the first enqueue it, and AlreadyEnqueued tells the others.
    """
    job_id = job_id or str(uuid.uuid4())
    height, width = rgb.shape[:2]
    payload = JobPayload(
        params=params, image_width=width, image_height=height, owner=owner, webhook_url=webhook_url
    )
    with connection.pipeline(transaction=True) as pipe:
        if exclusive:
            pipe.watch(Job.key_for(job_id))
            if pipe.exists(Job.key_for(job_id)):
                raise AlreadyEnqueued(job_id)
        # Explicitly, before the first command: RQ would call MULTI itself, which a
        # pipeline that already holds a command refuses.
        pipe.multi()
        pipe.set(input_key(job_id), rgb.tobytes(), ex=settings.input_ttl_s)
        job = queue.enqueue_call(
            JOB_FUNCTION,
            kwargs={"payload": payload.model_dump(mode="json")},
            job_id=job_id,
            timeout=settings.job_timeout_s,
            result_ttl=settings.result_ttl_s,
            failure_ttl=settings.failure_ttl_s,
            description=f"inversion {job_id}",
            meta={META_OWNER: owner},
            # Retries are for lost workers only: a worker marks a failure with a code final.
            retry=Retry(max=settings.max_retries) if settings.max_retries else None,
            pipeline=pipe,
        )
        fairness.place(pipe, queue.key, queue.name, job_id, owner, settings.input_ttl_s)
        if also is not None:
            also(pipe)
        try:
            pipe.execute()
        except redis.WatchError:
            raise AlreadyEnqueued(job_id) from None
    return job


def _not_found(job_id: str) -> ProblemError:
    return ProblemError(404, ErrorCode.NOT_FOUND, f"no inversion job {job_id!r}")


def _check_id(job_id: str) -> None:
    """404 for an id that cannot name a job, before any Redis read."""
    try:
        canonical = str(uuid.UUID(job_id))
    except ValueError:
        raise _not_found(job_id) from None
    # Only the form the gateway writes names a job; RQ refuses some others (braces) with
    # a ValueError, which would be a 500.
    if canonical != job_id:
        raise _not_found(job_id)


def _owned_job(connection: redis.Redis, job_id: str, raw: Mapping[Any, Any], owner: str) -> Job:
    """The job restored from its hash as already read (as RQ's `Job.fetch_many` does), or a
    404: no hash, one that is not an RQ job, or another owner's job alike."""
    if not raw:
        raise _not_found(job_id)
    job = Job(job_id, connection=connection, serializer=JSONSerializer)
    try:
        job.restore(raw)
    except NoSuchJobError:
        raise _not_found(job_id) from None
    if job.meta.get(META_OWNER, "") != owner:
        raise _not_found(job_id)
    return job


def load_job(connection: redis.Redis, job_id: str, owner: str) -> Job:
    """The job, or a 404 problem: unknown, malformed id, or another owner's job alike."""
    _check_id(job_id)
    raw = connection.hgetall(Job.key_for(job_id))
    return _owned_job(connection, job_id, raw, owner)


def load_job_and(
    connection: redis.Redis, job_id: str, owner: str, key: str
) -> tuple[Job, bytes | None]:
    """`load_job`, and the value at `key` (a result beside the job) in the same round trip.

    The value is read before the owner is checked, but only returned to its owner.
    """
    _check_id(job_id)
    pipe = connection.pipeline(transaction=False)
    pipe.hgetall(Job.key_for(job_id))
    pipe.get(key)
    raw, value = pipe.execute()
    return _owned_job(connection, job_id, raw, owner), value


def status_of(job: Job) -> JobStatus:
    """The contract's five states from RQ's richer ones."""
    return STATUS_BY_RQ.get(job.get_status(refresh=False), JobStatus.QUEUED)


def job_error(job: Job, status: JobStatus) -> JobError | None:
    """What the worker wrote, or a best guess from RQ when the worker could not write it."""
    if status not in (JobStatus.FAILED, JobStatus.CANCELED):
        return None
    meta = job.meta.get(META_ERROR)
    if isinstance(meta, dict):
        try:
            return JobError.model_validate(meta)
        except ValidationError:
            logger.warning("job %s has an unreadable error meta %r", job.id, meta)
    if status is JobStatus.CANCELED:
        return JobError(code=ErrorCode.CANCELED, message="canceled")
    result = job.latest_result()
    exc = (result.exc_string or "") if result is not None else ""
    lines = [line for line in exc.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else "the job failed without a message"
    if "AbandonedJobError" in exc:
        # RQ's cleanup of a job whose worker stopped heartbeating, after its last retry.
        return JobError(
            code=ErrorCode.WORKER_LOST,
            message="the worker running the job was lost and its retries are used up",
        )
    code = ErrorCode.TIMEOUT if "JobTimeoutException" in exc else ErrorCode.INTERNAL
    return JobError(code=code, message=last)


def _aware(moment: datetime | None) -> datetime | None:
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment


def created_at(job: Job) -> datetime:
    """When the gateway created the job, timezone-aware (RQ stores UTC)."""
    return _aware(job.created_at) or datetime.now(timezone.utc)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds(), 3) if start and end else None


def timings_of(job: Job) -> Timings:
    queued = _aware(job.enqueued_at or job.created_at)
    started = _aware(job.started_at)
    ended = _aware(job.ended_at)
    return Timings(
        queued_at=queued,
        started_at=started,
        finished_at=ended,
        queue_wait_s=_seconds(queued, started),
        run_s=_seconds(started, ended),
    )


def _params_of(job: Job, result: ResultMetadata | None) -> JobParams | None:
    raw: Any = (job.kwargs or {}).get("payload", {}).get("params")
    if raw is None:
        return None
    try:
        params = JobParams.model_validate(raw)
    except ValidationError:
        logger.warning("job %s has unreadable params", job.id)
        return None
    if result is None:
        return params
    return params.model_copy(
        update={
            "resolved_resolution": (result.width, result.height),
            "resolved_scheduler_config": result.scheduler_config,
        }
    )


def _result_of(job: Job, status: JobStatus) -> ResultMetadata | None:
    raw = job.meta.get(META_RESULT)
    if status is not JobStatus.SUCCEEDED or raw is None:
        return None
    try:
        return ResultMetadata.model_validate(raw)
    except ValidationError:
        logger.warning("job %s has unreadable result metadata", job.id)
        return None


def images_per_s(raw: Any) -> float | None:
    """The `images_per_s` of one THROUGHPUT_KEY value, if readable, finite and positive."""
    if raw is None:
        return None
    try:
        rate = float(json.loads(raw)["images_per_s"])
    except (ValueError, KeyError, TypeError):
        return None
    return rate if math.isfinite(rate) and rate > 0 else None


def _summed_rates(records: Iterable[Any]) -> float | None:
    """The sum of the readable, finite, positive `images_per_s` of THROUGHPUT_KEY values."""
    return sum(rate for rate in map(images_per_s, records) if rate is not None) or None


def _position_and_rate(
    queue: Queue, job_id: str, stale_s: float | None
) -> tuple[int | None, float | None]:
    """A queued job's 0-based place and, with `stale_s`, the images per second of the live
    workers together (from what each records per batch): one round trip for LPOS, the
    worker records and the rates.
    """
    pipe = queue.connection.pipeline(transaction=False)
    pipe.lpos(queue.key, job_id)
    if stale_s is not None:
        pipe.hgetall(WORKERS_KEY)
        pipe.hgetall(THROUGHPUT_KEY)
    position, *rest = pipe.execute()
    if position is None or stale_s is None:
        return position, None
    records, rates = rest
    live = {w.name for w in fresh_workers(records, stale_s)}
    return position, _summed_rates(v for k, v in rates.items() if _text(k) in live)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def estimate_wait_s(position: int | None, images_per_s: float | None) -> float | None:
    """Seconds until a job at 0-based `position` has run: (position + 1) / throughput."""
    if position is None or position < 0 or not images_per_s or images_per_s <= 0:
        return None
    return round((position + 1) / images_per_s, 3)


def job_view(job: Job, queue: Queue, stale_s: float | None = None) -> JobView:
    """The status body of a job, read from the job hash (plus its queue position and, while
    queued, an estimated wait from the live workers' throughput; `stale_s` None: no estimate)."""
    status = status_of(job)
    position, rate = None, None
    if status is JobStatus.QUEUED:
        position, rate = _position_and_rate(queue, job.id, stale_s)
    estimate = estimate_wait_s(position, rate)
    result = _result_of(job, status)
    progress = None
    if status is JobStatus.RUNNING and isinstance(job.meta.get(META_PROGRESS), dict):
        try:
            progress = Progress.model_validate(job.meta[META_PROGRESS])
        except ValidationError:
            progress = None
    return JobView(
        id=job.id,
        status=status,
        created_at=created_at(job),
        queue_position=position,
        estimated_wait_s=estimate,
        progress=progress,
        timings=timings_of(job),
        params=_params_of(job, result),
        result=result,
        error=job_error(job, status),
        urls=JobUrls.for_job(job.id),
    )


def cancel_queued(connection: redis.Redis, job: Job) -> None:
    """Take a queued job out of the queue for good and say why in its meta.

    It then expires like a failed job, with everything of its: RQ's cancel keeps the hash
    forever and scores the canceled registry entry at the cancel itself (which the
    workers' registry cleaning would drop at once), so both get the failure TTL; the input
    goes now; the cancel flag (kept for a worker that dequeued the job meanwhile) and the
    end signal expire with the job at the latest.
    """
    ttl = job.failure_ttl if job.failure_ttl and job.failure_ttl > 0 else DEFAULT_FAILURE_TTL
    try:
        job.cancel()
        canceled_here = True
    except InvalidJobOperation:
        logger.info("job %s was already canceled", job.id)
        canceled_here = False
    job.meta[META_ERROR] = {
        "code": ErrorCode.CANCELED.value,
        "message": "canceled by the client",
    }
    with connection.pipeline(transaction=False) as pipe:
        pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
        CanceledJobRegistry(job.origin, connection, serializer=job.serializer).add(
            job, ttl, pipeline=pipe
        )
        pipe.expire(job.key, ttl)
        pipe.delete(input_key(job.id))
        # The DELETE route set the flag to outlive the job's timeout; not the job itself.
        pipe.expire(cancel_key(job.id), min(ttl, int(job.timeout or 0) + 60))
        if canceled_here:
            # A job canceled before any worker saw it ends here: count it like the workers do.
            pipe.hincrby(JOB_METRICS_KEY, "ended:canceled", 1)
            pipe.rpush(ended_key(job.id), "canceled")
            pipe.expire(ended_key(job.id), min(ENDED_TTL_S, ttl))
            publish_job_event(pipe, job.id)
        pipe.execute()
    # Its input is deleted above: the job's bytes are gone from its key's budget.
    settle_held_bytes(connection, job.meta.get(META_OWNER, ""), job.id)


def delete(connection: redis.Redis, job: Job, owner: str) -> None:
    """Forget a finished job: its result and input, the RQ job, its cancel flag, and its
    share of its key's budgets.

    Works on a Redis that is out of memory (noeviction refuses every command that may need
    memory, and any MULTI): only deletions, each on its own, the largest values first.
    """
    connection.delete(
        result_key(job.id),
        reconstruction_key(job.id),
        input_key(job.id),
        cancel_key(job.id),
    )
    job.delete()
    limits.forget(connection, owner, job.id)
