"""Webhooks end to end: a real gateway and worker deliver to local receivers.

Signed and retried deliveries; URLs refused at submit; and a receiver that drips its answer
a byte at a time: its attempt is cut at the deadline, and another job's webhook to a fast
receiver arrives meanwhile, not after it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import EVENT_GUARD_S, SAMPLES, wait_for
from tests.webhook_receivers import DripReceiver, Receiver

pytestmark = pytest.mark.e2e


def post(base: str, **fields: object) -> httpx.Response:
    data = {"prompt": "a photo of a cat", "num_inference_steps": "3"}
    data |= {k: str(v) for k, v in fields.items()}
    with (SAMPLES / "chelsea.png").open("rb") as handle:
        files = {"image": ("chelsea.png", handle, "image/png")}
        return httpx.post(base + "/v1/inversions", data=data, files=files, timeout=EVENT_GUARD_S)


@pytest.fixture
def receivers() -> Iterator[list[Receiver | DripReceiver]]:
    made: list[Receiver | DripReceiver] = []
    yield made
    for receiver in made:
        receiver.close()


def test_webhooks_signed_retried_cut_at_the_deadline_and_refused(processes, receivers):
    drip = DripReceiver(every_s=0.1)
    ok = Receiver(observe=drip.alive)
    flaky = Receiver([500, 500])
    receivers += [ok, flaky, drip]
    # Receivers listen on 127.0.0.1 and on ephemeral ports: both must be allowed explicitly.
    ports = ",".join(str(r.port) for r in receivers)
    base = processes.gateway(
        INVERSION_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        INVERSION_WEBHOOK_ALLOWED_PORTS=ports,
        INVERSION_WEBHOOK_ALLOW_PRIVATE="true",
    )
    worker = processes.worker(
        INVERSION_WEBHOOK_SECRET="s3cret",
        INVERSION_WEBHOOK_BACKOFF_S="0.2",
        INVERSION_WEBHOOK_ATTEMPTS="3",
        INVERSION_WEBHOOK_TIMEOUT_S="3",
        INVERSION_WEBHOOK_ALLOWED_PORTS=ports,
        INVERSION_WEBHOOK_ALLOW_PRIVATE="true",
    )

    job = post(base, webhook_url=ok.url).json()
    wait_for(lambda: ok.calls, EVENT_GUARD_S, "the webhook")
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
    wait_for(lambda: len(flaky.calls) >= 3, EVENT_GUARD_S, "three attempts")
    assert {c[0]["x-inversion-job"] for c in flaky.calls} == {job["id"]}
    assert len(ok.calls) == 1

    # A receiver that never finishes its answer holds one delivery thread, not all of them.
    post(base, webhook_url=drip.url)
    wait_for(drip.alive, EVENT_GUARD_S, "the dripping receiver's first attempt")
    post(base, webhook_url=ok.url)
    wait_for(lambda: len(ok.calls) == 2, EVENT_GUARD_S, "the second webhook")
    assert ok.seen[1] == 1, "delivered while the dripping attempt was still open"
    # ... and that attempt ends at its deadline, though bytes keep coming.
    wait_for(lambda: drip.cut, EVENT_GUARD_S, "the dripping attempt to be cut")
    assert drip.connections >= 1

    for url, reason in [
        (f"http://example.com:{ok.port}/hook", "not among the allowed webhook hosts"),
        ("http://127.0.0.1:1/hook", "port 1 is not allowed"),
    ]:
        refused = post(base, webhook_url=url)
        assert refused.status_code == 422 and refused.json()["field"] == "webhook_url"
        assert reason in refused.json()["detail"]

    # Once the worker has exited (its pending deliveries flushed), no attempt can come:
    # the third, a success, was the flaky receiver's last.
    assert processes.stop(worker) == 0
    assert len(flaky.calls) == 3 and len(ok.calls) == 2
