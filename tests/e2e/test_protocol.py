"""Protocol features end to end: Idempotency-Key, Prefer: wait, SSE events, webhooks, waits."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import SAMPLES, wait_for

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
            timeout=60,
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


def read_events(base: str, job_id: str, events: list[tuple[str, dict]]) -> None:
    with httpx.stream("GET", f"{base}/v1/inversions/{job_id}/events", timeout=60) as answer:
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
    reader.join(60)
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


class Receiver:
    """A local webhook receiver: answers `codes` in turn (then 200), records each POST."""

    def __init__(self, codes: list[int] | None = None) -> None:
        self.codes = list(codes or [])
        self.calls: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.codes.pop(0) if receiver.codes else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.close()


def test_webhooks_signed_retried_and_refused(processes, receivers):
    base = processes.gateway(INVERSION_WEBHOOK_ALLOWED_HOSTS="127.0.0.1")
    processes.worker(INVERSION_WEBHOOK_SECRET="s3cret", INVERSION_WEBHOOK_BACKOFF_S="0.2")
    ok, flaky = Receiver(), Receiver([500, 500])
    receivers += [ok, flaky]

    job = post(base, webhook_url=ok.url).json()
    wait_for(lambda: ok.calls, 60, "the webhook")
    headers, body = ok.calls[0]
    expected = hmac.new(
        b"s3cret", headers["x-inversion-timestamp"].encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(headers["x-inversion-signature"], "sha256=" + expected)
    assert abs(int(headers["x-inversion-timestamp"]) - time.time()) < 60
    assert headers["x-inversion-job"] == job["id"]
    payload = json.loads(body)
    assert payload["id"] == job["id"] and payload["status"] == "succeeded"
    assert payload["result"]["num_inference_steps"] == 3 and payload["finished_at"]

    job = post(base, webhook_url=flaky.url).json()
    wait_for(lambda: len(flaky.calls) >= 3, 60, "three attempts")
    time.sleep(1.0)
    assert len(flaky.calls) == 3
    assert {c[0]["x-inversion-job"] for c in flaky.calls} == {job["id"]}
    assert len(ok.calls) == 1

    refused = post(base, webhook_url="http://example.com/hook")
    assert refused.status_code == 422 and refused.json()["field"] == "webhook_url"
