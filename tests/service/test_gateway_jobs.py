"""GET and DELETE of a job, and its latents, through each state a worker moves it to.

The job is queued by the real route and moved through its states by the worker's own
writes (`writes`: tests/worker_writes.py), so the gateway reads what a worker writes.
"""

from __future__ import annotations

import io
import uuid
from datetime import datetime

import numpy as np
import pytest

from ddim_inversion.errors import ErrorCode
from ddim_inversion.keys import CANCEL_CHANNEL, cancel_key, input_key, result_key
from tests.service.helpers import assert_problem


@pytest.fixture
def job_id(client, submit, small_png) -> str:
    response = submit(client, small_png, num_inference_steps=10)
    assert response.status_code == 202
    return response.json()["id"]


# -- GET -----------------------------------------------------------------------------------


def test_queued_job_reports_its_position(client, submit, small_png, job_id):
    second = submit(client, small_png).json()["id"]
    body = client.get(f"/v1/inversions/{job_id}").json()
    assert body["status"] == "queued"
    assert body["queue_position"] == 0
    assert body["params"]["prompt"] == "a cat"
    assert body["params"]["num_inference_steps"] == 10
    assert body["timings"]["queued_at"]
    assert "started_at" not in body["timings"]
    assert "result" not in body and "error" not in body
    assert body["urls"]["latents"] == f"/v1/inversions/{job_id}/latents"
    assert client.get(f"/v1/inversions/{second}").json()["queue_position"] == 1


@pytest.mark.parametrize(
    "bad",
    [
        str(uuid.uuid4()),
        "not-a-uuid",
        "..%2F..%2Fetc",
        f"{{{uuid.uuid4()}}}",
        f"urn:uuid:{uuid.uuid4()}",
        uuid.uuid4().hex,
    ],
)
def test_unknown_or_malformed_id_is_404(client, bad):
    assert_problem(client.get(f"/v1/inversions/{bad}"), 404, "not_found")
    assert_problem(client.get(f"/v1/inversions/{bad}/latents"), 404, "not_found")
    assert_problem(client.delete(f"/v1/inversions/{bad}"), 404, "not_found")


def test_a_job_is_named_by_its_id_as_written_only(client, job_id):
    assert client.get(f"/v1/inversions/{job_id}").status_code == 200
    for other in (job_id.upper(), job_id.replace("-", ""), f"{{{job_id}}}"):
        assert_problem(client.get(f"/v1/inversions/{other}"), 404, "not_found")


def test_running_job_reports_progress(client, writes, job_id):
    writes.start(job_id, step=4, total=10)
    body = client.get(f"/v1/inversions/{job_id}").json()
    assert body["status"] == "running"
    assert body["progress"] == {"step": 4, "total": 10}
    assert "queue_position" not in body
    assert body["timings"]["started_at"]
    assert body["timings"]["queue_wait_s"] >= 0


def test_succeeded_job_reports_result_and_resolved_params(client, writes, job_id):
    writes.succeed(job_id)
    body = client.get(f"/v1/inversions/{job_id}").json()
    assert body["status"] == "succeeded"
    assert body["result"]["latents_shape"] == [1, 4, 8, 8]
    assert body["params"]["resolved_resolution"] == [64, 64]
    assert body["params"]["resolved_scheduler_config"]["clip_sample"] is False
    timings = body["timings"]
    started, finished = (datetime.fromisoformat(timings[k]) for k in ("started_at", "finished_at"))
    # run_s is rounded to the millisecond: 0.5 ms off at most.
    assert timings["run_s"] == pytest.approx((finished - started).total_seconds(), abs=1e-3)
    assert "progress" not in body


def test_failed_job_reports_the_workers_error(client, writes, job_id):
    writes.fail(job_id, ErrorCode.GPU_OUT_OF_MEMORY, "CUDA out of memory")
    body = client.get(f"/v1/inversions/{job_id}").json()
    assert body["status"] == "failed"
    assert body["error"] == {"code": "gpu_out_of_memory", "message": "CUDA out of memory"}


def test_failed_job_without_meta_is_internal(client, writes, job_id):
    writes.fail_undescribed(job_id)
    body = client.get(f"/v1/inversions/{job_id}").json()
    assert body["status"] == "failed"
    assert body["error"] == {
        "code": "internal",
        "message": "RuntimeError: the worker went away mid-failure",
    }


