"""The service end to end: real redis-server, real `ddim-invert gateway` and `worker` processes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from safetensors.torch import load

from tests.conftest import (
    BIN,
    EVENT_GUARD_S,
    SAMPLES,
    STOP_GUARD_S,
    Processes,
    RedisServer,
    subprocess_env,
    wait_for,
)
from tests.e2e.service_calls import status, submit, wait_status
from tests.rounding import drift, size

pytestmark = pytest.mark.e2e


@dataclass
class OwnService:
    """This module's gateway on its own Redis, emptied for each test, with workers of the
    test's own (`processes`, stopped after it)."""

    base: str
    redis: redis.Redis
    processes: Processes


@pytest.fixture(scope="module")
def module_gateway(
    tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path
) -> Iterator[tuple[str, RedisServer, dict[str, str]]]:
    """One gateway with default settings for the tests here that need an empty Redis: it
    keeps nothing of a job in memory (its state is Redis's), so a flush starts it afresh."""
    server = RedisServer(tmp_path_factory.mktemp("service-redis"))
    server.start()
    procs = Processes(
        subprocess_env(server.url, model_cache_dir), tmp_path_factory.mktemp("service-logs")
    )
    try:
        yield procs.gateway(), server, procs.env
    finally:
        procs.stop_all()
        server.stop()


@pytest.fixture
def own(
    module_gateway: tuple[str, RedisServer, dict[str, str]], tmp_path: Path
) -> Iterator[OwnService]:
    base, server, env = module_gateway
    client = redis.Redis.from_url(server.url)
    client.flushall()
    procs = Processes(env, tmp_path)
    yield OwnService(base, client, procs)
    procs.stop_all()
    client.close()


