"""What the worker relies on in RQ, pinned against a real Redis: a new RQ version that
changes any of it fails here (worker/rq_adapter.py, worker/rq_worker.py).

The records a job's start, success and failure leave are compared, key by key, with what
RQ's own worker leaves for the same job in a second Redis database: the same keys, types,
fields and values, and TTLs and registry scores within a few seconds. Only what differs
by nature is set aside: ids of executions, timestamps, tracebacks, and the worker's own
registration (birth, state; its job counters are compared).
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import re
import signal
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from rq import Callback, Queue, Retry
from rq.defaults import DEFAULT_FAILURE_TTL
from rq.exceptions import StopRequested
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from tests.conftest import EVENT_GUARD_S, RedisServer, wait_for
from tests.rq_contract import job_functions
from tests.rq_contract.rqs_worker import RQsWorker
from worker import rq_adapter
from worker.rq_worker import DEQUEUE_WAIT_S, BaseWorker

QUEUE = "contract"
WORKER = "contract-worker"
TTL_S = 30
"""The execution TTL of both workers: the one policy the worker changes on purpose."""

FUNCTIONS = "tests.rq_contract.job_functions"

EXCLUDED = re.compile(rb"^rq:(worker:[^:]+|workers(:.*)?|clean_groups|clean_registries:.*)$")
"""The workers' registration and RQ's maintenance locks: the loop's, not a job's records."""

EXECUTION_ID = re.compile(rb"[0-9a-f]{32}")
ISO_TIME = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z?")
EPOCH = re.compile(rb"^1\d{9}(\.\d+)?$")


class RQsOwnWorker(RQsWorker):
    """RQ's worker, its execution TTL set to the adapter's."""

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return TTL_S


TRACEBACK_FIELDS = {b"exc_string", b"exc_info"}
"""Where a failure's traceback is kept: RQ's has frames, the adapter's none (compared: the
exception's line)."""


def normal(value: bytes, field: bytes = b"") -> bytes:
    if field in TRACEBACK_FIELDS:
        with contextlib.suppress(ValueError, zlib.error):  # a result stream's: compressed
            value = zlib.decompress(base64.b64decode(value, validate=True))
        return value.strip().splitlines()[-1]
    value = EXECUTION_ID.sub(b"<execution>", value)
    value = ISO_TIME.sub(b"<time>", value)
    return EPOCH.sub(b"<time>", value)


def records(connection: redis.Redis) -> dict[tuple, Any]:
    """Every record in the database, flattened: (key, part...) -> value; numbers (TTLs, and
    registry scores relative to now) kept as floats."""
    now = time.time()
    out: dict[tuple, Any] = {}
    for key in sorted(connection.keys("*")):
        if EXCLUDED.match(key):
            continue
        kind = connection.type(key).decode()
        name = normal(key)
        ttl = connection.ttl(key)
        out[(name, "ttl")] = "persistent" if ttl == -1 else float(ttl)
        if kind == "hash":
            for field, value in connection.hgetall(key).items():
                out[(name, field)] = normal(value, field)
        elif kind == "zset":
            for member, score in connection.zrange(key, 0, -1, withscores=True):
                out[(name, normal(member))] = score - now if score > 1e9 else score
        elif kind == "set":
            out[(name, "members")] = sorted(normal(m) for m in connection.smembers(key))
        elif kind == "list":
            out[(name, "items")] = [normal(m) for m in connection.lrange(key, 0, -1)]
        elif kind == "stream":
            for index, (_, fields) in enumerate(connection.xrange(key)):
                for field, value in fields.items():
                    out[(name, index, field)] = normal(value, field)
        else:
            out[(name, "value")] = normal(connection.get(key))
    return out


def assert_same(ours: dict[tuple, Any], rqs: dict[tuple, Any], *, lag_s: float) -> None:
    """The same records; a TTL or a score relative to now equal up to the time between its
    write and its reading, in either database (at most `lag_s`, the test's time from its
    first write to its last reading), and 1 s for TTLs' and RQ's whole seconds."""
    assert set(ours) - set(rqs) == set(), "records RQ's worker does not write"
    assert set(rqs) - set(ours) == set(), "records RQ's worker writes, missing"
    for path, expected in rqs.items():
        if isinstance(expected, float):
            assert ours[path] == pytest.approx(expected, abs=lag_s + 1), path
        else:
            assert ours[path] == expected, path


