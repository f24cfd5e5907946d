"""What the gateway's RQ adapter (service/rq_adapter.py) relies on in RQ, against a real
Redis and RQ's own worker: a new RQ version that changes any of it fails here.

Pinned: the key names (also in the README, KEDA's trigger and the admission script), the
status strings a job hash holds as it moves (the admission script and waits read them),
every RQ status mapped, one-transaction enqueue, a lost worker's failure after RQ's
StartedJobRegistry.cleanup (and its retry), a timeout, a plain failure, fetch_many's
None for a job gone, the canceled state and its TTLs, delete.
"""

from __future__ import annotations

import time
import uuid
from datetime import timezone
from typing import Any

import pytest
from rq.job import Job
from rq.job import JobStatus as RQStatus

from ddim_inversion.contract import JobStatus
from ddim_inversion.errors import ErrorCode
from service import rq_adapter
from service.rq_adapter import Queue, StoredJob
from tests.rq_contract.rqs_worker import RQsWorker

QUEUE = "contract"
FAILURE_TTL_S = 300


@pytest.fixture
def queue(redis_client: Any) -> Queue:
    return rq_adapter.open_queue(redis_client, QUEUE)


def enqueue(connection: Any, queue: Queue, job_id: str | None = None, **options: Any) -> StoredJob:
    """The adapter's enqueue with the gateway's shape of job and small TTLs."""
    kwargs: dict[str, Any] = {
        "timeout_s": 60,
        "result_ttl_s": 600,
        "failure_ttl_s": FAILURE_TTL_S,
        "max_retries": 0,
        "before": lambda pipe: pipe.set("written-before", b"1"),
        "after": lambda pipe: pipe.set("written-after", b"1"),
    }
    return rq_adapter.enqueue(
        connection,
        queue,
        job_id or str(uuid.uuid4()),
        {"params": {"prompt": "a cat"}},
        {"owner": "alice"},
        **(kwargs | options),
    )


def run_probe(connection: Any, queue: Queue, function: str, *args: Any, **options: Any) -> str:
    """Queue a probe of tests/rq_contract/gateway_probes.py and run it in RQ's worker."""
    job = queue.enqueue_call(
        f"tests.rq_contract.gateway_probes.{function}",
        args=args,
        failure_ttl=FAILURE_TTL_S,
        **options,
    )
    worker = RQsWorker([queue], connection=connection, serializer=queue.serializer)
    worker.work(burst=True)
    return job.id


def raw_status(connection: Any, job_id: str) -> bytes | None:
    """What the admission script and the waits read: one field of RQ's job hash."""
    return connection.hget(rq_adapter.JOB_KEY_PREFIX + job_id, rq_adapter.STATUS_FIELD)


def test_every_rq_status_has_a_contract_state() -> None:
    assert set(rq_adapter.STATUS_BY_RQ) == {status.value for status in RQStatus}
    running = {rq for rq, state in rq_adapter.STATUS_BY_RQ.items() if state is JobStatus.RUNNING}
    assert running == {RQStatus.STARTED.value}


def test_key_names(queue: Queue) -> None:
    # Named in the README, docker/k8s (KEDA's list trigger) and the admission script.
    assert rq_adapter.queue_key(queue) == f"rq:queue:{QUEUE}"
    assert rq_adapter.started_key(queue) == f"rq:wip:{QUEUE}"
    assert rq_adapter.job_key("j") == rq_adapter.JOB_KEY_PREFIX + "j" == "rq:job:j"
    assert rq_adapter.queue_name(queue) == QUEUE


