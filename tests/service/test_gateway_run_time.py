"""Admission by run time: a job's run time estimated from its cost and its model's measured
cost/s, refused over the job timeout (422), and a key's estimated GPU seconds in flight
bounded (429) and given back exactly when its jobs end.

The worker's rate is chosen as one 512x512 unguided step's cost (64 x 64 latent pixels) per
second, so that a job of N such steps is estimated at exactly N seconds: every bound below
is integer arithmetic on floats that represent it exactly (no rounding at the boundary).
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from pydantic import ValidationError

from ddim_inversion.errors import ErrorCode
from ddim_inversion.estimates import job_cost
from ddim_inversion.keys import THROUGHPUT_KEY, WORKERS_KEY, input_key, owner_gpu_ms_key
from ddim_inversion.params import InversionParams
from service.limits import KeyUsage, key_usage
from service.settings import GatewaySettings
from tests.service.helpers import assert_problem

KEY_A, KEY_B = "key-of-alice", "key-of-bob"
HASH_A = hashlib.sha256(KEY_A.encode()).hexdigest()
KEYS = {
    "auth_disabled": False,
    "api_key_hashes": (HASH_A, hashlib.sha256(KEY_B.encode()).hexdigest()),
}

STEP_COST = 64 * 64
"""One unguided step at SD 1.5's native 512x512: one UNet call on 64 x 64 latent pixels."""


def post(client, image: bytes, key: str | None = None, **fields):
    data = {"prompt": "a cat"} | {k: str(v) for k, v in fields.items()}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post(
        "/v1/inversions", data=data, files={"image": ("i.png", image)}, headers=headers
    )


@pytest.fixture
def measured(client, small_png, redis, writes, worker_record):
    """A live worker of the served model that ran one job and recorded STEP_COST per second,
    as a worker does: its record, then the throughput written in its success transaction."""
    record = worker_record(name=writes.worker.name)
    redis.hset(WORKERS_KEY, record.name, record.model_dump_json())
    job_id = post(client, small_png, num_inference_steps=1).json()["id"]
    rate = {"images_per_s": 1.0, "cost_per_s": float(STEP_COST), "updated_at": time.time()}
    writes.succeed(job_id, throughput=json.dumps(rate))
    return record


def test_the_cost_model_is_one_step_cost_per_step():
    # The premise of every bound here: N unguided steps at 512x512 cost N x STEP_COST.
    params = InversionParams(prompt="a cat", num_inference_steps=600)
    assert job_cost(params, None, (512, 512)) == 600 * STEP_COST


def test_a_job_that_cannot_finish_in_the_timeout_is_422(
    make_client, small_png, measured, queue, redis
):
    client = make_client(job_timeout_s=600)
    queued = queue.count
    # 600 s at the measured rate: exactly the timeout, admitted.
    assert post(client, small_png, num_inference_steps=600).status_code == 202
    body = assert_problem(
        post(client, small_png, num_inference_steps=601),
        422,
        "run_time_exceeded",
        "num_inference_steps",
    )
    detail = body["detail"]
    assert "about 601.0 s" in detail and "600 s (INVERSION_JOB_TIMEOUT_S)" in detail
    for driver in (
        "num_inference_steps",
        "guidance_scale",
        "refine_iterations",
        "verify",
        "resolution",
        "method",
    ):
        assert driver in detail
    # Guidance doubles the calls: 300 guided steps are 600 s, 301 are over.
    assert post(client, small_png, num_inference_steps=300, guidance_scale=2).status_code == 202
    assert_problem(
        post(client, small_png, num_inference_steps=301, guidance_scale=2), 422, "run_time_exceeded"
    )
    assert queue.count == queued + 2  # nothing of a refused job is queued or stored
    assert len(redis.keys(input_key("*"))) == queue.count


def test_the_margin_scales_the_estimate(make_client, small_png, measured):
    client = make_client(job_timeout_s=600, run_time_margin=2.0)
    assert post(client, small_png, num_inference_steps=300).status_code == 202
    body = assert_problem(
        post(client, small_png, num_inference_steps=301), 422, "run_time_exceeded"
    )
    assert "INVERSION_RUN_TIME_MARGIN 2" in body["detail"]


