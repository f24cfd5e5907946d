"""Admission, fair order and lost replies against a real Redis (the session's redis-server):
the Lua scripts run in Redis itself, and the lost reply loses only the network's answer."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
import redis as redis_lib
from fastapi.testclient import TestClient
from rq import Queue
from rq.serializers import JSONSerializer

from ddim_inversion.held_bytes import settle_held_bytes
from ddim_inversion.keys import (
    QUEUE_NAME,
    fair_rounds_key,
    input_key,
    owner_held_key,
    owner_held_total_key,
    owner_jobs_key,
    queue_name_for,
)
from ddim_inversion.params import InversionParams
from service import jobs, limits
from service.app import create_app
from service.errors import ProblemError
from service.settings import GatewaySettings

RGB = np.zeros((64, 64, 3), dtype=np.uint8)
PARAMS = InversionParams(prompt="a cat", num_inference_steps=2)
SIZE = limits.JobSize(cost=100, bytes=1000)


@pytest.fixture
def settings(redis_url: str) -> GatewaySettings:
    return GatewaySettings(redis_url=redis_url, auth_disabled=True)


@pytest.fixture
def queue(redis_client: Any) -> Queue:
    return Queue(QUEUE_NAME, connection=redis_client, serializer=JSONSerializer)


def ids(queue: Queue) -> list[str]:
    return [i.decode() for i in queue.connection.lrange(queue.key, 0, -1)]


# -- fair order -------------------------------------------------------------------------------


def test_a_new_key_runs_after_the_head_not_after_the_backlog(redis_client, queue, settings):
    names: dict[str, str] = {}

    def submit(owner: str) -> None:
        job = jobs.enqueue(redis_client, queue, settings, PARAMS, RGB, owner)
        names[job.id] = f"{owner}{sum(n.startswith(owner) for n in names.values()) + 1}"

    def order() -> list[str]:
        return [names.get(i, "retry") for i in ids(queue)]

    for _ in range(5):
        submit("a")
    submit("b")
    submit("c")
    assert order() == ["a1", "b1", "c1", "a2", "a3", "a4", "a5"]
    submit("b")  # b's second job: one round after its first, after a's job of that round
    assert order() == ["a1", "b1", "c1", "a2", "b2", "a3", "a4", "a5"]

    for _ in range(3):  # workers take the head: a1, b1, c1
        redis_client.lpop(queue.key)
    submit("d")  # a key arriving now gets the head's round: no credit for having been idle
    submit("c")
    assert order() == ["a2", "b2", "d1", "c2", "a3", "a4", "a5"]

    # A job RQ pushes itself (a retry after a lost worker) has no round: it does not
    # derail the order of the others.
    redis_client.rpush(queue.key, "retried-job")
    submit("e")
    assert order() == ["a2", "b2", "d1", "c2", "e1", "a3", "a4", "a5", "retry"]

    # Rounds of jobs that left the queue are dropped as the head moves on.
    rounds = redis_client.zrange(fair_rounds_key(queue.name), 0, -1, withscores=True)
    head_round = redis_client.zscore(fair_rounds_key(queue.name), ids(queue)[0])
    assert min(score for _, score in rounds) == head_round


def test_an_emptied_queue_starts_every_key_level(redis_client, queue, settings):
    for _ in range(3):
        jobs.enqueue(redis_client, queue, settings, PARAMS, RGB, "a")
    redis_client.delete(queue.key)  # all taken by workers
    b = jobs.enqueue(redis_client, queue, settings, PARAMS, RGB, "b").id
    a = jobs.enqueue(redis_client, queue, settings, PARAMS, RGB, "a").id
    b2 = jobs.enqueue(redis_client, queue, settings, PARAMS, RGB, "b").id
    # b starts at the highest round given (a's last), so a's next job is not put behind
    # all of b's: they alternate.
    assert ids(queue) == [b, a, b2]


# -- admission --------------------------------------------------------------------------------


def test_an_admission_counts_at_once_and_lapses_if_never_enqueued(redis_client, queue, settings):
    tight = settings.model_copy(update={"max_queued_per_key": 1, "max_queue_depth": 2})
    assert limits.admit(redis_client, tight, queue, "a", "job-1", SIZE, now=1000.0)
    # Counted against the key and in the queue depth before its enqueue: a concurrent
    # submission cannot take the same place.
    with pytest.raises(ProblemError) as caught:
        limits.admit(redis_client, tight, queue, "a", "job-2", SIZE, now=1001.0)
    assert caught.value.code.value == "rate_limited"
    assert limits.admit(redis_client, tight, queue, "b", "job-3", SIZE, now=1001.0)
    with pytest.raises(ProblemError) as caught:
        limits.admit(redis_client, tight, queue, "c", "job-4", SIZE, now=1001.0)
    assert caught.value.code.value == "queue_full"
    # The same job again (a retry of its Idempotency-Key) is not counted twice.
    assert limits.admit(redis_client, tight, queue, "a", "job-1", SIZE, now=1002.0) is False
    later = 1002.0 + limits.ADMISSION_GRACE_S + 1
    assert limits.admit(redis_client, tight, queue, "a", "job-5", SIZE, now=later)
    assert redis_client.hkeys(owner_jobs_key("a")) == [b"job-5"]
    assert int(redis_client.get(owner_held_total_key("a"))) == SIZE.bytes


def test_held_bytes_lapse_at_their_deadline(redis_client, queue, settings):
    budget = settings.model_copy(
        update={"max_held_bytes_per_key": 2500, "max_job_bytes": 2500, "max_queued_per_key": 9}
    )
    now = 5000.0
    for n in range(2):
        assert limits.admit(redis_client, budget, queue, "a", f"job-{n}", SIZE, now=now)
        with redis_client.pipeline() as pipe:  # what the enqueue transaction confirms
            limits.confirm(pipe, budget, "a", f"job-{n}", now)
            pipe.execute()
    with pytest.raises(ProblemError) as caught:
        limits.admit(redis_client, budget, queue, "a", "job-2", SIZE, now=now + 1)
    assert caught.value.code.value == "quota_exceeded"
    # The inputs are kept for input_ttl_s: then their bytes are surely gone.
    after = now + budget.input_ttl_s + 1
    assert limits.admit(redis_client, budget, queue, "a", "job-2", SIZE, now=after)
    assert int(redis_client.get(owner_held_total_key("a"))) == SIZE.bytes


def test_settling_a_result_holds_its_bytes_and_a_release_frees_them(redis_client, queue, settings):
    assert limits.admit(redis_client, settings, queue, "a", "job-1", SIZE)
    settle_held_bytes(redis_client, "a", "job-1", 300, keep_s=100)
    assert int(redis_client.get(owner_held_total_key("a"))) == 300
    assert redis_client.zscore(owner_held_key("a"), "job-1") > 90
    redis_client.set(input_key("job-1"), b"x")
    settle_held_bytes(redis_client, "a", "job-1")
    assert int(redis_client.get(owner_held_total_key("a"))) == 0
    assert redis_client.exists(input_key("job-1")) == 0
    settle_held_bytes(redis_client, "a", "job-1")  # twice is harmless
    assert int(redis_client.get(owner_held_total_key("a"))) == 0


# -- a lost reply -----------------------------------------------------------------------------


class LosesEnqueueReplies(redis_lib.Redis):
    """A real client whose next `lose` enqueue transactions run in Redis, after which the
    connection drops before the reply is read: only the network fails."""

    lose = 0

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        run = pipe.execute

        def execute(raise_on_error: bool = True) -> Any:
            enqueue = any(args[0] == "RPUSH" for args, _ in pipe.command_stack)
            replies = run(raise_on_error)
            if enqueue and self.lose:
                self.lose -= 1
                raise redis_lib.ConnectionError("connection lost while reading the reply")
            return replies

        pipe.execute = execute  # type: ignore[method-assign]
        return pipe


def test_a_retry_after_a_lost_enqueue_reply_answers_the_one_job(redis_url, small_png):
    key = "key-of-alice"
    owner = hashlib.sha256(key.encode()).hexdigest()
    client = LosesEnqueueReplies.from_url(redis_url)
    settings = GatewaySettings(redis_url=redis_url, api_key_hashes=(owner,), default_model="tiny")
    with TestClient(create_app(settings, redis=client)) as http:

        def submit() -> Any:
            return http.post(
                "/v1/inversions",
                data={"prompt": "a cat", "resolution": "64"},
                files={"image": ("i.png", small_png)},
                headers={"Idempotency-Key": "once", "X-API-Key": key},
            )

        client.lose = 1
        lost = submit()
        assert lost.status_code == 503 and lost.json()["code"] == "service_unavailable"
        retry = submit()
        assert retry.status_code == 202, retry.text
        assert retry.headers["idempotent-replayed"] == "true"
        queue = Queue(queue_name_for("tiny"), connection=client, serializer=JSONSerializer)
        assert queue.job_ids == [retry.json()["id"]]
        assert len(client.keys("rq:job:*")) == 1
        # Counted once against the key.
        assert client.hkeys(owner_jobs_key(owner)) == [retry.json()["id"].encode()]
    client.close()