def test_enqueue_writes_the_job_where_the_gateway_reads_it(redis_client, queue) -> None:
    job = enqueue(redis_client, queue)
    assert (job.status, job.id) == (JobStatus.QUEUED, job.id)
    assert redis_client.lrange(rq_adapter.queue_key(queue), 0, -1) == [job.id.encode()]
    assert raw_status(redis_client, job.id) == b"queued"
    assert "queued" in rq_adapter.ACTIVE_STATUSES
    assert redis_client.get("written-before") == redis_client.get("written-after") == b"1"

    stored = rq_adapter.fetch(redis_client, job.id)
    assert stored is not None and stored.id == job.id
    assert stored.status is JobStatus.QUEUED
    assert stored.payload == {"params": {"prompt": "a cat"}}
    assert stored.meta["owner"] == "alice"
    assert stored.timeout_s == 60
    assert stored.created_at is not None and stored.created_at.tzinfo is timezone.utc
    assert stored.enqueued_at is not None and stored.enqueued_at >= stored.created_at
    assert stored.started_at is None and stored.ended_at is None
    assert rq_adapter.queue_depth(queue) == 1


def test_rq_writes_only_on_the_transaction_it_is_given(redis_client, queue) -> None:
    """Nothing of the job lands when the transaction never runs: RQ queued every write."""

    def refuse(pipe: Any) -> None:
        raise RuntimeError("refused after RQ's writes were queued")

    job_id = str(uuid.uuid4())
    with pytest.raises(RuntimeError):
        enqueue(redis_client, queue, job_id, after=refuse)
    assert redis_client.keys("*") == []
    assert rq_adapter.fetch(redis_client, job_id) is None


def test_an_id_is_enqueued_once_when_exclusive(redis_client, queue) -> None:
    job_id = str(uuid.uuid4())
    enqueue(redis_client, queue, job_id, exclusive=True)
    with pytest.raises(rq_adapter.AlreadyEnqueued):
        enqueue(redis_client, queue, job_id, exclusive=True)
    assert redis_client.lrange(rq_adapter.queue_key(queue), 0, -1) == [job_id.encode()]


def test_a_job_a_worker_runs_then_finishes(redis_client, queue) -> None:
    job_id = run_probe(redis_client, queue, "report_while_running")
    seen = Job.fetch(job_id, connection=redis_client, serializer=queue.serializer)
    assert seen.latest_result().return_value == {
        "status": "started",
        "running": 1,
        "fetched": "running",
    }
    assert raw_status(redis_client, job_id) == b"finished"
    assert "finished" not in rq_adapter.ACTIVE_STATUSES
    stored = rq_adapter.fetch(redis_client, job_id)
    assert stored.status is JobStatus.SUCCEEDED
    assert stored.started_at <= stored.ended_at and stored.ended_at.tzinfo is timezone.utc
    counts = rq_adapter.registry_counts(queue)
    assert set(counts) == {"started", "finished", "failed", "canceled", "deferred", "scheduled"}
    assert (counts["started"], counts["finished"]) == (0, 1)


def test_a_failure_keeps_its_last_exception_line(redis_client, queue) -> None:
    job_id = run_probe(redis_client, queue, "raise_error", "the image is odd")
    assert raw_status(redis_client, job_id) == b"failed"
    stored = rq_adapter.fetch(redis_client, job_id)
    assert stored.status is JobStatus.FAILED
    error = rq_adapter.failure_of(stored)
    assert (error.code, error.message) == (ErrorCode.INTERNAL, "ValueError: the image is odd")
    assert rq_adapter.failed_at(stored) == stored.ended_at.timestamp()
    assert redis_client.zscore(rq_adapter.failed_key(queue), job_id) is not None


def test_a_timeout_is_told_apart(redis_client, queue) -> None:
    job_id = run_probe(redis_client, queue, "sleep", 30, timeout=1)
    stored = rq_adapter.fetch(redis_client, job_id)
    assert stored.status is JobStatus.FAILED
    assert rq_adapter.failure_of(stored).code is ErrorCode.TIMEOUT