def test_without_a_measured_rate_there_is_no_run_time_check(
    make_client, small_png, live_worker, redis
):
    client = make_client(**KEYS, job_timeout_s=600, max_gpu_seconds_per_key=600)
    # No worker has run a batch: neither refused by run time nor counted in GPU seconds.
    for _ in range(2):
        response = post(client, small_png, KEY_A, num_inference_steps=800)
        assert response.status_code == 202, response.text
    assert key_usage(redis, HASH_A).gpu_ms == 0


def test_the_fastest_live_worker_is_the_estimate(
    make_client, small_png, measured, redis, worker_record
):
    slow = worker_record(name="slow")
    redis.hset(WORKERS_KEY, slow.name, slow.model_dump_json())
    redis.hset(THROUGHPUT_KEY, slow.name, json.dumps({"images_per_s": 1.0, "cost_per_s": 1.0}))
    client = make_client(job_timeout_s=600)
    assert post(client, small_png, num_inference_steps=600).status_code == 202


def test_a_keys_gpu_seconds_in_flight_are_429_and_given_back_exactly(
    make_client, small_png, measured, redis, writes
):
    client = make_client(**KEYS, job_timeout_s=600, max_gpu_seconds_per_key=1000)
    first = post(client, small_png, KEY_A, num_inference_steps=400).json()["id"]
    second = post(client, small_png, KEY_A, num_inference_steps=400).json()["id"]
    assert key_usage(redis, HASH_A).gpu_ms == 800_000
    response = post(client, small_png, KEY_A, num_inference_steps=201)  # 1001 s > 1000
    body = assert_problem(response, 429, "quota_exceeded")
    assert "INVERSION_MAX_GPU_SECONDS_PER_KEY" in body["detail"] and "800.0" in body["detail"]
    assert int(response.headers["retry-after"]) > 0
    assert post(client, small_png, KEY_B, num_inference_steps=400).status_code == 202
    third = post(client, small_png, KEY_A, num_inference_steps=200).json()["id"]  # 1000 s: fits
    assert key_usage(redis, HASH_A).gpu_ms == 1_000_000
    fourth_refused = post(client, small_png, KEY_A, num_inference_steps=1)
    assert_problem(fourth_refused, 429, "quota_exceeded")

    # Each way a job ends gives its seconds back: success, cancel while running (by the
    # worker), cancel while queued (by the gateway).
    writes.succeed(first)
    assert key_usage(redis, HASH_A).gpu_ms == 600_000
    writes.start(second)
    writes.cancel(second)
    assert key_usage(redis, HASH_A).gpu_ms == 200_000
    auth = {"Authorization": f"Bearer {KEY_A}"}
    assert client.delete(f"/v1/inversions/{third}", headers=auth).status_code == 202
    assert key_usage(redis, HASH_A) == KeyUsage(jobs=0, cost=0, gpu_ms=0)
    assert redis.hlen(owner_gpu_ms_key(HASH_A)) == 0  # nothing left behind to leak
    # The whole budget is free again: a job of exactly 1000 s is admitted.
    assert post(client, small_png, KEY_A, num_inference_steps=500).status_code == 202
    assert post(client, small_png, KEY_A, num_inference_steps=500).status_code == 202


def test_a_failed_or_deleted_job_gives_its_seconds_back(
    make_client, small_png, measured, redis, writes
):
    client = make_client(**KEYS, job_timeout_s=600, max_gpu_seconds_per_key=1000)
    auth = {"Authorization": f"Bearer {KEY_A}"}
    failed = post(client, small_png, KEY_A, num_inference_steps=500).json()["id"]
    done = post(client, small_png, KEY_A, num_inference_steps=500).json()["id"]
    assert key_usage(redis, HASH_A).gpu_ms == 1_000_000
    writes.fail(failed, ErrorCode.INTERNAL, "boom")
    assert key_usage(redis, HASH_A).gpu_ms == 500_000
    writes.succeed(done)
    assert client.delete(f"/v1/inversions/{done}", headers=auth).status_code == 204
    assert key_usage(redis, HASH_A).gpu_ms == 0
    assert redis.hlen(owner_gpu_ms_key(HASH_A)) == 0


def test_one_long_job_must_fit_the_keys_gpu_budget():
    with pytest.raises(ValidationError, match="max_gpu_seconds_per_key"):
        GatewaySettings(job_timeout_s=600, max_gpu_seconds_per_key=599)
    with pytest.raises(ValidationError, match="run_time_margin"):
        GatewaySettings(run_time_margin=0.5)