@pytest.fixture
def databases(redis_url: str) -> Iterator[tuple[redis.Redis, redis.Redis]]:
    """(RQ's worker's database, the adapter's): one server, flushed for each test."""
    base = redis_url.rsplit("/", 1)[0]
    theirs, ours = redis.Redis.from_url(f"{base}/1"), redis.Redis.from_url(f"{base}/2")
    yield theirs, ours
    theirs.close()
    ours.close()


def queue_on(connection: redis.Redis) -> Queue:
    return rq_adapter.open_queue(connection, QUEUE)


def enqueue(connection: redis.Redis, function: str, job_id: str, **options: Any) -> Job:
    options = {"result_ttl": 100, "failure_ttl": 200, "ttl": 500} | options
    return queue_on(connection).enqueue(f"{FUNCTIONS}.{function}", 3, job_id=job_id, **options)


def run_by_rq(connection: redis.Redis) -> None:
    queues = [queue_on(connection)]
    worker = RQsOwnWorker(queues, connection=connection, name=WORKER, serializer=JSONSerializer)
    worker.work(burst=True)


def adapter_worker(connection: redis.Redis) -> BaseWorker:
    return BaseWorker(
        [queue_on(connection)], connection=connection, name=WORKER, execution_ttl_s=TTL_S
    )


def dequeue_and_start(worker: BaseWorker) -> tuple[Job, rq_adapter.Execution]:
    """RQ's dequeue, then the adapter's start of the job, as the batching worker does."""
    dequeued = Queue.dequeue_any(
        worker.queues, None, connection=worker.connection, serializer=JSONSerializer
    )
    assert dequeued is not None
    job, queue = dequeued
    with worker.connection.pipeline() as pipe:
        (execution,) = rq_adapter.start_jobs(worker, pipe, queue, [job])
        pipe.execute()
    return job, execution


@pytest.fixture
def observed() -> Iterator[list[dict[tuple, Any]]]:
    """The records of RQ's worker's database, taken while its job runs."""
    taken: list[dict[tuple, Any]] = []
    job_functions.DURING.append(lambda job: taken.append(records(job.connection)))
    yield taken
    job_functions.DURING.clear()


def test_a_started_job_has_the_records_rqs_worker_writes_at_a_start(databases, observed):
    theirs, ours = databases
    job_id = str(uuid.uuid4())
    began = time.monotonic()
    enqueue(theirs, "observe", job_id)
    run_by_rq(theirs)
    enqueue(ours, "observe", job_id)
    dequeue_and_start(adapter_worker(ours))

    (started,) = observed
    assert_same(records(ours), started, lag_s=time.monotonic() - began)
    assert Job.fetch(job_id, connection=ours).get_status() == JobStatus.STARTED


def test_a_succeeded_job_has_the_records_rqs_worker_writes_at_a_success(databases):
    theirs, ours = databases
    job_id = str(uuid.uuid4())
    began = time.monotonic()
    enqueue(theirs, "observe", job_id)
    run_by_rq(theirs)
    enqueue(ours, "observe", job_id)
    worker = adapter_worker(ours)
    job, execution = dequeue_and_start(worker)
    with ours.pipeline() as pipe:
        rq_adapter.record_success(worker, pipe, job, execution, {"value": 3})
        pipe.execute()

    assert_same(records(ours), records(theirs), lag_s=time.monotonic() - began)
    counters = [b"successful_job_count", b"total_working_time"]
    assert ours.hmget(f"rq:worker:{WORKER}", counters)[0] == b"1"
    assert theirs.hmget(f"rq:worker:{WORKER}", counters)[0] == b"1"
    assert Job.fetch(job_id, connection=ours, serializer=JSONSerializer).return_value() == {
        "value": 3
    }


def test_a_failed_job_has_the_records_rqs_worker_writes_at_a_failure(databases):
    theirs, ours = databases
    job_id = str(uuid.uuid4())
    began = time.monotonic()
    enqueue(theirs, "explode", job_id)
    run_by_rq(theirs)
    enqueue(ours, "explode", job_id)
    worker = adapter_worker(ours)
    job, execution = dequeue_and_start(worker)
    rq_adapter.record_failure(worker, queue_on(ours), job, execution, RuntimeError("boom 3"))

    assert_same(records(ours), records(theirs), lag_s=time.monotonic() - began)
    assert ours.hget(f"rq:worker:{WORKER}", "failed_job_count") == b"1"
    assert theirs.hget(f"rq:worker:{WORKER}", "failed_job_count") == b"1"


