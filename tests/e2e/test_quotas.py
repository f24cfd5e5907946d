"""One key cannot hurt another, end to end: fair order between keys, an atomic per-key
limit under concurrent submissions, and a Redis out of memory (503, and DELETE frees it).

One private redis-server with a small `maxmemory` and `noeviction` (as production runs it),
real gateway processes with API keys and one real worker of batch size 2, shared by the
tests of this module (a worker takes seconds to start).
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from ddim_inversion.keys import (
    ADMITTING_KEY,
    WORKERS_KEY,
    owner_held_bytes_key,
    owner_held_total_key,
    queue_name_for,
    result_key,
)
from tests.conftest import (
    EVENT_GUARD_S,
    SAMPLES,
    Processes,
    RedisServer,
    subprocess_env,
    wait_for,
)

pytestmark = pytest.mark.e2e

KEYS = {name: f"key-of-{name}" for name in ("alice", "bob", "carol")}
HASHES = {name: hashlib.sha256(key.encode()).hexdigest() for name, key in KEYS.items()}
BATCH = 2
"""The worker's INVERSION_MAX_BATCH_SIZE."""
TIGHT_LIMIT = 3
"""INVERSION_MAX_QUEUED_PER_KEY of the `tight` gateway."""
TERMINAL = {"succeeded", "failed", "canceled"}
MAXMEMORY = "24mb"
ROOM_BYTES = 100_000
"""How far over its maxmemory the full Redis is: less than one result of the test."""


@dataclass
class Stack:
    redis: redis.Redis
    processes: Processes
    main: str
    """Keys alice, bob and carol; fed to the worker."""
    tight: str
    """The same keys, TIGHT_LIMIT jobs per key, on a queue no worker drains."""
    anonymous: str
    """Auth disabled: no per-key limits, the global ones only."""
    worker: subprocess.Popen[bytes] | None = None

    def ensure_worker(self) -> None:
        if self.worker is None or self.worker.poll() is not None:
            self.worker = self.processes.worker(INVERSION_MAX_BATCH_SIZE=str(BATCH))

    def stop_worker(self) -> None:
        if self.worker is not None:
            assert self.processes.stop(self.worker) == 0
            self.worker = None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> Iterator[Stack]:
    server = RedisServer(
        tmp_path_factory.mktemp("quota-redis"),
        extra=["--maxmemory", MAXMEMORY, "--maxmemory-policy", "noeviction"],
    )
    server.start()
    env = subprocess_env(server.url, model_cache_dir)
    procs = Processes(env, tmp_path_factory.mktemp("quota-logs"))
    keyed = {
        "INVERSION_AUTH_DISABLED": "false",
        "INVERSION_API_KEY_HASHES": ",".join(HASHES.values()),
    }
    try:
        # Its model loads while the gateways start.
        worker = procs.worker(wait=False, INVERSION_MAX_BATCH_SIZE=str(BATCH))
        stack = Stack(
            redis=redis.Redis.from_url(server.url),
            processes=procs,
            main=procs.gateway(**keyed, INVERSION_MAX_QUEUED_PER_KEY="40"),
            tight=procs.gateway(
                **keyed,
                INVERSION_MAX_QUEUED_PER_KEY=str(TIGHT_LIMIT),
                INVERSION_QUEUE_NAME="undrained",
                # 30 concurrent decodes of one key wait for a decoder, none is refused:
                # what is under test is the admission after them.
                INVERSION_MAX_DECODES_PER_KEY="30",
            ),
            anonymous=procs.gateway(),
            worker=worker,
        )
        wait_for(
            lambda: stack.redis.hlen(WORKERS_KEY) or worker.poll() is not None,
            EVENT_GUARD_S,
            "the worker to register",
        )
        assert worker.poll() is None, procs.log_text()
        yield stack
        stack.redis.close()
    finally:
        procs.stop_all()
        server.stop()


def submit(base: str, key: str | None, **fields: object) -> httpx.Response:
    data = {"prompt": "a photo of a cat", "resolution": "64"} | {
        k: str(v) for k, v in fields.items()
    }
    headers = {"X-API-Key": key} if key else {}
    with (SAMPLES / "chelsea.png").open("rb") as handle:
        return httpx.post(
            base + "/v1/inversions",
            data=data,
            files={"image": ("chelsea.png", handle, "image/png")},
            headers=headers,
            timeout=EVENT_GUARD_S,
        )