def lose_the_worker(connection: Any, queue: Queue, job_id: str) -> None:
    """An RQ worker takes the job and starts it (its own steps up to the job function),
    then dies without a trace; RQ's cleanup of the started registry, which every worker
    runs, finds it once its heartbeat would have expired."""
    worker = RQsWorker([queue], connection=connection, serializer=queue.serializer)
    job, _ = worker.dequeue_job_and_maintain_ttl(timeout=1)
    assert job.id == job_id
    worker.prepare_execution(job)
    worker.prepare_job_execution(job)
    assert raw_status(connection, job_id) == b"started"
    queue.started_job_registry.cleanup(timestamp=time.time() + 3600)


def test_a_lost_worker_after_the_last_retry(redis_client, queue) -> None:
    job = enqueue(redis_client, queue)
    lose_the_worker(redis_client, queue, job.id)
    stored = rq_adapter.fetch(redis_client, job.id)
    assert stored.status is JobStatus.FAILED
    assert stored.ended_at is None  # RQ's cleanup sets no end: the Result's time stands in
    error = rq_adapter.failure_of(stored)
    assert error.code is ErrorCode.WORKER_LOST
    result = Job.fetch(job.id, connection=redis_client, serializer=queue.serializer)
    created = result.latest_result().created_at.replace(tzinfo=timezone.utc)
    assert rq_adapter.failed_at(stored) == created.timestamp()
    assert redis_client.zscore(rq_adapter.failed_key(queue), job.id) is not None


def test_a_lost_worker_with_a_retry_left_queues_the_job_again(redis_client, queue) -> None:
    job = enqueue(redis_client, queue, max_retries=1)
    lose_the_worker(redis_client, queue, job.id)
    assert rq_adapter.fetch(redis_client, job.id).status is JobStatus.QUEUED
    assert raw_status(redis_client, job.id).decode() in rq_adapter.ACTIVE_STATUSES
    assert redis_client.lrange(rq_adapter.queue_key(queue), 0, -1) == [job.id.encode()]


def test_cancel_and_delete(redis_client, queue) -> None:
    job = enqueue(redis_client, queue)
    done: list[rq_adapter.Cancellation] = []
    error = {"error": {"code": "canceled", "message": "canceled by the client"}}
    rq_adapter.cancel(redis_client, job, error, lambda pipe, c: done.append(c))
    assert done == [rq_adapter.Cancellation(ttl_s=FAILURE_TTL_S, here=True)]
    assert raw_status(redis_client, job.id) == b"canceled"
    assert redis_client.llen(rq_adapter.queue_key(queue)) == 0
    stored = rq_adapter.fetch(redis_client, job.id)
    assert stored.status is JobStatus.CANCELED
    assert stored.meta == {"owner": "alice", **error}
    # Both expire like a failed job, not never (the hash) or at once (the registry entry).
    assert 0 < redis_client.ttl(rq_adapter.job_key(job.id)) <= FAILURE_TTL_S
    canceled = queue.canceled_job_registry.key
    assert redis_client.zscore(canceled, job.id) > time.time() + FAILURE_TTL_S - 60
    assert rq_adapter.registry_counts(queue)["canceled"] == 1

    rq_adapter.cancel(redis_client, stored, {}, lambda pipe, c: done.append(c))
    assert done[-1].here is False

    rq_adapter.delete(stored)
    assert rq_adapter.fetch(redis_client, job.id) is None
    assert redis_client.zscore(canceled, job.id) is None


def test_fetch_many_and_a_value_beside_the_job(redis_client, queue) -> None:
    first, second = enqueue(redis_client, queue), enqueue(redis_client, queue)
    gone = str(uuid.uuid4())
    fetched = rq_adapter.fetch_many(redis_client, [first.id, gone, second.id])
    assert [job.id if job else None for job in fetched] == [first.id, None, second.id]
    redis_client.set("beside", b"bytes")
    job, value = rq_adapter.fetch_and_get(redis_client, first.id, "beside")
    assert (job.id, value) == (first.id, b"bytes")
    assert rq_adapter.fetch_and_get(redis_client, gone, "beside") == (None, b"bytes")
    assert rq_adapter.contract_status(None) is None
