"""The bytes a job holds against its key's budget, as the worker settles them when the job
ends: its result's size until the result expires; nothing once it failed or was canceled."""

from __future__ import annotations

import time
import uuid

import numpy as np
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from ddim_inversion import imaging
from ddim_inversion.keys import (
    cancel_key,
    input_key,
    owner_held_bytes_key,
    owner_held_key,
    owner_held_total_key,
    reconstruction_key,
    result_key,
)
from ddim_inversion.params import InversionParams
from service import jobs, limits
from service.settings import GatewaySettings
from tests.jobs_helper import SAMPLES, queue_for

OWNER = "a" * 64


def submit(connection, settings: GatewaySettings, **fields) -> str:
    """Admit and enqueue a job the way the gateway does."""
    params = InversionParams(prompt="a photo", num_inference_steps=3, **fields)
    rgb = np.asarray(imaging.normalize((SAMPLES / "chelsea.png").read_bytes(), (64, 64)))
    job_id = str(uuid.uuid4())
    queue = queue_for(connection)
    size = limits.JobSize(cost=1, bytes=100_000)
    assert limits.admit(connection, settings, queue, OWNER, job_id, size)
    now = time.time()
    jobs.enqueue(
        connection,
        queue,
        settings,
        params,
        rgb,
        OWNER,
        job_id=job_id,
        also=lambda pipe: limits.confirm(pipe, settings, OWNER, job_id, now),
    )
    return job_id


def held(connection, job_id: str) -> int | None:
    value = connection.hget(owner_held_bytes_key(OWNER), job_id)
    return None if value is None else int(value)


def test_worker_settles_each_ending(redis_client, tiny_model, make_worker):
    settings = GatewaySettings(redis_url="redis://unused", result_ttl_s=3600)
    ok = submit(redis_client, settings, verify=True)
    lost = submit(redis_client, settings)
    canceled = submit(redis_client, settings)
    redis_client.delete(input_key(lost))  # fails: its image is gone
    redis_client.set(cancel_key(canceled), b"1")
    assert int(redis_client.get(owner_held_total_key(OWNER))) == 3 * 100_000

    make_worker(redis_client, tiny_model, max_batch_size=4).work(burst=True)

    statuses = [
        Job.fetch(i, connection=redis_client, serializer=JSONSerializer).get_status()
        for i in (ok, lost, canceled)
    ]
    assert statuses == [JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED]
    stored = redis_client.strlen(result_key(ok))
    stored += redis_client.strlen(reconstruction_key(ok))
    assert held(redis_client, ok) == stored
    assert held(redis_client, lost) is None and held(redis_client, canceled) is None
    assert int(redis_client.get(owner_held_total_key(OWNER))) == stored
    # The result's bytes are held as long as the result is kept, and no longer.
    deadline = redis_client.zscore(owner_held_key(OWNER), ok)
    assert abs(deadline - (time.time() + redis_client.ttl(result_key(ok)))) < 5
    assert redis_client.zscore(owner_held_key(OWNER), lost) is None
    assert redis_client.exists(input_key(canceled)) == 0