def test_a_failure_is_final_even_with_retries_left(redis_client):
    enqueue(redis_client, "explode", "job-with-retries", retry=Retry(max=2))
    worker = adapter_worker(redis_client)
    job, execution = dequeue_and_start(worker)
    rq_adapter.record_failure(worker, queue_on(redis_client), job, execution, RuntimeError("x"))

    assert Job.fetch(job.id, connection=redis_client).get_status() == JobStatus.FAILED
    assert queue_on(redis_client).job_ids == []
    assert queue_on(redis_client).failed_job_registry.get_job_ids() == [job.id]


ARMED = {
    "on_success": Callback(f"{FUNCTIONS}.on_success"),
    "on_failure": Callback(f"{FUNCTIONS}.on_failure"),
    "on_stopped": Callback(f"{FUNCTIONS}.on_stopped"),
}


def test_armed_with_names_what_rq_would_run_and_disarm_forgets_it(redis_client):
    queue = queue_on(redis_client)
    other = enqueue(redis_client, "observe", "dependency")
    job = enqueue(redis_client, "observe", "armed", depends_on=other, **ARMED)
    fetched = Job.fetch(job.id, connection=redis_client, serializer=JSONSerializer)
    assert rq_adapter.armed_with(fetched) == [
        "a success callback",
        "a failure callback",
        "a stopped callback",
        "dependencies",
    ]
    rq_adapter.disarm(fetched)
    assert rq_adapter.armed_with(fetched) == []
    # In its hash too: any other worker reading it later finds nothing to run.
    again = Job.fetch(job.id, connection=redis_client, serializer=JSONSerializer)
    assert rq_adapter.armed_with(again) == []
    assert queue.count == 1  # the dependency; the armed job waits for it, deferred


def test_call_of_reads_a_job_without_importing_what_it_names(redis_client):
    job = queue_on(redis_client).enqueue("no_such_module.anywhere", 1, key="v", job_id="x")
    call = rq_adapter.call_of(Job.fetch(job.id, connection=redis_client, serializer=JSONSerializer))
    assert call == rq_adapter.Call("no_such_module.anywhere", False, [1], {"key": "v"})
    redis_client.hset(Job.key_for("x"), "data", b"not json")
    with pytest.raises(rq_adapter.UnreadableJob):
        rq_adapter.call_of(Job.fetch("x", connection=redis_client, serializer=JSONSerializer))


def test_a_disarmed_job_fails_and_is_reaped_without_running_a_callback(redis_client):
    job_functions.CALLED.clear()
    for job_id in ("failed-here", "lost"):
        enqueue(redis_client, "observe", job_id, **ARMED)
    worker = adapter_worker(redis_client)
    for _ in range(2):
        job, execution = dequeue_and_start(worker)
        rq_adapter.disarm(job)
        if job.id == "failed-here":
            rq_adapter.record_failure(worker, queue_on(redis_client), job, execution, ValueError())
    # The other one's worker is lost: RQ's cleanup, run by any worker later, fails it.
    lost_key = queue_on(redis_client).started_job_registry.key
    redis_client.zadd(lost_key, {m: 1 for m in redis_client.zrange(lost_key, 0, -1)})
    assert rq_adapter.reap_lost(queue_on(redis_client)) == ["lost"]

    assert job_functions.CALLED == []
    for job_id in ("failed-here", "lost"):
        assert Job.fetch(job_id, connection=redis_client).get_status() == JobStatus.FAILED


