"""A job whose result holds NaN or infinities fails with `non_finite_result`: it is never
stored as a success. In-process batching worker, real Redis, the tiny model."""

from __future__ import annotations

import pytest
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from ddim_inversion.contract import META_ERROR, META_RESULT
from ddim_inversion.keys import result_key
from tests.jobs_helper import enqueue


def fetch(connection, job_id: str) -> Job:
    return Job.fetch(job_id, connection=connection, serializer=JSONSerializer)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_result_that_is_not_finite_fails_with_its_code(
    redis_client, tiny_model, make_worker, value
):
    # A UNet whose output overflows, as a float16 model's can: its noise prediction is
    # `value` everywhere from the second call on, so the latents become `value` too.
    calls = []

    def overflow(module, args, output):
        calls.append(1)
        if len(calls) > 1:
            output[0].fill_(value)

    bad = enqueue(redis_client, prompt="overflows", num_inference_steps=3, return_trajectory=True)
    handle = tiny_model.unet.register_forward_hook(overflow)
    try:
        make_worker(redis_client, tiny_model, 1).work(burst=True)
    finally:
        handle.remove()
    job = fetch(redis_client, bad)
    assert job.get_status() == JobStatus.FAILED
    error = job.meta[META_ERROR]
    assert error["code"] == "non_finite_result"
    assert "latents, trajectory" in error["message"]
    assert META_RESULT not in job.meta
    assert redis_client.get(result_key(bad)) is None

    good = enqueue(redis_client, prompt="fine", num_inference_steps=3)
    make_worker(redis_client, tiny_model, 1).work(burst=True)
    assert fetch(redis_client, good).get_status() == JobStatus.FINISHED
