"""GET /v1/capacity: the live workers, their models and the queue, read from Redis."""

from __future__ import annotations

import hashlib
import json
import time

from prometheus_client.parser import text_string_to_metric_families

from ddim_inversion.keys import THROUGHPUT_KEY, WORKERS_KEY


def publish(redis, record, images_per_s: float | None = None) -> None:
    """What a worker writes: its record, and its throughput once it ran a batch."""
    redis.hset(WORKERS_KEY, record.name, record.model_dump_json())
    if images_per_s is not None:
        value = {"images_per_s": images_per_s, "updated_at": time.time()}
        redis.hset(THROUGHPUT_KEY, record.name, json.dumps(value))


def serving(record, model: str):
    return record.model_copy(update={"model": record.model.model_copy(update={"name": model})})


def test_no_worker_is_a_capacity_of_zero_not_an_error(client):
    response = client.get("/v1/capacity")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "workers": [],
        "models": [],
        # The gateway's default model, which no worker serves yet: its jobs wait.
        "by_model": [
            {
                "name": "stable-diffusion-v1-5",
                "ready": False,
                "live_workers": 0,
                "queued": 0,
                "running": 0,
                "images_per_s": None,
                "estimated_wait_s": None,
            }
        ],
        "queued": 0,
        "running": 0,
        "images_per_s": None,
        "estimated_wait_s": None,
    }


def test_capacity_follows_the_workers_and_the_queue(
    client, redis, queue, worker_record, submit, small_png
):
    publish(redis, worker_record("gpu-0", age_s=3.0), 2.0)
    publish(redis, serving(worker_record("gpu-1", age_s=1.0), "sd-2-base"), 3.0)
    publish(redis, worker_record("gpu-2", age_s=2.0))  # no batch yet: no rate
    publish(redis, worker_record("gone", age_s=600), 100.0)  # stale: not counted
    for _ in range(3):
        assert submit(client, small_png).status_code == 202
    # A job a worker runs: in RQ's started registry.
    redis.zadd(queue.started_job_registry.key, {"running-job": time.time() + 60})

    body = client.get("/v1/capacity").json()

    assert [(w["name"], w["model"], w["images_per_s"]) for w in body["workers"]] == [
        ("gpu-1", "sd-2-base", 3.0),
        ("gpu-2", "stable-diffusion-v1-5", None),
        ("gpu-0", "stable-diffusion-v1-5", 2.0),
    ]
    assert body["models"] == ["sd-2-base", "stable-diffusion-v1-5"]
    assert (body["queued"], body["running"]) == (3, 1)
    assert body["images_per_s"] == 5.0
    assert body["estimated_wait_s"] == (3 + 1) / 5.0
    # Per model: its own queue over its own workers' rate.
    by_model = {m["name"]: m for m in body["by_model"]}
    assert {name: (m["ready"], m["live_workers"], m["queued"]) for name, m in by_model.items()} == {
        "sd-2-base": (True, 1, 0),
        "stable-diffusion-v1-5": (True, 2, 3),
    }
    assert by_model["stable-diffusion-v1-5"]["estimated_wait_s"] == (3 + 1) / 2.0
    assert by_model["sd-2-base"]["estimated_wait_s"] == round(1 / 3.0, 3)
    # The same estimates as the dashboards read from /metrics.
    (family,) = [
        f
        for f in text_string_to_metric_families(client.get("/metrics").text)
        if f.name == "inversion_queue_estimated_wait_seconds"
    ]
    assert {s.labels["model"]: s.value for s in family.samples} == {
        name: m["estimated_wait_s"] for name, m in by_model.items()
    }


def test_capacity_needs_an_api_key(make_client):
    key = "key-of-alice"
    client = make_client(
        auth_disabled=False, api_key_hashes=(hashlib.sha256(key.encode()).hexdigest(),)
    )
    response = client.get("/v1/capacity")
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    assert client.get("/v1/capacity", headers={"Authorization": f"Bearer {key}"}).status_code == 200
