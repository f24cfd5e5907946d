"""Faults end to end: a worker killed mid-job, Redis down and back, Redis restarted with AOF.

Real redis-server, real `ddim-invert gateway` and `worker` processes. Tests that stop Redis
use a private RedisServer of their own, so the session's Redis is never touched.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from ddim_inversion.keys import input_key
from service.settings import GatewaySettings
from tests.conftest import (
    BIN,
    EVENT_GUARD_S,
    SAMPLES,
    STOP_GUARD_S,
    Processes,
    RedisServer,
    free_port,
    wait_for,
)

pytestmark = pytest.mark.e2e

FAST_WORKER = {"INVERSION_LOST_AFTER_S": "3", "INVERSION_HEARTBEAT_S": "0.5"}
"""Worker timings short enough that a lost job is noticed within a few seconds."""

TERMINAL = {"succeeded", "failed", "canceled"}

JOB_TIMEOUT_S = GatewaySettings.model_fields["job_timeout_s"].default
"""The gateway's default job timeout, which these tests leave as it is."""

NO_AUTH = {"INVERSION_AUTH_DISABLED": "true"}
"""These tests are about faults, not API keys (harmless before the gateway had auth)."""


def submit_answer(base: str, **fields: object) -> httpx.Response:
    data = {"prompt": "a photo of a cat"} | {k: str(v) for k, v in fields.items()}
    with (SAMPLES / "chelsea.png").open("rb") as handle:
        return httpx.post(
            base + "/v1/inversions",
            data=data,
            files={"image": ("chelsea.png", handle, "image/png")},
            timeout=EVENT_GUARD_S,
        )


def submit(base: str, **fields: object) -> str:
    answer = submit_answer(base, **fields)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def status(base: str, job_id: str) -> dict:
    answer = httpx.get(f"{base}/v1/inversions/{job_id}", timeout=EVENT_GUARD_S)
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_terminal(base: str, job_id: str, timeout: float = EVENT_GUARD_S) -> dict:
    return wait_for(  # type: ignore[return-value]
        lambda: (s := status(base, job_id))["status"] in TERMINAL and s,
        timeout,
        f"job {job_id} to end",
    )


def wait_running(base: str, job_id: str, timeout: float = EVENT_GUARD_S) -> dict:
    return wait_for(  # type: ignore[return-value]
        lambda: (
            (s := status(base, job_id))["status"] == "running"
            and (s.get("progress") or {}).get("step", 0) > 0
            and s
        ),
        timeout,
        "the job to run with progress",
    )


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """Private servers a test constructs and starts itself; all are stopped afterwards."""
    servers: list[RedisServer] = []
    yield servers
    for server in servers:
        server.stop()


def private(
    servers: list[RedisServer], tmp_path: Path, service_env: dict[str, str], extra: list[str]
) -> tuple[RedisServer, Processes]:
    directory = tmp_path / f"redis-{len(servers)}"
    directory.mkdir()
    server = RedisServer(directory, extra=extra)
    servers.append(server)
    server.start()
    logs = tmp_path / f"logs-{len(servers)}"
    logs.mkdir()
    return server, Processes(service_env | NO_AUTH | {"INVERSION_REDIS_URL": server.url}, logs)


@pytest.fixture
def stop_later() -> Iterator[list[Processes]]:
    started: list[Processes] = []
    yield started
    for procs in started:
        procs.stop_all()


# -- 1. a worker killed mid-job ---------------------------------------------------------------


def worker_of(job_id: str, redis_url: str) -> str:
    """The RQ name of the worker that runs (or last ran) the job."""
    with redis.Redis.from_url(redis_url) as client:
        return Job.fetch(job_id, connection=client, serializer=JSONSerializer).worker_name


def kill_the_worker_running(
    job_id: str, workers: list[subprocess.Popen[bytes]], redis_url: str
) -> str:
    """SIGKILL whichever of `workers` runs the job (the others go on); its RQ name."""
    name = worker_of(job_id, redis_url)
    with redis.Redis.from_url(redis_url) as client:
        pid = int(client.hget(f"rq:worker:{name}", "pid"))
    (running,) = [w for w in workers if w.pid == pid]
    running.kill()
    running.wait(STOP_GUARD_S)
    return name


def test_killed_worker_job_is_retried_on_another(processes):
    base = processes.gateway(INVERSION_MAX_RETRIES="2", **NO_AUTH)
    workers = processes.workers(2, **FAST_WORKER)  # one to kill, one to take the job over
    job_id = submit(base, num_inference_steps=300, resolution=64)
    wait_running(base, job_id)
    redis_url = processes.env["INVERSION_REDIS_URL"]
    killed = kill_the_worker_running(job_id, workers, redis_url)
    assert status(base, job_id)["status"] == "running"  # killed mid-job, not after it
    # Lost after LOST_AFTER_S (3 s), reaped every 1.5 s, then dequeued by the other worker.
    # Without the worker's own lost-job detection, RQ would wait for the job's timeout: a
    # take-over before half of it is the detection's.
    wait_for(
        lambda: worker_of(job_id, redis_url) not in (killed, None),
        JOB_TIMEOUT_S / 2,
        "the other worker to take the job over",
    )
    final = wait_terminal(base, job_id)
    assert final["status"] == "succeeded", (final, processes.log_text())
    latents = httpx.get(f"{base}/v1/inversions/{job_id}/latents", timeout=EVENT_GUARD_S)
    assert latents.status_code == 200
    assert worker_of(job_id, redis_url) != killed