def test_reaping_runs_a_lost_job_again_while_it_has_retries(redis_client):
    enqueue(redis_client, "observe", "retried", retry=Retry(max=1))
    worker = adapter_worker(redis_client)
    dequeue_and_start(worker)
    queue = queue_on(redis_client)
    assert rq_adapter.reap_lost(queue) == [], "not lost while its execution lives"
    key = queue.started_job_registry.key
    redis_client.zadd(key, {m: 1 for m in redis_client.zrange(key, 0, -1)})  # expired

    assert rq_adapter.reap_lost(queue) == ["retried"]
    assert queue.job_ids == ["retried"]
    dequeue_and_start(worker)
    redis_client.zadd(key, {m: 1 for m in redis_client.zrange(key, 0, -1)})
    assert rq_adapter.reap_lost(queue) == ["retried"]
    job = Job.fetch("retried", connection=redis_client, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FAILED
    # The gateway reports this as `worker_lost` by this name.
    assert "AbandonedJobError" in job.latest_result().exc_string
    assert rq_adapter.with_status(redis_client, ["retried"], "failed") == ["retried"]


def test_a_canceled_job_leaves_rqs_registries_and_expires(redis_client):
    enqueue(redis_client, "observe", "canceled")
    worker = adapter_worker(redis_client)
    job, execution = dequeue_and_start(worker)
    queue = queue_on(redis_client)
    before = time.time()
    rq_adapter.record_cancel(worker, job, execution)
    with redis_client.pipeline() as pipe:
        rq_adapter.expire_canceled(pipe, queue, job, rq_adapter.kept_for_s(job, succeeded=False))
        pipe.execute()

    assert Job.fetch(job.id, connection=redis_client).get_status() == JobStatus.CANCELED
    assert queue.started_job_registry.get_job_ids() == []
    assert redis_client.keys("rq:execution:*") == []
    # Set between `before` and now: 200 s from then, to RQ's and Redis's whole seconds (1 s).
    ttl = redis_client.ttl(job.key)
    expiry = redis_client.zscore(queue.canceled_job_registry.key, job.id)
    after = time.time()
    assert 200 - math.ceil(after - before) - 1 <= ttl <= 200
    assert before + 200 - 1 <= expiry <= after + 200 + 1


def test_expired_entries_leave_the_ended_registries_and_no_other(redis_client):
    queue = queue_on(redis_client)
    registries = [queue.finished_job_registry, queue.failed_job_registry]
    registries.append(queue.canceled_job_registry)
    for registry in registries:
        redis_client.zadd(registry.key, {"old": 1, "new": time.time() + 60})
    redis_client.zadd(queue.started_job_registry.key, {"old:x": 1})
    rq_adapter.drop_expired_entries(redis_client, queue)
    for registry in registries:
        assert redis_client.zrange(registry.key, 0, -1) == [b"new"]
    assert redis_client.zrange(queue.started_job_registry.key, 0, -1) == [b"old:x"]


def test_claimed_jobs_are_where_rqs_dequeue_puts_the_job_it_takes(redis_client):
    ids = [enqueue(redis_client, "observe", f"job-{i}").id for i in range(4)]
    queue = queue_on(redis_client)
    Queue.dequeue_any([queue], None, connection=redis_client, serializer=JSONSerializer)
    assert rq_adapter.queued_ids(redis_client, queue, 2) == ids[1:3]
    # A job already taken (ids[0]) or not queued is skipped.
    assert rq_adapter.claim(redis_client, queue, [ids[0], ids[2], "nowhere"]) == [ids[2]]
    assert queue.job_ids == [ids[1], ids[3]]
    intermediate = [i.decode() for i in redis_client.lrange(queue.intermediate_queue_key, 0, -1)]
    assert intermediate == [ids[0], ids[2]]
    assert [job.id for job in rq_adapter.fetch_jobs(redis_client, [ids[2], "gone"])] == [ids[2]]


def test_keep_alive_extends_the_execution_and_the_started_entry(redis_client):
    enqueue(redis_client, "observe", "kept")
    worker = adapter_worker(redis_client)
    job, execution = dequeue_and_start(worker)
    key = queue_on(redis_client).started_job_registry.key
    redis_client.zadd(key, {m: time.time() + 1 for m in redis_client.zrange(key, 0, -1)})
    redis_client.expire(execution.key, 1)
    before = time.time()
    worker.keep_alive([(job, execution)])
    (score,) = [s for _, s in redis_client.zrange(key, 0, -1, withscores=True)]
    ttl = redis_client.ttl(execution.key)
    after = time.time()
    # Extended between `before` and now to TTL_S from then, to whole seconds (1 s).
    assert before + TTL_S - 1 <= score <= after + TTL_S + 1
    assert ttl >= TTL_S - math.ceil(after - before) - 1


def test_rqs_heartbeat_refreshes_the_worker_key(redis_client):
    worker = adapter_worker(redis_client)
    worker.register_birth()
    redis_client.expire(worker.key, 1)
    worker.rq_heartbeat()
    assert redis_client.ttl(worker.key) > 60
    assert worker.get_heartbeat_ttl(None) == TTL_S  # type: ignore[arg-type]


class Hooked(BaseWorker):
    """A worker whose hooks say when RQ's loop called them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    def run_dequeued(self, job: Job, queue: Queue) -> None:
        self.calls.append(f"run {job.id} from {queue.name}")

    def beat(self) -> None:
        self.calls.append("beat")

    def on_birth(self) -> None:
        self.calls.append("birth")

    def on_death(self) -> None:
        self.calls.append("death")


def test_rqs_loop_calls_the_hooks(redis_client):
    enqueue(redis_client, "observe", "hooked")
    worker = Hooked([queue_on(redis_client)], connection=redis_client, execution_ttl_s=TTL_S)
    worker.work(burst=True)
    calls = worker.calls
    assert calls[0] == "birth" and calls[-1] == "death"
    assert "run hooked from contract" in calls
    assert "beat" in calls[: calls.index("run hooked from contract")]


def test_listened_channels_reach_their_handler_on_rqs_pubsub_thread(redis_client):
    worker = adapter_worker(redis_client)
    heard: list[str] = []
    worker.listen("contract-channel", heard.append)
    worker.subscribe()
    try:
        wait_for(
            lambda: redis_client.publish("contract-channel", "job-7") and heard, EVENT_GUARD_S, "it"
        )
    finally:
        worker.unsubscribe()
    assert heard[0] == "job-7"
    assert worker.pubsub_thread is not None


def test_a_stop_requested_mid_job_ends_a_dequeue_that_waits_for_redis(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    connection = redis.Redis.from_url(server.url, socket_connect_timeout=1)
    worker = adapter_worker(connection)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        worker.set_state(WorkerStatus.BUSY)
        worker.request_stop(signal.SIGTERM, None)  # RQ's handler, mid-job: a flag only
        server.stop()
        outcome: list[BaseException] = []

        def dequeue() -> None:
            try:
                worker.dequeue_job_and_maintain_ttl(1)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=dequeue, daemon=True)
        thread.start()
        thread.join(EVENT_GUARD_S)
        assert outcome and isinstance(outcome[0], StopRequested)
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
        server.stop()
        connection.close()


class Swallowing(Hooked):
    """A worker whose idle heartbeat receives SIGTERM inside code that catches Exception,
    as a reaping hiccup's handler does: RQ's handler raises StopRequested right there."""

    def beat(self) -> None:
        super().beat()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(DEQUEUE_WAIT_S)  # the handler runs during the sleep, and raises
        except Exception as exc:
            self.calls.append(f"swallowed {type(exc).__name__}")


def test_a_stop_signal_swallowed_where_it_landed_still_stops_an_idle_worker(redis_client):
    worker = Swallowing([queue_on(redis_client)], connection=redis_client, execution_ttl_s=TTL_S)
    assert worker.dequeue_timeout == DEQUEUE_WAIT_S
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        # Not burst: the loop would dequeue (and beat) forever if the stop were lost; a
        # second signal, a beat later, would be RQ's cold shutdown (SystemExit) instead.
        worker.work(burst=False)
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
    assert worker.calls.count("swallowed StopRequested") == 1
    assert worker.calls[-1] == "death"


class StoppedAtBirth(Hooked):
    """A worker sent SIGTERM as it announces itself (on_birth), before RQ's loop starts."""

    def on_birth(self) -> None:
        super().on_birth()
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the next instruction, here


def test_a_stop_as_the_worker_announces_itself_ends_it_cleanly(redis_client):
    enqueue(redis_client, "observe", "never-run")
    worker = StoppedAtBirth(
        [queue_on(redis_client)], connection=redis_client, execution_ttl_s=TTL_S
    )
    caught: list[int] = []
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    # Should the worker's own handler not be in place yet, this one takes the signal (in a
    # worker process, SIGTERM's default action would kill it).
    signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    try:
        worker.work(burst=True)
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
    assert caught == [], "the worker announced itself before it could take a stop"
    assert worker.calls[0] == "birth" and worker.calls[-1] == "death"
    assert "run never-run from contract" not in worker.calls, "stopped before its first job"


def test_kept_for_and_timeouts_read_the_jobs_own_settings(redis_client):
    job = enqueue(redis_client, "observe", "ttl", result_ttl=100, failure_ttl=None, job_timeout=7)
    assert rq_adapter.kept_for_s(job, succeeded=True) == 100
    assert rq_adapter.kept_for_s(job, succeeded=False) == DEFAULT_FAILURE_TTL
    assert rq_adapter.timeout_s(job) == 7.0
    assert rq_adapter.result_ttl(adapter_worker(redis_client), job) == 100
    enqueued, started, ended = rq_adapter.times_of(job)
    assert enqueued is not None and started is None and ended is None
