"""What one job cannot do to the others, end to end: real redis-server (taking at most 1 MB
in one value), two real worker processes and real gateways.

- A result Redis will not take fails its job once (`result_too_large`); both workers stay
  alive, heartbeating, and run the next job.
- A job canceled during verify ends `canceled` with no result stored.
- A job written straight into Redis that is not the service's own fails `invalid_input`
  without anything it names being imported, called or reached.
- Every ended job, and everything of its, is gone from Redis after its TTL.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from rq import Callback, Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.webhook import Webhook

from ddim_inversion import imaging
from ddim_inversion.contract import JOB_FUNCTION, JobPayload, WorkerRecord
from ddim_inversion.keys import WORKERS_KEY, input_key, reconstruction_key, result_key
from ddim_inversion.params import InversionParams
from tests.conftest import EVENT_GUARD_S, SAMPLES, Processes, RedisServer, wait_for
from tests.jobs_helper import TINY_QUEUE

pytestmark = pytest.mark.e2e

SHORT_TTL_S = 3
"""Result and failure TTL of the `short` gateway's jobs."""

WORKER_ENV = {
    "INVERSION_LOST_AFTER_S": "3",
    "INVERSION_HEARTBEAT_S": "0.5",
    "INVERSION_CANCEL_CHECK_INTERVAL_S": "0.2",
}
"""Lost jobs noticed (and registries cleaned) within seconds."""

TRACE_MODULE = """
import os
from pathlib import Path

Path(os.environ["TRACE_DIR"], "imported").write_text("imported")


def mark(*args, **kwargs):
    Path(os.environ["TRACE_DIR"], "called").write_text("called")
"""
"""A module the workers could import: it leaves a file when imported and when called."""

TOO_LARGE = {"resolution": 256, "num_inference_steps": 70, "return_trajectory": "true"}
"""A trajectory of 71 x 4 x 32 x 32 float32: 1.16 MB, over the 1 MB Redis takes."""


@dataclass
class Stack:
    base: str
    short: str
    redis_url: str
    workers: list
    processes: Processes
    trace_dir: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_cache_dir) -> Iterator[Stack]:
    from tests.conftest import subprocess_env

    server = RedisServer(tmp_path_factory.mktemp("redis-1mb"), ["--proto-max-bulk-len", "1mb"])
    server.start()
    trace_dir = tmp_path_factory.mktemp("trace")
    (trace_dir / "i11_trace.py").write_text(TRACE_MODULE)
    env = subprocess_env(server.url, model_cache_dir)
    procs = Processes(env, tmp_path_factory.mktemp("isolation-logs"))
    try:
        workers = procs.workers(
            2, wait=False, PYTHONPATH=str(trace_dir), TRACE_DIR=str(trace_dir), **WORKER_ENV
        )
        # 256 px is 4x the tiny model's native size: over the gateway's default bound of 2x.
        base = procs.gateway(INVERSION_MAX_RESOLUTION_SCALE="4")
        short = procs.gateway(
            INVERSION_RESULT_TTL_S=str(SHORT_TTL_S), INVERSION_FAILURE_TTL_S=str(SHORT_TTL_S)
        )
        client = redis.Redis.from_url(server.url)
        wait_for(lambda: client.hlen(WORKERS_KEY) == 2, EVENT_GUARD_S, "both workers")
        client.close()
        yield Stack(base, short, server.url, workers, procs, trace_dir)
    finally:
        procs.stop_all()
        server.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(stack.redis_url)
    yield connection
    connection.close()


