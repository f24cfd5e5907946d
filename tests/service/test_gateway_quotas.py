"""Per-job bounds (resolution, stored bytes, GPU cost), per-key budgets, and replays counted
against the rate, through the gateway app over a FakeRedis."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from ddim_inversion.estimates import job_cost, stored_bytes
from ddim_inversion.keys import input_key, owner_held_bytes_key, owner_held_total_key
from ddim_inversion.params import InversionParams
from service.settings import GatewaySettings
from tests.service.helpers import assert_problem

KEY_A, KEY_B = "key-of-alice", "key-of-bob"
HASH_A = hashlib.sha256(KEY_A.encode()).hexdigest()
HASH_B = hashlib.sha256(KEY_B.encode()).hexdigest()
KEYS = {"auth_disabled": False, "api_key_hashes": (HASH_A, HASH_B)}


def post(client, image: bytes, key: str | None = None, headers: dict | None = None, **fields):
    data = {"prompt": "a cat"} | {k: str(v) for k, v in fields.items()}
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    return client.post("/v1/inversions", data=data, files={"image": ("i.png", image)}, headers=sent)


def held(redis, owner: str) -> int:
    return int(redis.get(owner_held_total_key(owner)) or 0)


# -- resolution ----------------------------------------------------------------------------


def test_resolution_is_bounded_by_the_live_models_native_size(client, small_png, live_worker):
    # SD 1.5's native 512, INVERSION_MAX_RESOLUTION_SCALE 2: sides up to 1024.
    assert post(client, small_png, resolution="1024x512").status_code == 202
    body = assert_problem(
        post(client, small_png, resolution="1088x512"), 422, "validation_error", "resolution"
    )
    assert "1024" in body["detail"] and "INVERSION_MAX_RESOLUTION_SCALE" in body["detail"]


def test_resolution_side_cap_holds_without_a_worker(make_client, small_png, queue):
    client = make_client(max_resolution_side=512)
    body = assert_problem(
        post(client, small_png, resolution="576x64"), 422, "validation_error", "resolution"
    )
    assert "512" in body["detail"] and "INVERSION_MAX_RESOLUTION_SIDE" in body["detail"]
    assert queue.count == 0
    assert post(client, small_png, resolution="512x64").status_code == 202


def test_the_side_cap_applies_under_a_large_scale(make_client, small_png, live_worker):
    client = make_client(max_resolution_scale=8.0, max_resolution_side=1536)
    assert post(client, small_png, resolution="1536").status_code != 422
    assert_problem(
        post(client, small_png, resolution="1600"), 422, "validation_error", "resolution"
    )


# -- one job's bytes and cost ----------------------------------------------------------------


def test_a_job_over_the_byte_limit_is_422_naming_what_drives_it(
    make_client, small_png, live_worker, queue, redis
):
    client = make_client(max_job_bytes=16 * 1024 * 1024)
    # 501 latents of 4 x 64 x 64 float32: 32 MB of trajectory.
    body = assert_problem(
        post(client, small_png, num_inference_steps=500, return_trajectory="true"),
        422,
        "validation_error",
        "return_trajectory",
    )
    assert "INVERSION_MAX_JOB_BYTES" in body["detail"]
    assert queue.count == 0 and redis.keys(input_key("*")) == []
    assert (
        post(client, small_png, num_inference_steps=10, return_trajectory="true").status_code == 202
    )


def test_a_job_over_the_cost_limit_is_422_naming_the_parameters(
    make_client, small_png, live_worker, queue
):
    client = make_client(max_job_cost=100 * 64 * 64)
    body = assert_problem(
        post(client, small_png, num_inference_steps=51, guidance_scale=7.5),
        422,
        "validation_error",
        "num_inference_steps",
    )
    assert "INVERSION_MAX_JOB_COST" in body["detail"] and "refine_iterations" in body["detail"]
    assert queue.count == 0
    assert post(client, small_png, num_inference_steps=50, guidance_scale=7.5).status_code == 202


def test_default_limits_pass_real_jobs_and_refuse_the_extremes():
    settings = GatewaySettings()
    usual = InversionParams(prompt="x", num_inference_steps=50, guidance_scale=7.5, verify=True)
    worst = InversionParams(
        prompt="x",
        num_inference_steps=1000,
        guidance_scale=7.5,
        refine_iterations=50,
        verify=True,
        return_trajectory=True,
    )
    side = settings.max_resolution_side
    assert job_cost(usual, None, (512, 512)) * 20 < settings.max_job_cost
    assert stored_bytes(usual, None, (512, 512), (512, 512)).total < 16 * 1024 * 1024
    assert job_cost(worst, None, (side, side)) > settings.max_job_cost
    assert stored_bytes(worst, None, (side, side), (side, side)).total > (settings.max_job_bytes)


def test_a_job_allowed_alone_must_fit_its_keys_budget():
    with pytest.raises(ValidationError, match="max_job_cost"):
        GatewaySettings(max_job_cost=10, max_queued_cost_per_key=5)
    with pytest.raises(ValidationError, match="max_job_bytes"):
        GatewaySettings(max_job_bytes=10, max_held_bytes_per_key=5)


# -- per-key budgets ------------------------------------------------------------------------


def test_per_key_queued_cost_is_429_quota_exceeded(make_client, small_png, live_worker, writes):
    job = 10 * 64 * 64  # 10 unguided steps at 512x512
    client = make_client(**KEYS, max_job_cost=job, max_queued_cost_per_key=2 * job)
    first = post(client, small_png, KEY_A, num_inference_steps=10).json()["id"]
    assert post(client, small_png, KEY_A, num_inference_steps=10).status_code == 202
    body = assert_problem(
        post(client, small_png, KEY_A, num_inference_steps=1), 429, "quota_exceeded"
    )
    assert "INVERSION_MAX_QUEUED_COST_PER_KEY" in body["detail"]
    assert post(client, small_png, KEY_B, num_inference_steps=10).status_code == 202
    writes.succeed(first)  # an ended job's cost is no longer counted
    assert post(client, small_png, KEY_A, num_inference_steps=10).status_code == 202


def test_per_key_held_bytes_are_429_and_deleting_frees_them(make_client, small_png, redis, writes):
    client = make_client(**KEYS, max_job_bytes=70_000, max_held_bytes_per_key=70_000)
    first = post(client, small_png, KEY_A, resolution=64)
    assert first.status_code == 202
    one_job = held(redis, HASH_A)
    assert 64 * 64 * 3 < one_job <= 70_000 // 2  # the input and the result's bound
    assert post(client, small_png, KEY_A, resolution=64).status_code == 202
    assert held(redis, HASH_A) == 2 * one_job
    response = post(client, small_png, KEY_A, resolution=64)
    body = assert_problem(response, 429, "quota_exceeded")
    assert "INVERSION_MAX_HELD_BYTES_PER_KEY" in body["detail"]
    assert int(response.headers["retry-after"]) > 0
    assert post(client, small_png, KEY_B, resolution=64).status_code == 202
    # A finished job deleted gives its bytes back at once.
    job_id = first.json()["id"]
    writes.succeed(job_id)
    assert (
        client.delete(f"/v1/inversions/{job_id}", headers={"X-API-Key": KEY_A}).status_code == 204
    )
    assert held(redis, HASH_A) == one_job
    assert redis.hget(owner_held_bytes_key(HASH_A), job_id) is None
    assert post(client, small_png, KEY_A, resolution=64).status_code == 202


def test_canceling_a_queued_job_frees_its_bytes(make_client, small_png, redis):
    client = make_client(**KEYS)
    job_id = post(client, small_png, KEY_A).json()["id"]
    stored_input = len(redis.get(input_key(job_id)))
    assert held(redis, HASH_A) > stored_input
    assert (
        client.delete(f"/v1/inversions/{job_id}", headers={"X-API-Key": KEY_A}).status_code == 202
    )
    # The input is gone; the canceled job's record and signals stay held until it expires.
    assert redis.get(input_key(job_id)) is None
    assert 0 < held(redis, HASH_A) < stored_input
    assert (
        client.delete(f"/v1/inversions/{job_id}", headers={"X-API-Key": KEY_A}).status_code == 204
    )
    assert held(redis, HASH_A) == 0


def test_anonymous_owner_has_no_per_key_budgets(make_client, small_png, redis):
    client = make_client(max_job_bytes=100_000, max_held_bytes_per_key=100_000)
    for _ in range(8):  # far more than 100 KB of inputs and results
        assert post(client, small_png, resolution=64).status_code == 202
    assert redis.keys(owner_held_total_key("*")) == []


# -- Idempotency-Key replays ----------------------------------------------------------------


def test_replays_count_against_the_rate_limit(make_client, small_png, queue):
    client = make_client(**KEYS, rate_limit_per_minute=5)
    answers = [post(client, small_png, KEY_A, {"Idempotency-Key": "same"}) for _ in range(8)]
    assert [a.status_code for a in answers] == [202] * 5 + [429] * 3
    assert answers[5].json()["code"] == "rate_limited"
    assert queue.count == 1


def test_a_key_whose_job_was_never_enqueued_makes_that_job(client, small_png, queue, redis):
    # What a submission leaves when its enqueue reply was lost and the enqueue did not run:
    # the key names a job id that does not exist. The retry makes that job, once.
    first = post(client, small_png, headers={"Idempotency-Key": "k"})
    job_id = first.json()["id"]
    for key in redis.keys("rq:*"):
        redis.delete(key)
    redis.delete(input_key(job_id))
    retry = post(client, small_png, headers={"Idempotency-Key": "k"})
    assert retry.status_code == 202 and retry.json()["id"] == job_id
    assert "idempotent-replayed" not in retry.headers
    assert queue.job_ids == [job_id]
    again = post(client, small_png, headers={"Idempotency-Key": "k"})
    assert again.json()["id"] == job_id and again.headers["idempotent-replayed"] == "true"
    assert queue.job_ids == [job_id]
