"""A pool of two models on one Redis: a real gateway and two real workers serving the tiny
weights under two names. Each model's jobs run on its own worker only."""

from __future__ import annotations

import httpx
import redis

from ddim_inversion.contract import WorkerRecord
from ddim_inversion.keys import WORKERS_KEY
from tests.conftest import EVENT_GUARD_S, SAMPLES, wait_for


def submit(url: str, model: str | None) -> httpx.Response:
    data = {"prompt": "a cat", "num_inference_steps": "2", "resolution": "64"}
    if model is not None:
        data["model"] = model
    image = (SAMPLES / "chelsea.png").read_bytes()
    return httpx.post(f"{url}/v1/inversions", data=data, files={"image": ("c.png", image)})


def workers_by_model(client: redis.Redis) -> dict[str, str]:
    records = [WorkerRecord.model_validate_json(raw) for raw in client.hvals(WORKERS_KEY)]
    return {record.name: record.model.name for record in records}


def test_each_model_s_jobs_run_on_its_workers_and_a_down_model_queues(processes, redis_url):
    worker_a, worker_b = (
        processes.worker(INVERSION_MODEL_NAME=name, INVERSION_MAX_BATCH_WAIT_MS="200")
        for name in ("tiny-a", "tiny-b")
    )
    url = processes.gateway(INVERSION_DEFAULT_MODEL="")
    client = redis.Redis.from_url(redis_url)
    served = workers_by_model(client)
    assert sorted(served.values()) == ["tiny-a", "tiny-b"]

    listed = httpx.get(f"{url}/v1/models").json()
    assert {m["name"]: m["live_workers"] for m in listed["models"]} == {"tiny-a": 1, "tiny-b": 1}
    assert listed["default"] is None

    # Two models and no default: a job names one; a name never served is refused.
    for model in (None, "tiny-c"):
        refused = submit(url, model)
        assert refused.status_code == 422 and refused.json()["field"] == "model"
        assert "tiny-a" in refused.json()["detail"] and "tiny-b" in refused.json()["detail"]

    jobs = {submit(url, model).json()["id"]: model for model in ["tiny-a", "tiny-b"] * 3}
    for job_id in jobs:
        wait_for(
            lambda job_id=job_id: (
                httpx.get(f"{url}/v1/inversions/{job_id}").json()["status"] == "succeeded"
            ),
            EVENT_GUARD_S,
            f"job {job_id}",
        )
    for job_id, model in jobs.items():
        ran_on = client.hget(f"rq:job:{job_id}", "worker_name").decode()
        assert served[ran_on] == model, (job_id, model, ran_on)
        assert httpx.get(f"{url}/v1/inversions/{job_id}").json()["params"]["model"] == model

    # tiny-b's only worker leaves: tiny-b stays known, its jobs queue and say why.
    assert processes.stop(worker_b) == 0
    assert worker_a.poll() is None
    queued = submit(url, "tiny-b")
    assert queued.status_code == 202, queued.text
    status = httpx.get(f"{url}/v1/inversions/{queued.json()['id']}").json()
    assert (status["status"], status["live_workers"]) == ("queued", 0)
    listed = {m["name"]: m for m in httpx.get(f"{url}/v1/models").json()["models"]}
    assert (listed["tiny-b"]["ready"], listed["tiny-b"]["queued"]) == (False, 1)
    assert listed["tiny-a"]["ready"]
    client.close()
