"""The gateway's one door to RQ: every RQ call, key name and state the gateway relies on.

The rest of the gateway sees jobs as `StoredJob` (the contract's states, aware datetimes,
the payload) and queues as opaque handles passed back here. What this module relies on in
RQ is pinned by tests/rq_contract/test_gateway_rq_adapter.py against a real Redis, so a
new RQ version that changes it fails there and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import redis
from rq import Queue, Retry
from rq.defaults import DEFAULT_FAILURE_TTL
from rq.exceptions import AbandonedJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import CanceledJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

from ddim_inversion.contract import JOB_FUNCTION, JobStatus
from ddim_inversion.errors import ErrorCode, JobError

__all__ = [
    "ACTIVE_STATUSES",
    "JOB_KEY_PREFIX",
    "STATUS_BY_RQ",
    "STATUS_FIELD",
    "AlreadyEnqueued",
    "Cancellation",
    "Queue",
    "StoredJob",
    "cancel",
    "contract_status",
    "delete",
    "enqueue",
    "failed_at",
    "failed_key",
    "failure_of",
    "fetch",
    "fetch_and_get",
    "fetch_many",
    "job_key",
    "open_queue",
    "queue_connection",
    "queue_depth",
    "queue_key",
    "queue_name",
    "registry_counts",
    "started_key",
]

# -- states ------------------------------------------------------------------------------

STATUS_BY_RQ: Mapping[str, JobStatus] = MappingProxyType(
    {
        RQStatus.CREATED.value: JobStatus.QUEUED,
        RQStatus.QUEUED.value: JobStatus.QUEUED,
        RQStatus.DEFERRED.value: JobStatus.QUEUED,
        RQStatus.SCHEDULED.value: JobStatus.QUEUED,
        RQStatus.READY_TO_ENQUEUE.value: JobStatus.QUEUED,
        RQStatus.RATE_LIMITED.value: JobStatus.QUEUED,
        RQStatus.STARTED.value: JobStatus.RUNNING,
        RQStatus.FINISHED.value: JobStatus.SUCCEEDED,
        RQStatus.FAILED.value: JobStatus.FAILED,
        RQStatus.CANCELED.value: JobStatus.CANCELED,
        RQStatus.STOPPED.value: JobStatus.CANCELED,
    }
)
"""The contract's five states from RQ's richer ones: the one mapping of the gateway."""

ACTIVE_STATUSES: tuple[str, ...] = tuple(
    rq for rq, status in STATUS_BY_RQ.items() if not status.is_terminal
)
"""RQ statuses of a job still waiting or running (the admission script counts these)."""

STATUS_FIELD = "status"
"""The field of RQ's job hash that holds the RQ status (read by Lua and by waits)."""

JOB_KEY_PREFIX: str = Job.redis_job_namespace_prefix
"""Prefix of RQ's job hashes (`rq:job:`), for scripts that read a job by its id."""


def contract_status(raw: str | bytes | None) -> JobStatus | None:
    """The contract's state of an RQ status as read from the job hash; None for no job.
    A status this gateway does not know counts as queued, as `StoredJob.status` does."""
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    return STATUS_BY_RQ.get(text, JobStatus.QUEUED)


def job_key(job_id: str) -> str:
    """RQ's hash of one job."""
    return Job.key_for(job_id)


# -- queues ------------------------------------------------------------------------------


def open_queue(connection: redis.Redis, name: str) -> Queue:
    """The queue handle every function here takes, with the JSON serializer the contract
    mandates (never pickle)."""
    return Queue(name, connection=connection, serializer=JSONSerializer)


def queue_key(queue: Queue) -> str:
    """The list of queued job ids (`rq:queue:<name>`), head first."""
    return queue.key


def queue_name(queue: Queue) -> str:
    return queue.name


def queue_connection(queue: Queue) -> redis.Redis:
    return queue.connection


def started_key(queue: Queue) -> str:
    """The sorted set of the queue's running jobs (`rq:wip:<name>`)."""
    return queue.started_job_registry.key


def failed_key(queue: Queue) -> str:
    """The sorted set of the queue's failed jobs still held, scored by expiry."""
    return queue.failed_job_registry.key


def queue_depth(queue: Queue) -> int:
    """Jobs waiting in the queue."""
    return queue.count