def accepted(base: str, key: str | None, **fields: object) -> str:
    answer = submit(base, key, **fields)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def status(base: str, key: str, job_id: str) -> dict:
    answer = httpx.get(
        f"{base}/v1/inversions/{job_id}", headers={"X-API-Key": key}, timeout=EVENT_GUARD_S
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_ended(base: str, key: str, job_ids: list[str], timeout: float = EVENT_GUARD_S) -> None:
    wait_for(
        lambda: all(status(base, key, i)["status"] in TERMINAL for i in job_ids),
        timeout,
        f"{len(job_ids)} jobs to end",
    )


def test_a_second_key_starts_within_two_batches_not_after_the_backlog(stack):
    alice, bob = KEYS["alice"], KEYS["bob"]
    # The queue fills while no worker serves it (a job kept running instead would have to
    # outlast the submissions: a race with the machine's speed), then one starts.
    stack.stop_worker()
    backlog = [accepted(stack.main, alice, num_inference_steps=2) for _ in range(20)]
    late = accepted(stack.main, bob, num_inference_steps=2)
    stack.ensure_worker()
    wait_ended(stack.main, alice, backlog)
    wait_ended(stack.main, bob, [late])

    def started(job_id: str):
        return Job.fetch(job_id, connection=stack.redis, serializer=JSONSerializer).started_at

    before = [job_id for job_id in backlog if started(job_id) < started(late)]
    assert len(before) <= 2 * BATCH, f"{len(before)} of alice's jobs started before bob's"


def test_concurrent_submissions_cannot_pass_the_per_key_limit(stack):
    carol = KEYS["carol"]
    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda _: submit(stack.tight, carol), range(30)))
    codes = [a.status_code for a in answers]
    assert codes.count(202) == TIGHT_LIMIT and codes.count(429) == 30 - TIGHT_LIMIT, codes
    assert {a.json()["code"] for a in answers if a.status_code == 429} == {"rate_limited"}
    assert stack.redis.llen("rq:queue:" + queue_name_for("tiny", "undrained")) == TIGHT_LIMIT


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def test_a_full_redis_answers_503_and_deleting_a_result_frees_it(stack):
    alice = KEYS["alice"]
    stack.ensure_worker()
    # Two results of 400 KB each (128x128, the tiny model's largest, 100-step trajectories).
    done = [
        accepted(stack.main, alice, resolution=128, num_inference_steps=100, return_trajectory=1)
        for _ in range(2)
    ]
    wait_ended(stack.main, alice, done)
    assert [status(stack.main, alice, i)["status"] for i in done] == ["succeeded"] * 2
    sizes = [stack.redis.strlen(result_key(i)) for i in done]
    assert min(sizes) > 101 * 4 * 16 * 16 * 4 > ROOM_BYTES
    # What alice's jobs hold against her budget is what the worker stored for them.
    held = stack.redis.hmget(owner_held_bytes_key(HASHES["alice"]), done)
    assert [int(h) for h in held] == sizes
    stack.stop_worker()  # a worker on a full Redis is another matter than this test's

    # Full: Redis holds more than its maxmemory (by less than one result, so that deleting
    # one makes room), and refuses every command that may need memory.
    stack.redis.config_set("maxmemory", used_memory(stack.redis) - ROOM_BYTES)
    jobs_before = len(stack.redis.keys("rq:job:*"))
    try:
        for base, key in ((stack.main, alice), (stack.anonymous, None)):
            refused = submit(base, key)
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "service_unavailable"
            assert int(refused.headers["retry-after"]) > 0
        # The anonymous submission was admitted before its enqueue was refused: it gave its
        # admission back, and left no job behind.
        assert stack.redis.zcard(ADMITTING_KEY) == 0
        assert len(stack.redis.keys("rq:job:*")) == jobs_before
        assert status(stack.main, alice, done[0])["status"] == "succeeded"

        before = used_memory(stack.redis)
        held_before = int(stack.redis.get(owner_held_total_key(HASHES["alice"])))
        deleted = httpx.delete(
            f"{stack.main}/v1/inversions/{done[0]}", headers={"X-API-Key": alice}
        )
        assert deleted.status_code == 204, deleted.text
        assert before - used_memory(stack.redis) >= sizes[0]
        assert stack.redis.exists(result_key(done[0]), Job.key_for(done[0])) == 0
        held_now = int(stack.redis.get(owner_held_total_key(HASHES["alice"])))
        assert held_now == held_before - sizes[0]
        # The memory freed is usable at once.
        assert submit(stack.anonymous, None).status_code == 202
    finally:
        stack.redis.config_set("maxmemory", MAXMEMORY)
