"""The batching worker when Redis is away or full, in-process against a private redis-server
that each test stops, restarts or fills (`maxmemory`) at a moment a UNet hook picks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from ddim_inversion.keys import result_key
from tests.conftest import EVENT_GUARD_S, RedisServer
from tests.jobs_helper import enqueue

STEPS = 3

PERSISTENT = ["--appendonly", "yes", "--appendfsync", "always"]
"""A Redis that comes back from a restart with its jobs."""


@pytest.fixture
def server(tmp_path) -> Iterator[RedisServer]:
    redis_server = RedisServer(tmp_path, PERSISTENT)
    redis_server.start()
    yield redis_server
    redis_server.stop()


@pytest.fixture
def connection(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()


def later(seconds: float, action: Callable[[], object]) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


def at_call(model, number: int, action: Callable[[], object]) -> tuple[list[int], Callable]:
    """Run `action` once, as the UNet is called for the `number`-th time; (the calls so far,
    a function removing the hook)."""
    calls: list[int] = []

    def hook(module, args) -> None:
        calls.append(1)
        if len(calls) == number:
            action()

    return calls, model.unet.register_forward_pre_hook(hook).remove


def fetch(connection: redis.Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=connection, serializer=JSONSerializer)


class Records(logging.Handler):
    """What the worker logs (RQ's worker logger does not propagate to pytest's capture),
    with an action to run when a message containing `when` is logged."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.actions: dict[str, Callable[[], object]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        for when, action in list(self.actions.items()):
            if when in message:
                del self.actions[when]
                action()


@pytest.fixture
def worker_log() -> Iterator[Records]:
    records = Records()
    logger = logging.getLogger("rq.worker")
    logger.addHandler(records)
    yield records
    logger.removeHandler(records)


def test_outage_past_the_wait_gives_the_batch_up_and_it_runs_again(
    server, connection, tiny_model, worker_log, make_worker
):
    job_id = enqueue(connection, num_inference_steps=STEPS, retries=1)
    worker = make_worker(
        connection,
        tiny_model,
        1,
        redis_outage_wait_s=0.5,
        lost_after_s=1,
        heartbeat_s=0.1,
        progress_interval_s=0,
    )
    # Redis goes at the first step: every progress write, cancel poll and heartbeat of the
    # batch fails, then the result's write; Redis is back once the worker gave the wait up.
    worker_log.actions["giving them up"] = server.start
    # Should the worker never give up, Redis comes back anyway, and the test fails instead
    # of hanging.
    fallback = later(EVENT_GUARD_S, lambda: server.process is None and server.start())
    calls, remove = at_call(tiny_model, 1, server.stop)
    try:
        worker.work(burst=True)
        # A burst worker quits on an empty queue: the given-up job is back in it only once
        # its execution has expired and a lost-job cleanup ran, so drain again until then.
        deadline = time.monotonic() + EVENT_GUARD_S  # a last guard: the drain is the event
        while len(calls) < 2 * STEPS and time.monotonic() < deadline:
            time.sleep(0.2)
            worker.work(burst=True)
    finally:
        remove()
        fallback.cancel()
    assert "giving them up" not in worker_log.actions, "the worker gave the batch up"
    warnings = [m for m in worker_log.messages if "Redis unavailable" in m]
    assert len(warnings) <= 2, f"warnings about one outage are rate-limited: {warnings}"
    # Given up, its execution expired; once Redis was back the worker's lost-job cleanup
    # queued it again, and it ran a second time.
    assert len(calls) == 2 * STEPS
    assert fetch(connection, job_id).get_status() == JobStatus.FINISHED
    assert connection.get(result_key(job_id)) is not None


def test_full_redis_at_the_store_is_waited_on_then_takes_the_result(
    connection, tiny_model, make_worker
):
    job_id = enqueue(connection, num_inference_steps=STEPS)
    worker = make_worker(connection, tiny_model, 1, redis_outage_wait_s=30)
    timers: list[threading.Timer] = []

    def fill() -> None:
        connection.config_set("maxmemory", "1")  # every write refused: out of memory
        timers.append(later(1.5, lambda: connection.config_set("maxmemory", "0")))

    _, remove = at_call(tiny_model, STEPS, fill)
    try:
        worker.work(burst=True)
    finally:
        remove()
        for timer in timers:
            timer.join()
    assert fetch(connection, job_id).get_status() == JobStatus.FINISHED
    assert connection.get(result_key(job_id)) is not None


def test_full_redis_at_dequeue_does_not_stop_the_worker(connection, tiny_model, make_worker):
    job_id = enqueue(connection, num_inference_steps=STEPS)
    worker = make_worker(connection, tiny_model, 1)
    connection.config_set("maxmemory", "1")
    timer = later(1.5, lambda: connection.config_set("maxmemory", "0"))
    try:
        dequeued = worker.dequeue_job_and_maintain_ttl(None)
    finally:
        timer.join()
    assert dequeued is not None
    assert dequeued[0].id == job_id
