"""Every use of RQ by the worker, in one place with its base class (rq_worker): a new RQ
version fails there and nowhere else.

Each job keeps its exact RQ lifecycle (`rq info`, rq-dashboard and RQ's lost-job cleanup
see what RQ's own worker would write), but a batch's records go in one transaction,
which RQ's worker cannot do. So this module holds:

1. RQ's records of a job, queued on the caller's transaction: started (`start_jobs`),
   succeeded (`record_success`), failed (`record_failure`), canceled (`record_cancel`,
   `expire_canceled`), and what they keep (`kept_for_s`, `result_ttl`);
2. reading and claiming queued jobs, and what a job would make RQ import, call, enqueue
   or contact when ending it (`call_of`, `armed_with`, `disarm`);
3. RQ's lost-job cleanup and registry expiry (`reap_lost`, `drop_expired_entries`).

Outside these two modules a job is a handle with an `id`. RQ's private API appears only
where it has no public one, with the reason beside it; the contract tests in
tests/rq_contract/test_worker_rq_adapter.py pin what they rely on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis import Redis
from rq import Queue
from rq.defaults import DEFAULT_FAILURE_TTL
from rq.exceptions import DeserializationError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.job_lifecycle import format_exc_info
from rq.results import Result
from rq.utils import current_timestamp, now
from rq.worker import WorkerStatus

from worker.rq_worker import SERIALIZER, BaseWorker

__all__ = ["Execution", "Job", "Queue"]  # the types, for annotations elsewhere

CLAIM_SCRIPT = """
local claimed = {}
for _, id in ipairs(ARGV) do
  if redis.call('LREM', KEYS[1], 1, id) == 1 then
    redis.call('RPUSH', KEYS[2], id)
    table.insert(claimed, id)
  end
end
return claimed
"""
"""Move job ids from the queue to RQ's intermediate queue, as RQ's dequeue moves the one it
takes, atomically: a job another worker took is simply skipped."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_queue(connection: Redis, name: str) -> Queue:
    return Queue(name, connection=connection, serializer=SERIALIZER)


# -- 1. RQ's records of a job ----------------------------------------------------------------


def start_jobs(worker: BaseWorker, pipe: Any, queue: Queue, jobs: Sequence[Job]) -> list[Execution]:
    """RQ's start of each job on `pipe`: what its `prepare_execution` and then
    `prepare_job_execution` write, in their order (executions, the worker's `busy` state
    and heartbeat, each job's heartbeat, `started` status, worker name, and its removal
    from the intermediate queue)."""
    ttl = worker.get_heartbeat_ttl(jobs[0])
    executions = []
    for job in jobs:
        execution = Execution.create(job, ttl, pipeline=pipe, worker_name=worker.name)
        worker.executions[execution.id] = execution
        executions.append(execution)
    worker.set_state(WorkerStatus.BUSY, pipeline=pipe)
    worker.heartbeat(ttl, pipeline=pipe)
    for job in jobs:
        job.heartbeat(now(), ttl, pipeline=pipe)
        job.prepare_for_execution(worker.name, pipeline=pipe)
        pipe.persist(job.key)
        pipe.lrem(queue.intermediate_queue_key, 1, job.id)
    return executions


def write_meta(pipe: Any, job: Job, meta: dict[str, Any]) -> None:
    """Set the job's meta (in memory, and on `pipe`: a client or a pipeline)."""
    job.meta = meta
    pipe.hset(job.key, "meta", SERIALIZER.dumps(meta))


def result_ttl(worker: BaseWorker, job: Job) -> int:
    """How long RQ keeps the job's success: its own result TTL, else the worker's default."""
    return job.get_result_ttl(worker.default_result_ttl)


def record_success(
    worker: BaseWorker, pipe: Any, job: Job, execution: Execution, return_value: Any
) -> None:
    """What RQ's `_finalize_success` and `handle_job_success` write, in their order, on the
    caller's transaction (RQ's own run five round trips, a WATCH among them; the gateway
    never enqueues with dependents, so that WATCH has nothing to guard)."""
    assert job.started_at is not None
    ttl = result_ttl(worker, job)
    job.ended_at = now()
    job.heartbeat(job.ended_at, job.success_callback_timeout, pipeline=pipe)
    worker.increment_successful_job_count(pipeline=pipe)
    worker.increment_total_working_time(job.ended_at - job.started_at, pipe)
    if ttl != 0:
        job.set_status(JobStatus.FINISHED, pipeline=pipe)
        job.save(pipeline=pipe, include_meta=False, include_result=False)
        Result.create(
            job,
            Result.Type.SUCCESSFUL,
            return_value=return_value,
            ttl=ttl,
            worker_name=worker.name,
            pipeline=pipe,
            execution_id=execution.id,
            execution_started_at=execution.created_at,
            execution_ended_at=job.ended_at,
        )
        job.finished_job_registry.add(job, ttl, pipe)
    job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
    worker.cleanup_execution(job, pipeline=pipe, execution=execution)


def record_failure(
    worker: BaseWorker, queue: Queue, job: Job, execution: Execution, error: BaseException
) -> None:
    """RQ's failure of a job, final: retries are for jobs whose worker was lost. What RQ's
    `_finalize_failure` does, less the job's failure callback: none runs, ever."""
    if job.retries_left:
        job.retries_left = 0
    worker.handle_execution_ended(job, queue, job.failure_callback_timeout)
    exc_info = (type(error), error, None)
    worker.handle_exception(job, *exc_info)
    worker.handle_job_failure(job, queue, exc_string=format_exc_info(exc_info), execution=execution)