def test_submit_poll_download_equals_local_cli(shared_service, tmp_path: Path):
    base = shared_service.url
    params = {"num_inference_steps": 12, "guidance_scale": 2.5, "negative_prompt": "blurry"}
    job = submit(base, "coffee.png", prompt="a cup of coffee", **params)
    assert job["status"] in ("queued", "running")
    done = wait_status(base, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    assert done["result"]["latents_shape"] == [1, 4, 8, 8]
    assert done["result"]["prompt"] == "a cup of coffee"
    assert done["params"]["num_inference_steps"] == 12

    answer = httpx.get(f"{base}/v1/inversions/{job['id']}/latents")
    assert answer.status_code == 200
    served = load(answer.content)

    out = tmp_path / "local.safetensors"
    cli = subprocess.run(
        [
            str(BIN / "ddim-invert"),
            "local",
            str(SAMPLES / "coffee.png"),
            "--prompt",
            "a cup of coffee",
            "--steps",
            "12",
            "--guidance-scale",
            "2.5",
            "--negative-prompt",
            "blurry",
            "--out",
            str(out),
        ],
        env=shared_service.env,  # the worker's INVERSION_THREADS too: exact equality
        capture_output=True,
        text=True,
        timeout=EVENT_GUARD_S,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout.splitlines()[0])["shape"] == [1, 4, 8, 8]
    local = load(out.read_bytes())
    # Equal thread counts make them equal; a batch-mate in the shared worker would leave
    # float32 rounding: tests/rounding.py's drift, 12 steps at guidance 2.5 (2.9e-4 at |z| 1).
    tolerance = drift(12, 2.5, size(local["latents"]))
    assert (served["latents"] - local["latents"]).abs().max() <= tolerance
    assert served["timesteps"].tolist() == local["timesteps"].tolist()

    npy = httpx.get(f"{base}/v1/inversions/{job['id']}/latents", params={"format": "npy"})
    assert npy.status_code == 200
    import io

    import numpy as np

    array = np.load(io.BytesIO(npy.content))
    assert np.abs(array - local["latents"].numpy()).max() <= tolerance


def test_trajectory_job(shared_service):
    base = shared_service.url
    job = submit(base, num_inference_steps=5, return_trajectory="true")
    done = wait_status(base, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    tensors = load(httpx.get(f"{base}/v1/inversions/{job['id']}/latents").content)
    assert tensors["trajectory"].shape == (6, 1, 4, 8, 8)
    assert (tensors["trajectory"][-1] - tensors["latents"]).abs().max() == 0


def test_unknown_id_is_404_and_latents_409_while_queued(own):
    base = own.base
    answer = httpx.get(f"{base}/v1/inversions/6f1c2a53-3f7e-4f4e-9d7c-6b0c1f2b9a11")
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["code"] == "not_found"
    job = submit(base)  # no worker yet: it stays queued
    queued = status(base, job["id"])
    assert queued["status"] == "queued"
    assert queued["queue_position"] == 0
    early = httpx.get(f"{base}/v1/inversions/{job['id']}/latents")
    assert early.status_code == 409
    assert early.json()["code"] == "not_finished"


def test_cancel_queued_job_never_runs(own):
    base = own.base
    doomed = submit(base, prompt="never")
    kept = submit(base, prompt="kept", num_inference_steps=3)
    answer = httpx.delete(f"{base}/v1/inversions/{doomed['id']}")
    assert answer.status_code == 202
    assert status(base, doomed["id"])["status"] == "canceled"
    own.processes.worker()
    assert wait_status(base, kept["id"], {"succeeded"})["status"] == "succeeded"
    final = status(base, doomed["id"])
    assert final["status"] == "canceled"
    assert final["error"]["code"] == "canceled"
    # It never ran: no start, no run time (absent fields are left out of the body).
    assert final["timings"]["queued_at"]
    assert "started_at" not in final["timings"] and "run_s" not in final["timings"]


def test_cancel_running_job_and_progress_seen(shared_service):
    base = shared_service.url
    job = submit(base, num_inference_steps=900)
    running = wait_for(
        lambda: (
            (s := status(base, job["id"]))["status"] == "running"
            and (s.get("progress") or {}).get("step", 0) > 0
            and s
        ),
        EVENT_GUARD_S,
        "progress",
    )
    assert 0 < running["progress"]["step"] < running["progress"]["total"] == 900
    assert httpx.delete(f"{base}/v1/inversions/{job['id']}").status_code == 202
    final = wait_status(base, job["id"], {"canceled", "succeeded", "failed"})
    assert final["status"] == "canceled"
    assert final["error"]["code"] == "canceled"
    assert httpx.get(f"{base}/v1/inversions/{job['id']}/latents").status_code in (404, 409, 410)
    # A finished (here canceled) job is deleted with DELETE.
    assert httpx.delete(f"{base}/v1/inversions/{job['id']}").status_code == 204
    assert httpx.get(f"{base}/v1/inversions/{job['id']}").status_code == 404


def test_two_workers_drain_one_queue(own):
    from rq.job import Job
    from rq.serializers import JSONSerializer

    base = own.base
    own.processes.workers(2, INVERSION_MAX_BATCH_SIZE="1")
    ids = [submit(base, prompt=f"job {i}", num_inference_steps=150)["id"] for i in range(6)]
    for job_id in ids:
        assert wait_status(base, job_id, {"succeeded", "failed"})["status"] == "succeeded"
    names = {Job.fetch(i, connection=own.redis, serializer=JSONSerializer).worker_name for i in ids}
    assert len(names) == 2


def capacity(base: str) -> dict:
    answer = httpx.get(base + "/v1/capacity")
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_readiness_needs_no_worker_and_capacity_follows_the_workers(own):
    base = own.base
    assert httpx.get(base + "/healthz").status_code == 200
    ready = httpx.get(base + "/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    assert capacity(base)["workers"] == []
    # A ready gateway without workers takes jobs: they wait for one.
    job = submit(base, num_inference_steps=3)
    assert status(base, job["id"])["status"] == "queued"
    assert capacity(base)["queued"] == 1

    worker = own.processes.worker()
    now = capacity(base)
    (live,) = now["workers"]
    assert now["models"] == [live["model"]]
    assert wait_status(base, job["id"], {"succeeded", "failed"})["status"] == "succeeded"

    assert own.processes.stop(worker) == 0  # idle: it exits within its shutdown bound
    ready = httpx.get(base + "/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    assert capacity(base)["workers"] == []


def test_sigterm_finishes_the_running_job_then_exits(own):
    base = own.base
    worker = own.processes.worker()
    job = submit(base, num_inference_steps=300)
    wait_for(
        lambda: (
            (s := status(base, job["id"]))["status"] == "running"
            and (s.get("progress") or {}).get("step", 0) > 0
        ),
        EVENT_GUARD_S,
        "the job to run",
    )
    worker.terminate()  # SIGTERM: a warm shutdown
    # The batch ends first (its job succeeds), then the worker exits within its bound.
    done = wait_status(base, job["id"], {"succeeded", "failed", "canceled"}, EVENT_GUARD_S)
    assert done["status"] == "succeeded", done
    assert worker.wait(STOP_GUARD_S) == 0


def test_prompt_over_the_token_limit_refused_or_truncated_as_configured(
    shared_service, shared_processes
):
    long_prompt = "a photo of a cat sitting on a red sofa next to a window " * 3  # > 77 tokens
    # Gateways count tokens with the tokenizer the workers registered: same Redis.
    strict = shared_processes.gateway(INVERSION_PROMPT_OVERFLOW="reject")
    lenient = shared_service.url
    with (SAMPLES / "chelsea.png").open("rb") as handle:
        refused = httpx.post(
            strict + "/v1/inversions",
            data={"prompt": long_prompt},
            files={"image": ("chelsea.png", handle, "image/png")},
        )
    assert refused.status_code == 422, shared_processes.log_text()
    assert refused.json()["field"] == "prompt"
    assert "77" in refused.json()["detail"]
    job = submit(lenient, prompt=long_prompt, num_inference_steps=3)
    done = wait_status(lenient, job["id"], {"succeeded", "failed"})
    assert done["result"]["truncated"] is True
    assert done["result"]["token_count"] == 77


def scrape(base: str) -> dict[str, float]:
    """The gateway's /metrics samples, by name and labels as written."""
    samples = {}
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_count_jobs_by_final_state_with_duration_histograms(shared_service):
    base = shared_service.url
    before = scrape(base)
    done = submit(base, num_inference_steps=3)
    canceled = submit(base, num_inference_steps=900)
    wait_status(base, done["id"], {"succeeded"})
    wait_for(lambda: status(base, canceled["id"])["status"] == "running", EVENT_GUARD_S, "running")
    httpx.delete(f"{base}/v1/inversions/{canceled['id']}")
    wait_status(base, canceled["id"], {"canceled"})
    after = scrape(base)
    counted = {  # the shared service has run other tests' jobs: count this test's
        name: after[name] - before.get(name, 0.0)
        for name in (
            'inversion_jobs_ended_total{status="succeeded"}',
            'inversion_jobs_ended_total{status="canceled"}',
            "inversion_job_run_seconds_count",
            'inversion_job_queue_wait_seconds_bucket{le="+Inf"}',
        )
    }
    assert list(counted.values()) == [1.0, 1.0, 2.0, 2.0], counted
    assert any(name.startswith("inversion_http_requests_total") for name in after)
    assert after["inversion_queue_depth"] == 0.0
