"""Protocol features end to end: Idempotency-Key, Prefer: wait, SSE events, waits.

Webhooks: tests/e2e/test_webhooks.py.
"""

from __future__ import annotations

import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import EVENT_GUARD_S, SAMPLES

pytestmark = pytest.mark.e2e


def post(base: str, headers: dict[str, str] | None = None, **fields: object) -> httpx.Response:
    data = {"prompt": "a photo of a cat", "num_inference_steps": "3"}
    data |= {k: str(v) for k, v in fields.items()}
    with (SAMPLES / "chelsea.png").open("rb") as handle:
        return httpx.post(
            base + "/v1/inversions",
            data=data,
            files={"image": ("chelsea.png", handle, "image/png")},
            headers=headers or {},
            timeout=EVENT_GUARD_S,
        )


def test_idempotency_prefer_wait_and_estimated_wait(processes, redis_client):
    base = processes.gateway()
    processes.worker(INVERSION_MAX_BATCH_SIZE="1")

    first = post(base, {"Idempotency-Key": "k-1", "Prefer": "wait=30"})
    assert first.status_code == 200, first.text
    assert first.headers["preference-applied"] == "wait=30"
    body = first.json()
    assert body["status"] == "succeeded" and body["result"]["num_inference_steps"] == 3
    assert body == httpx.get(f"{base}/v1/inversions/{body['id']}").json()

    again = post(base, {"Idempotency-Key": "k-1"})
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = post(base, {"Idempotency-Key": "k-1"}, prompt="a dog")
    assert other.status_code == 422
    assert other.json()["code"] == "validation_error"
    assert other.json()["field"] == "Idempotency-Key"

    # Two concurrent submissions with one new key make one job.
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: post(base, {"Idempotency-Key": "race"}), range(4)))
    assert {a.status_code for a in answers} <= {200, 202}
    assert len({a.json()["id"] for a in answers}) == 1
    assert len(redis_client.keys("rq:job:*")) == 2

    # A wait that runs out answers 202 as usual.
    long = post(base, {"Prefer": "wait=1"}, num_inference_steps=900)
    assert long.status_code == 202 and long.headers["preference-applied"] == "wait=1"
    # While the long job runs, the next one waits with an estimate from the throughput.
    queued = post(base, num_inference_steps=3).json()
    view = httpx.get(f"{base}/v1/inversions/{queued['id']}").json()
    assert view["status"] == "queued" and view["queue_position"] == 0
    assert view["estimated_wait_s"] > 0
    for job in (long.json(), queued):
        httpx.delete(f"{base}/v1/inversions/{job['id']}")


def test_a_json_submission_waits_and_replays_as_a_form_does(shared_service):
    """JSON (the image as base64) with `Prefer: wait` answers 200 with the ended job; the
    same image and fields as multipart, with the same Idempotency-Key, replay that job."""
    base = shared_service.url
    image = (SAMPLES / "chelsea.png").read_bytes()
    fields = {"prompt": "a photo of a cat", "num_inference_steps": 3}
    waited = httpx.post(
        base + "/v1/inversions",
        json={**fields, "image": base64.b64encode(image).decode()},
        headers={"Idempotency-Key": "json-wait", "Prefer": "wait=30"},
        timeout=EVENT_GUARD_S,
    )
    assert waited.status_code == 200, waited.text
    assert waited.headers["preference-applied"] == "wait=30"
    body = waited.json()
    assert body["status"] == "succeeded" and body["result"]["num_inference_steps"] == 3
    assert body == httpx.get(f"{base}/v1/inversions/{body['id']}").json()
    replayed = httpx.post(
        base + "/v1/inversions",
        data={name: str(value) for name, value in fields.items()},
        files={"image": ("chelsea.png", image, "image/png")},
        headers={"Idempotency-Key": "json-wait"},
        timeout=EVENT_GUARD_S,
    )
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["id"] == body["id"]
    assert replayed.headers["idempotent-replayed"] == "true"


def read_events(base: str, job_id: str, events: list[tuple[str, dict]]) -> None:
    with httpx.stream(
        "GET", f"{base}/v1/inversions/{job_id}/events", timeout=EVENT_GUARD_S
    ) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in answer.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name is not None:
                events.append((name, json.loads(line[6:])))


def test_events_stream_until_the_end(shared_service):
    base = shared_service.url
    job = post(base, num_inference_steps=300).json()
    events: list[tuple[str, dict]] = []
    reader = threading.Thread(target=read_events, args=(base, job["id"], events))
    reader.start()
    reader.join(EVENT_GUARD_S)
    assert not reader.is_alive()
    names = [name for name, _ in events]
    assert names[0] == "status" and events[0][1]["status"] in ("queued", "running")
    assert names[-1] == "end" and events[-1][1] == {"id": job["id"], "status": "succeeded"}
    statuses = [data["status"] for name, data in events if name == "status"]
    assert statuses[-1] == "succeeded" and "running" in statuses
    steps = [data["step"] for name, data in events if name == "progress"]
    assert len(steps) >= 2 and steps == sorted(set(steps)) and steps[-1] == 300
    missing = httpx.get(f"{base}/v1/inversions/6f1c2a53-3f7e-4f4e-9d7c-6b0c1f2b9a11/events")
    assert missing.status_code == 404
