"""The worker announces each job's progress and end on the job-events channel, after
writing them: what every gateway's waits and streams wake on (service/listener.py)."""

from __future__ import annotations

import time

import httpx
import pytest
import redis
from rq.job import Job

from ddim_inversion.keys import JOB_EVENTS_CHANNEL
from tests.conftest import EVENT_GUARD_S, SAMPLES

pytestmark = pytest.mark.e2e

TERMINAL_RQ = {b"finished", b"failed", b"canceled", b"stopped"}


def test_the_worker_announces_progress_then_the_end_after_writing_it(shared_service):
    connection = redis.Redis.from_url(shared_service.env["INVERSION_REDIS_URL"])
    pubsub = connection.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(JOB_EVENTS_CHANNEL)
    with (SAMPLES / "chelsea.png").open("rb") as image:
        job = httpx.post(
            shared_service.url + "/v1/inversions",
            data={"prompt": "a photo of a cat", "num_inference_steps": "300"},
            files={"image": ("chelsea.png", image, "image/png")},
            timeout=EVENT_GUARD_S,
        ).json()["id"]
    # What a woken gateway reads: the job's status, right when each message arrives.
    seen: list[bytes] = []
    give_up = time.monotonic() + EVENT_GUARD_S
    while not (seen and seen[-1] in TERMINAL_RQ) and time.monotonic() < give_up:
        message = pubsub.get_message(timeout=1.0)
        if message is not None and message["data"] == job.encode():
            seen.append(connection.hget(Job.key_for(job), "status"))
    pubsub.close()
    assert seen[-1] == b"finished"
    assert seen.count(b"started") >= 2  # progress, announced step after step