# -- latents -------------------------------------------------------------------------------


def test_latents_while_queued_or_running_is_409(client, writes, job_id):
    assert_problem(client.get(f"/v1/inversions/{job_id}/latents"), 409, "not_finished")
    writes.start(job_id)
    assert_problem(client.get(f"/v1/inversions/{job_id}/latents"), 409, "not_finished")


def test_latents_of_a_failed_job_is_409_no_result(client, writes, job_id):
    writes.fail(job_id, ErrorCode.TIMEOUT, "took too long")
    body = assert_problem(client.get(f"/v1/inversions/{job_id}/latents"), 409, "no_result")
    assert "failed" in body["detail"]


def test_latents_as_safetensors_and_npy(client, redis, writes, job_id):
    latents = writes.succeed(job_id)
    response = client.get(f"/v1/inversions/{job_id}/latents")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert f'filename="{job_id}.safetensors"' in response.headers["content-disposition"]
    assert response.content == redis.get(result_key(job_id))

    response = client.get(f"/v1/inversions/{job_id}/latents", params={"format": "npy"})
    assert response.status_code == 200
    assert f'filename="{job_id}.npy"' in response.headers["content-disposition"]
    np.testing.assert_array_equal(np.load(io.BytesIO(response.content)), latents)

    bad = client.get(f"/v1/inversions/{job_id}/latents", params={"format": "pickle"})
    assert_problem(bad, 422, "validation_error")


def test_expired_result_is_404(client, redis, writes, job_id):
    writes.succeed(job_id)
    redis.delete(result_key(job_id))
    assert_problem(client.get(f"/v1/inversions/{job_id}/latents"), 404, "not_found")


# -- DELETE --------------------------------------------------------------------------------


def test_cancel_a_queued_job(client, redis, queue, job_id):
    response = client.delete(f"/v1/inversions/{job_id}")
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "canceled"
    assert body["error"] == {"code": "canceled", "message": "canceled by the client"}
    assert job_id not in queue.job_ids
    assert redis.exists(cancel_key(job_id))
    assert not redis.exists(input_key(job_id))
    assert client.get(f"/v1/inversions/{job_id}").json()["status"] == "canceled"
    assert_problem(client.get(f"/v1/inversions/{job_id}/latents"), 409, "no_result")


def test_cancel_a_running_job_asks_the_worker(client, redis, writes, job_id):
    writes.start(job_id)
    listener = redis.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(CANCEL_CHANNEL)
    response = client.delete(f"/v1/inversions/{job_id}")
    assert response.status_code == 202
    assert response.json()["status"] == "running"
    assert 0 < redis.ttl(cancel_key(job_id)) <= 600 + 60
    # The first read only consumes the subscription's confirmation.
    messages = [listener.get_message(timeout=0.1) for _ in range(3)]
    assert [m["data"] for m in messages if m] == [job_id.encode()]
    listener.close()


def test_job_canceled_while_running_ends_canceled(client, redis, writes, job_id):
    writes.start(job_id)
    assert client.delete(f"/v1/inversions/{job_id}").json()["status"] == "running"
    writes.cancel(job_id)  # what the worker does on hearing it
    body = client.get(f"/v1/inversions/{job_id}").json()
    assert body["status"] == "canceled"
    assert body["error"] == {"code": "canceled", "message": "canceled by the client"}
    assert not redis.exists(cancel_key(job_id))
    assert not redis.exists(input_key(job_id))
    assert_problem(client.get(f"/v1/inversions/{job_id}/latents"), 409, "no_result")


def test_delete_a_finished_job(client, redis, writes, job_id):
    writes.succeed(job_id)
    response = client.delete(f"/v1/inversions/{job_id}")
    assert response.status_code == 204
    assert response.content == b""
    assert not redis.exists(result_key(job_id))
    assert not redis.exists(input_key(job_id))
    assert_problem(client.get(f"/v1/inversions/{job_id}"), 404, "not_found")
    assert_problem(client.delete(f"/v1/inversions/{job_id}"), 404, "not_found")


def test_delete_a_canceled_job(client, job_id):
    assert client.delete(f"/v1/inversions/{job_id}").status_code == 202
    assert client.delete(f"/v1/inversions/{job_id}").status_code == 204
    assert_problem(client.get(f"/v1/inversions/{job_id}"), 404, "not_found")