def test_killed_worker_without_retries_fails_worker_lost(processes):
    base = processes.gateway(INVERSION_MAX_RETRIES="0", **NO_AUTH)
    workers = processes.workers(2, **FAST_WORKER)
    job_id = submit(base, num_inference_steps=300, resolution=64)
    wait_running(base, job_id)
    kill_the_worker_running(job_id, workers, processes.env["INVERSION_REDIS_URL"])
    assert status(base, job_id)["status"] == "running"  # killed mid-job, not after it
    final = wait_terminal(base, job_id)
    assert final["status"] == "failed", (final, processes.log_text())
    assert final["error"]["code"] == "worker_lost", final
    # RQ's cleanup failed it; the worker that ran the cleanup deletes its input too.
    with redis.Redis.from_url(processes.env["INVERSION_REDIS_URL"]) as client:
        wait_for(lambda: client.get(input_key(job_id)) is None, EVENT_GUARD_S, "input deleted")


# -- 2. Redis unavailable, then back ------------------------------------------------------------


def test_redis_outage_503_then_recovers(tmp_path, service_env, private_redis, stop_later):
    server, procs = private(private_redis, tmp_path, service_env, [])
    stop_later.append(procs)
    base = procs.gateway()
    procs.worker(**FAST_WORKER)
    wait_for(lambda: httpx.get(base + "/readyz").status_code == 200, EVENT_GUARD_S, "ready")

    server.stop()
    # Answers, not hangs: each Redis call gives up after INVERSION_REDIS_TIMEOUT_S (how soon
    # is the machine's business; the clients' timeouts are last guards).
    posted = submit_answer(base, num_inference_steps=3)
    got = httpx.get(f"{base}/v1/inversions/{uuid.uuid4()}", timeout=EVENT_GUARD_S)
    for answer in (posted, got):
        assert answer.status_code == 503, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert int(answer.headers["retry-after"]) > 0
    assert httpx.get(base + "/healthz", timeout=EVENT_GUARD_S).status_code == 200
    assert httpx.get(base + "/readyz", timeout=EVENT_GUARD_S).status_code == 503

    server.start()  # same port, empty (no persistence): the worker must re-publish itself
    wait_for(
        lambda: httpx.get(base + "/readyz", timeout=EVENT_GUARD_S).status_code == 200,
        EVENT_GUARD_S,
        "readiness after Redis came back",
    )
    job_id = submit(base, num_inference_steps=3)
    final = wait_terminal(base, job_id)
    assert final["status"] == "succeeded", (final, procs.log_text())
    assert all(p.poll() is None for p in procs.started), "no process may have exited"


# -- 3. Redis restarted with persistence --------------------------------------------------------

AOF = ["--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"]


def test_redis_restart_keeps_queued_jobs(tmp_path, service_env, private_redis, stop_later):
    server, procs = private(private_redis, tmp_path, service_env, AOF)
    stop_later.append(procs)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    client.close()
    base = procs.gateway()
    ids = [submit(base, prompt=f"job {i}", num_inference_steps=3) for i in range(3)]
    # No wait for `everysec`'s fsync: a graceful shutdown (SIGTERM, which RedisServer.stop
    # sends and waits out) writes and fsyncs the AOF; only a crash would lose the last second.
    server.stop()
    server.start()
    procs.worker(**FAST_WORKER)
    for job_id in ids:
        final = wait_terminal(base, job_id)
        assert final["status"] == "succeeded", (final, procs.log_text())


# -- 4. an evicting Redis -----------------------------------------------------------------------


def test_gateway_refuses_evicting_redis(tmp_path, service_env, private_redis, stop_later):
    evicting = ["--maxmemory-policy", "allkeys-lru"]
    _server, procs = private(private_redis, tmp_path, service_env, evicting)
    stop_later.append(procs)
    port = free_port()
    gateway = procs.spawn("gateway", [str(BIN / "ddim-invert"), "gateway", "--port", str(port)])
    # It must exit at start-up, not serve: a gateway that hangs fails here.
    try:
        code = gateway.wait(EVENT_GUARD_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the gateway did not exit against an evicting Redis: {procs.log_text()}")
    assert code != 0, procs.log_text()
    assert "maxmemory-policy is 'allkeys-lru'" in procs.log_text()
