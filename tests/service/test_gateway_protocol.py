"""Idempotency-Key, Prefer: wait, the events route, webhook URLs and the queue wait estimate."""

from __future__ import annotations

import json
import time

import pytest

from ddim_inversion.keys import THROUGHPUT_KEY, WORKERS_KEY
from service import jobs, protocol, uploads
from service.errors import ProblemError
from service.settings import GatewaySettings
from worker.webhooks import sign


def test_estimate_wait_s():
    assert jobs.estimate_wait_s(0, 2.0) == 0.5
    assert jobs.estimate_wait_s(9, 4.0) == 2.5
    assert jobs.estimate_wait_s(None, 2.0) is None
    assert jobs.estimate_wait_s(3, None) is None
    assert jobs.estimate_wait_s(3, 0.0) is None


def test_the_wait_estimate_sums_the_live_workers_rates_only(
    client, submit, small_png, redis, worker_record
):
    for name, age_s in (("a", 0), ("b", 0), ("stale", 3600)):
        redis.hset(WORKERS_KEY, name, worker_record(name, age_s=age_s).model_dump_json())
    for name, rate in (("a", 1.5), ("b", 2.5), ("stale", 9.0), ("gone", 9.0)):
        redis.hset(THROUGHPUT_KEY, name, json.dumps({"images_per_s": rate}))
    job_id = submit(client, small_png).json()["id"]
    body = client.get(f"/v1/inversions/{job_id}").json()
    assert (body["queue_position"], body["estimated_wait_s"]) == (0, 0.25)
    redis.hdel(THROUGHPUT_KEY, "a", "b")
    body = client.get(f"/v1/inversions/{job_id}").json()
    assert body["queue_position"] == 0 and "estimated_wait_s" not in body


@pytest.mark.parametrize(
    ("headers", "cap", "expected"),
    [
        (["wait=10"], 60, 10),
        (["respond-async, wait=100"], 60, 60),
        (["handling=lenient", "wait=5"], 60, 5),
        (["wait=0"], 60, None),
        (["wait=abc"], 60, None),
        (["wait=5"], 0, None),
        ([], 60, None),
    ],
)
def test_preferred_wait(headers, cap, expected):
    assert protocol.preferred_wait(headers, cap) == expected


def test_webhook_urls_are_checked_at_submit(make_client, submit, small_png, monkeypatch):
    """Host allow-list, ports and inside IP literals: 422 naming webhook_url, nothing queued."""
    client = make_client(webhook_allowed_hosts=("hooks.example.com", "*.example.org", "10.0.0.7"))
    refused = {
        "https://example.org/x": "not among the allowed webhook hosts",
        "ftp://hooks.example.com/": "must be an http or https URL",
        "https://evil.com/": "not among the allowed webhook hosts",
        "https://hooks.example.com:8443/x": "port 8443 is not allowed; allowed: 80, 443",
        "http://a.example.org:8080/x": "port 8080 is not allowed",
        "http://10.0.0.7/x": "10.0.0.7 is a private address",
    }
    for url, reason in refused.items():
        answer = submit(client, small_png, webhook_url=url)
        assert answer.status_code == 422, (url, answer.text)
        assert answer.json()["field"] == "webhook_url" and reason in answer.json()["detail"]

    # Other ports and inside targets only when the settings say so (as variables give them).
    monkeypatch.setenv("INVERSION_WEBHOOK_ALLOWED_PORTS", "443,8080")
    monkeypatch.setenv("INVERSION_WEBHOOK_ALLOW_PRIVATE", "true")
    monkeypatch.setenv("INVERSION_WEBHOOK_ALLOWED_HOSTS", "*.example.org,10.0.0.7")
    settings = GatewaySettings(redis_url="redis://unused.invalid:6379/0")
    assert settings.webhook_allowed_ports == (443, 8080)
    assert uploads.check_webhook_url(" http://a.example.org:8080/x ", settings) == (
        "http://a.example.org:8080/x"
    )
    assert uploads.check_webhook_url("https://10.0.0.7/x", settings)
    with pytest.raises(ProblemError) as caught:
        uploads.check_webhook_url("http://10.0.0.7/x", settings)  # port 80 is no longer listed
    assert caught.value.status == 422 and caught.value.field == "webhook_url"
    assert uploads.check_webhook_url(None, settings) is None
    off = {"webhook_allowed_hosts": ()}
    with pytest.raises(ProblemError, match="not enabled"):
        uploads.check_webhook_url("https://a.example.org/x", settings.model_copy(update=off))


def test_signature_matches_the_documented_verification():
    import hashlib
    import hmac

    body = b'{"id":"x"}'
    expected = "sha256=" + hmac.new(b"k", b"123." + body, hashlib.sha256).hexdigest()
    assert sign(b"k", "123", body) == expected


def test_idempotency_key_replays_and_refuses_another_payload(client, submit, small_png, queue):
    headers = {"Idempotency-Key": "abc"}
    data = {"prompt": "a cat", "num_inference_steps": "10"}
    files = {"image": ("i.png", small_png)}
    first = client.post("/v1/inversions", data=data, files=files, headers=headers)
    again = client.post("/v1/inversions", data=data, files=files, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert queue.count == 1
    other = client.post(
        "/v1/inversions", data=data | {"prompt": "a dog"}, files=files, headers=headers
    )
    assert other.status_code == 422 and other.json()["field"] == "Idempotency-Key"
    bad = client.post(
        "/v1/inversions", data=data, files=files, headers={"Idempotency-Key": "has space"}
    )
    assert bad.status_code == 422 and bad.json()["field"] == "Idempotency-Key"


def test_refused_submission_releases_its_key(client, small_png, redis):
    headers = {"Idempotency-Key": "k"}
    files = {"image": ("i.png", small_png)}
    refused = client.post(
        "/v1/inversions", data={"prompt": "x", "resolution": "65"}, files=files, headers=headers
    )
    assert refused.status_code == 422
    assert redis.get(protocol.idempotency_key("", "k")) is None


def test_prefer_wait_times_out_with_202(client, small_png):
    started = time.monotonic()
    answer = client.post(
        "/v1/inversions",
        data={"prompt": "x"},
        files={"image": ("i.png", small_png)},
        headers={"Prefer": "wait=1"},
    )
    assert answer.status_code == 202
    assert answer.headers["preference-applied"] == "wait=1"
    # It waited (the 1 s asked for, less the clocks' resolution), and no longer than the
    # longest wait it would otherwise apply: how much longer than 1 s is the machine's.
    longest = GatewaySettings.model_fields["max_prefer_wait_s"].default
    assert 0.9 <= time.monotonic() - started < longest


def test_events_of_an_unknown_job_is_404(client):
    answer = client.get("/v1/inversions/6f1c2a53-3f7e-4f4e-9d7c-6b0c1f2b9a11/events")
    assert answer.status_code == 404