def registry_counts(queue: Queue) -> dict[str, int]:
    """Jobs in each of the queue's registries, without RQ's cleanup: a read must not move
    jobs between registries."""
    registries = {
        "started": queue.started_job_registry,
        "finished": queue.finished_job_registry,
        "failed": queue.failed_job_registry,
        "canceled": queue.canceled_job_registry,
        "deferred": queue.deferred_job_registry,
        "scheduled": queue.scheduled_job_registry,
    }
    return {name: r.get_job_count(cleanup=False) for name, r in registries.items()}


# -- jobs --------------------------------------------------------------------------------


def _aware(moment: datetime | None) -> datetime | None:
    """RQ stores naive UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment


class StoredJob:
    """One job as RQ stores it, read in the contract's terms. Reads nothing from Redis
    itself: it is the hash as loaded (the payload is decoded on first use)."""

    __slots__ = ("_job",)

    def __init__(self, job: Job) -> None:
        self._job = job

    def __repr__(self) -> str:
        return f"StoredJob({self.id!r}, {self.status.value})"

    @property
    def id(self) -> str:
        return self._job.id

    @property
    def status(self) -> JobStatus:
        # RQ's JobStatus is a str enum: it looks up as its value.
        return STATUS_BY_RQ.get(self._job.get_status(refresh=False) or "", JobStatus.QUEUED)

    @property
    def meta(self) -> Mapping[str, Any]:
        """What the gateway and the worker wrote beside the job (owner, progress, ...)."""
        return self._job.meta

    @property
    def payload(self) -> Mapping[str, Any]:
        """The one argument of the job function, as enqueued ({} if unreadable)."""
        payload = (self._job.kwargs or {}).get("payload")
        return payload if isinstance(payload, Mapping) else {}

    @property
    def queue_name(self) -> str:
        """The queue it was enqueued in (RQ's `origin`): its model's."""
        return self._job.origin

    @property
    def created_at(self) -> datetime | None:
        return _aware(self._job.created_at)

    @property
    def enqueued_at(self) -> datetime | None:
        return _aware(self._job.enqueued_at)

    @property
    def started_at(self) -> datetime | None:
        return _aware(self._job.started_at)

    @property
    def ended_at(self) -> datetime | None:
        return _aware(self._job.ended_at)

    @property
    def timeout_s(self) -> int | None:
        return int(self._job.timeout) if self._job.timeout else None


def _restore(connection: redis.Redis, job_id: str, raw: Mapping[Any, Any]) -> StoredJob | None:
    """The job from its hash as already read, as RQ's `Job.fetch_many` does; None when
    there is no hash or it is not an RQ job."""
    if not raw:
        return None
    job = Job(job_id, connection=connection, serializer=JSONSerializer)
    try:
        job.restore(raw)
    except NoSuchJobError:
        return None
    return StoredJob(job)


def fetch(connection: redis.Redis, job_id: str) -> StoredJob | None:
    return _restore(connection, job_id, connection.hgetall(job_key(job_id)))


def fetch_and_get(
    connection: redis.Redis, job_id: str, key: str
) -> tuple[StoredJob | None, bytes | None]:
    """`fetch`, and the value at `key` (a result beside the job), in one round trip."""
    pipe = connection.pipeline(transaction=False)
    pipe.hgetall(job_key(job_id))
    pipe.get(key)
    raw, value = pipe.execute()
    return _restore(connection, job_id, raw), value


def fetch_many(connection: redis.Redis, job_ids: Iterable[str]) -> list[StoredJob | None]:
    """The jobs in one round trip, None where one is gone."""
    jobs = Job.fetch_many(list(job_ids), connection=connection, serializer=JSONSerializer)
    return [StoredJob(job) if job is not None else None for job in jobs]


class AlreadyEnqueued(Exception):
    """The job id is already enqueued: another request of the same Idempotency-Key won."""


Writes = Callable[[Any], object]
"""Commands queued on the enqueue transaction (a redis-py pipeline in MULTI)."""


def enqueue(
    connection: redis.Redis,
    queue: Queue,
    job_id: str,
    payload: Mapping[str, Any],
    meta: Mapping[str, Any],
    *,
    timeout_s: int,
    result_ttl_s: int,
    failure_ttl_s: int,
    max_retries: int,
    before: Writes,
    after: Writes,
    exclusive: bool = False,
) -> StoredJob:
    """Enqueue the job in one MULTI/EXEC with the caller's writes: `before` RQ's (the input
    a queued job must never lack), `after` them (whatever must follow RQ's RPUSH).

    RQ queues its own writes (SADD rq:queues, the job hash, RPUSH) on the pipeline it is
    given, so they land with the caller's or not at all. `exclusive`: WATCH lets only the
    first enqueue of this id happen; AlreadyEnqueued tells the others.
    """
    with connection.pipeline(transaction=True) as pipe:
        if exclusive:
            pipe.watch(job_key(job_id))
            if pipe.exists(job_key(job_id)):
                raise AlreadyEnqueued(job_id)
        # Explicitly, before the first command: RQ would call MULTI itself, which a
        # pipeline that already holds a command refuses.
        pipe.multi()
        before(pipe)
        job = queue.enqueue_call(
            JOB_FUNCTION,
            kwargs={"payload": dict(payload)},
            job_id=job_id,
            timeout=timeout_s,
            result_ttl=result_ttl_s,
            failure_ttl=failure_ttl_s,
            description=f"inversion {job_id}",
            meta=dict(meta),
            # Retries are for lost workers only: a worker marks a failure with a code final.
            retry=Retry(max=max_retries) if max_retries else None,
            pipeline=pipe,
        )
        after(pipe)
        try:
            pipe.execute()
        except redis.WatchError:
            raise AlreadyEnqueued(job_id) from None
    return StoredJob(job)


# -- failures ----------------------------------------------------------------------------


def failure_of(job: StoredJob) -> JobError:
    """What RQ recorded of a failure the worker could not describe: its last exception
    (one read of the job's latest Result)."""
    result = job._job.latest_result()
    exc = (result.exc_string or "") if result is not None else ""
    if AbandonedJobError.__name__ in exc:
        # RQ's cleanup of a job whose worker stopped heartbeating, after its last retry.
        return JobError(
            code=ErrorCode.WORKER_LOST,
            message="the worker running the job was lost and its retries are used up",
        )
    lines = [line for line in exc.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else "the job failed without a message"
    code = ErrorCode.TIMEOUT if JobTimeoutException.__name__ in exc else ErrorCode.INTERNAL
    return JobError(code=code, message=last)


def failed_at(job: StoredJob) -> float | None:
    """Unix time the job failed: RQ's `ended_at`, or its failure Result's time (a job
    failed by RQ's lost-worker cleanup has no `ended_at`)."""
    moment = job.ended_at
    if moment is None:
        result = job._job.latest_result()
        moment = _aware(result.created_at) if result is not None else None
    return moment.timestamp() if moment is not None else None


# -- cancel and delete -------------------------------------------------------------------


@dataclass(frozen=True)
class Cancellation:
    """What `cancel` did, for the caller's writes on the same round trip."""

    ttl_s: int
    """The job and its canceled-registry entry now expire after this (its failure TTL)."""
    here: bool
    """This call canceled it (False: it was canceled before)."""


def cancel(
    connection: redis.Redis,
    job: StoredJob,
    meta: Mapping[str, Any],
    also: Callable[[Any, Cancellation], object],
) -> None:
    """Cancel a queued job for good (RQ's cancel), then in one round trip: `meta` merged
    into its meta, the job and its canceled-registry entry given the failure TTL, and
    `also(pipe, cancellation)`.

    RQ's cancel keeps the hash forever and scores the registry entry at the cancel itself
    (which the workers' registry cleaning would drop at once): both get the failure TTL,
    so a canceled job expires like a failed one.
    """
    rq_job = job._job
    ttl = rq_job.failure_ttl if rq_job.failure_ttl and rq_job.failure_ttl > 0 else None
    ttl = ttl or DEFAULT_FAILURE_TTL
    try:
        rq_job.cancel()
        here = True
    except InvalidJobOperation:
        here = False
    rq_job.meta.update(meta)
    with connection.pipeline(transaction=False) as pipe:
        pipe.hset(rq_job.key, "meta", rq_job.serializer.dumps(rq_job.meta))
        registry = CanceledJobRegistry(rq_job.origin, connection, serializer=rq_job.serializer)
        registry.add(rq_job, ttl, pipeline=pipe)
        pipe.expire(rq_job.key, ttl)
        also(pipe, Cancellation(ttl_s=ttl, here=here))
        pipe.execute()


def delete(job: StoredJob) -> None:
    """RQ's delete: the job hash and its registry entries; only deletions."""
    job._job.delete()