def submit(base: str, headers: dict[str, str] | None = None, **fields: object) -> str:
    data = {"prompt": "a photo of a cat", "num_inference_steps": "3"}
    data |= {k: str(v) for k, v in fields.items()}
    with (SAMPLES / "chelsea.png").open("rb") as handle:
        answer = httpx.post(
            base + "/v1/inversions",
            data=data,
            files={"image": ("chelsea.png", handle, "image/png")},
            headers=headers or {},
            timeout=EVENT_GUARD_S,
        )
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def status(base: str, job_id: str) -> dict:
    answer = httpx.get(f"{base}/v1/inversions/{job_id}", timeout=EVENT_GUARD_S)
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_ended(base: str, job_id: str, timeout: float = EVENT_GUARD_S) -> dict:
    return wait_for(  # type: ignore[return-value]
        lambda: (s := status(base, job_id))["status"] in {"succeeded", "failed", "canceled"} and s,
        timeout,
        f"job {job_id} to end",
    )


def wait_step(base: str, job_id: str, above: int) -> dict:
    return wait_for(  # type: ignore[return-value]
        lambda: (
            (s := status(base, job_id))["status"] == "running"
            and (s.get("progress") or {}).get("step", 0) > above
            and s
        ),
        EVENT_GUARD_S,
        f"job {job_id} past step {above}",
    )


def alive(stack: Stack) -> None:
    for worker in stack.workers:
        assert worker.poll() is None, stack.processes.log_text()


def heartbeats_after(client: redis.Redis, moment: float) -> bool:
    records = [WorkerRecord.model_validate_json(raw) for raw in client.hvals(WORKERS_KEY)]
    return len(records) == 2 and all(r.heartbeat_at > moment for r in records)


def test_result_redis_will_not_take_fails_once_and_jams_no_worker(stack, client):
    job_id = submit(stack.base, **TOO_LARGE)
    final = wait_ended(stack.base, job_id)
    assert final["status"] == "failed", final
    assert final["error"]["code"] == "result_too_large", final
    assert "proto-max-bulk-len" in final["error"]["message"]
    job = Job.fetch(job_id, connection=client, serializer=JSONSerializer)
    assert job.retries_left == 0, "a final failure is never run again"
    assert client.get(result_key(job_id)) is None

    # Both workers live on, heartbeating, and the job stays failed (not reaped and retried).
    ended = time.time()
    wait_for(lambda: heartbeats_after(client, ended), EVENT_GUARD_S, "both workers to heartbeat")
    alive(stack)
    normal = submit(stack.base)
    assert wait_ended(stack.base, normal)["status"] == "succeeded"
    assert status(stack.base, job_id)["status"] == "failed"
    assert client.llen(f"rq:queue:{TINY_QUEUE}") == 0
    # No flood: the refusal was recognised, never waited on as an outage.
    assert stack.processes.log_text().count("Redis unavailable") == 0


def test_cancel_during_verify_stores_nothing(stack, client):
    steps = 100
    job_id = submit(stack.base, num_inference_steps=steps, verify="true")
    running = wait_step(stack.base, job_id, above=steps)  # sampling back: verify
    assert running["progress"]["total"] == 2 * steps
    assert (
        httpx.delete(f"{stack.base}/v1/inversions/{job_id}", timeout=EVENT_GUARD_S).status_code
        == 202
    )
    final = wait_ended(stack.base, job_id)
    assert final["status"] == "canceled", final
    assert final["error"]["code"] == "canceled"
    assert client.get(result_key(job_id)) is None
    assert client.get(reconstruction_key(job_id)) is None