def record_cancel(worker: BaseWorker, job: Job, execution: Execution | None) -> None:
    """RQ's cancel of a running job: its execution cleaned up, its status `canceled`
    (unless the gateway canceled it first), and out of RQ's registries."""
    with worker.connection.pipeline() as pipe:
        worker.cleanup_execution(job, pipeline=pipe, execution=execution)
        pipe.execute()
    job.ended_at = now()
    if job.get_status(refresh=True) != JobStatus.CANCELED:
        job.cancel()


def expire_canceled(pipe: Any, queue: Queue, job: Job, ttl: int) -> None:
    """RQ's cancel keeps the job's hash forever and scores its canceled registry entry at
    the cancel itself; here both expire after `ttl` instead."""
    queue.canceled_job_registry.add(job, ttl, pipeline=pipe)
    pipe.expire(job.key, ttl)


def kept_for_s(job: Job, succeeded: bool) -> int:
    """How long an ended job is kept: its result TTL once succeeded, its failure TTL once
    failed or canceled (RQ's default failure TTL when it has none)."""
    ttl = job.result_ttl if succeeded else job.failure_ttl
    return ttl if ttl is not None and ttl > 0 else DEFAULT_FAILURE_TTL


def times_of(job: Job) -> tuple[datetime | None, datetime | None, datetime | None]:
    """When the job was enqueued, started and ended (naive UTC, as RQ keeps them)."""
    return job.enqueued_at, job.started_at, job.ended_at


def timeout_s(job: Job) -> float | None:
    """The job's timeout, or None when it has none."""
    timeout = job.timeout
    return float(timeout) if timeout is not None and timeout > 0 else None


def meta_of(job: Job) -> dict[str, Any]:
    return dict(job.meta)  # a copy: the worker's to change


def with_status(connection: Redis, job_ids: Sequence[str], status: str) -> list[str]:
    """Those of the jobs whose stored RQ status is `status` ("finished", "failed", ...)."""
    with connection.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "status")
        stored = pipe.execute()
    return [i for i, value in zip(job_ids, stored, strict=True) if value and _text(value) == status]


# -- 2. queued jobs -----------------------------------------------------------------------


def queued_ids(connection: Redis, queue: Queue, count: int) -> list[str]:
    """The ids of the first `count` jobs waiting in the queue, oldest first."""
    return [_text(i) for i in connection.lrange(queue.key, 0, count - 1)]


def claim(connection: Redis, queue: Queue, job_ids: Sequence[str]) -> list[str]:
    """Take these jobs out of the queue, as RQ's dequeue would; those still there."""
    script = connection.register_script(CLAIM_SCRIPT)
    claimed = script(keys=[queue.key, queue.intermediate_queue_key], args=list(job_ids))
    return [_text(i) for i in claimed]


def fetch_jobs(connection: Redis, job_ids: Sequence[str]) -> list[Job]:
    """The jobs of these ids that still exist, in one round trip."""
    jobs = Job.fetch_many(list(job_ids), connection=connection, serializer=SERIALIZER)
    return [job for job in jobs if job is not None]


class UnreadableJob(Exception):
    """The job's data is not a JSON-serialised RQ job."""


@dataclass(frozen=True)
class Call:
    """What RQ would call for the job: `function(*args, **kwargs)`, bound to an instance if
    `bound`. Read only: nothing is imported."""

    function: str | None
    bound: bool
    args: Any
    kwargs: Any


def call_of(job: Job) -> Call:
    try:
        return Call(job.func_name, job.instance is not None, job.args, job.kwargs)
    except DeserializationError:
        raise UnreadableJob(job.id) from None


FOREIGN_FIELDS = (
    "success_callback_name",
    "failure_callback_name",
    "stopped_callback_name",
    "dependency_id",
    "dependency_ids",
    "webhooks",
)
"""Fields of an RQ job hash through which RQ imports and calls what a job names (callbacks,
while ending it), enqueues other jobs (dependencies) or POSTs (webhooks)."""


def armed_with(job: Job) -> list[str]:
    """What RQ would import, call, enqueue or contact when ending the job; [] for none."""
    # Private: RQ resolves callbacks lazily from these names, and its public properties
    # (`success_callback`, ...) would import what they name; `dependency` would fetch.
    callbacks = {
        "a success callback": job._success_callback_name,
        "a failure callback": job._failure_callback_name,
        "a stopped callback": job._stopped_callback_name,
    }
    found = [kind for kind, name in callbacks.items() if name]
    if job._dependency_ids:
        found.append("dependencies")
    if job.webhooks:
        found.append("RQ webhooks")
    return found


def disarm(job: Job) -> None:
    """Forget what the job names, in memory and in its hash, so that no path of RQ's (its
    failure here, or any worker's lost-job cleanup later) imports, calls or contacts it."""
    # Private: RQ has no public way to drop a job's callbacks or dependencies.
    job._success_callback_name = job._failure_callback_name = job._stopped_callback_name = None
    # None: resolved to no callback (RQ's unevaluated marker would resolve the names).
    job._success_callback = job._failure_callback = job._stopped_callback = None  # type: ignore[assignment]
    job._dependency_ids = []
    job.webhooks = []
    job.connection.hdel(job.key, *FOREIGN_FIELDS)


# -- 3. lost jobs and registries -------------------------------------------------------------


def reap_lost(queue: Queue) -> list[str]:
    """Run RQ's lost-job cleanup on the queue: each job whose execution expired (its worker
    stopped heartbeating) is queued again while it has retries left, else fails with
    AbandonedJobError. The ids of those jobs."""
    registry = queue.started_job_registry
    lost = registry.get_expired_job_ids()
    registry.cleanup()
    return lost


def drop_expired_entries(connection: Redis, queue: Queue) -> None:
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