def test_foreign_jobs_fail_without_running_what_they_name(stack, client):
    queue = Queue(TINY_QUEUE, connection=client, serializer=JSONSerializer)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    hook = f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    finished = submit(stack.base)
    assert wait_ended(stack.base, finished)["status"] == "succeeded"

    # A job as a gateway makes it, and one compatible with it that names callbacks, queued
    # in one transaction: the second is in the queue when the first gathers its batch.
    params = InversionParams(prompt="genuine", num_inference_steps=3)
    payload = JobPayload(params=params, image_width=64, image_height=64).model_dump(mode="json")
    pixels = imaging.normalize((SAMPLES / "chelsea.png").read_bytes(), (64, 64)).tobytes()
    callbacks = {
        "on_success": Callback("i11_trace.mark"),
        "on_failure": Callback("i11_trace.mark"),
        "on_stopped": Callback("i11_trace.mark"),
    }
    cases = {
        "genuine": {},
        "callbacks": callbacks,
        "bad_payload": {"kwargs": {"payload": {"bogus": 1}}, "on_failure": callbacks["on_failure"]},
        "function": {"func": "i11_trace.mark"},
        "webhook": {"webhooks": [Webhook(hook, "failed")]},
        "positional": {"args": (1,)},
    }
    ids = {name: str(uuid.uuid4()) for name in cases}
    with client.pipeline() as pipe:
        pipe.multi()
        for name, case in cases.items():
            pipe.set(input_key(ids[name]), pixels)
            queue.enqueue_call(
                case.pop("func", JOB_FUNCTION),
                **({"kwargs": {"payload": payload}} | case),
                job_id=ids[name],
                timeout=EVENT_GUARD_S,
                pipeline=pipe,
            )
        pipe.execute()
    # RQ watches a dependency while enqueueing: not in a transaction of others.
    ids["dependency"] = str(uuid.uuid4())
    client.set(input_key(ids["dependency"]), pixels)
    queue.enqueue_call(
        JOB_FUNCTION, kwargs={"payload": payload}, job_id=ids["dependency"], depends_on=finished
    )

    genuine = ids.pop("genuine")
    for name, job_id in ids.items():
        final = wait_ended(stack.base, job_id)
        assert final["status"] == "failed", (name, final)
        assert final["error"]["code"] == "invalid_input", (name, final)
    assert wait_ended(stack.base, genuine)["status"] == "succeeded"
    assert client.get(result_key(genuine)) is not None
    assert sorted(p.name for p in stack.trace_dir.iterdir()) == ["i11_trace.py"], (
        "a worker imported or called what a foreign job names"
    )
    with pytest.raises(BlockingIOError):
        listener.accept()  # no worker reached the foreign job's webhook
    listener.close()
    alive(stack)
    assert wait_ended(stack.base, submit(stack.base))["status"] == "succeeded"


def test_ended_jobs_leave_nothing_after_their_ttl(stack, client):
    short = stack.short
    # Two long incompatible jobs occupy both workers; two more wait in the queue: one to be
    # canceled there, one to fail (its input deleted) once a worker is free.
    first = submit(short, num_inference_steps=900)
    second = submit(short, num_inference_steps=800)
    wait_step(short, first, above=0)
    wait_step(short, second, above=0)
    queued = submit(short)
    failed = submit(short)
    client.delete(input_key(failed))
    assert status(short, queued)["status"] == "queued"
    for job_id in (queued, first, second):
        assert (
            httpx.delete(f"{short}/v1/inversions/{job_id}", timeout=EVENT_GUARD_S).status_code
            == 202
        )
    ends = {job_id: wait_ended(short, job_id)["status"] for job_id in (queued, first, second)}
    assert set(ends.values()) == {"canceled"}, ends
    assert wait_ended(short, failed)["error"]["code"] == "invalid_input"
    succeeded = submit(short, headers={"Idempotency-Key": f"ttl-{uuid.uuid4()}"})
    assert wait_ended(short, succeeded)["status"] == "succeeded"

    ended = [queued, first, second, succeeded, failed]
    registries = [f"rq:{name}:{TINY_QUEUE}" for name in ("canceled", "finished", "failed")]

    def leftovers() -> list[str]:
        keys = [k.decode() for k in client.scan_iter(count=1000)]
        named = [k for k in keys if any(job_id in k for job_id in ended) or ":idem:" in k]
        listed = [
            f"{registry} holds {job_id}"
            for registry in registries
            for job_id in ended
            if client.zscore(registry, job_id) is not None
        ]
        return named + listed

    assert leftovers(), "the jobs' keys exist before their TTL"
    try:
        wait_for(lambda: not leftovers(), EVENT_GUARD_S, "every key of the ended jobs to expire")
    except TimeoutError:
        pytest.fail(f"left after the TTL: {leftovers()}")
