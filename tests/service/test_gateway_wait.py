"""`Prefer: wait` ends on the worker's job-ended signal, not on a status poll."""

from __future__ import annotations

import asyncio
import threading

import redis
from rq.job import Job

import contract
from service.protocol import wait_until_ended


def test_the_ended_signal_ends_the_wait_while_the_status_still_says_started(redis_url):
    connection = redis.Redis.from_url(redis_url)
    job_id = "6f1c2a53-3f7e-4f4e-9d7c-6b0c1f2b9a11"
    # The status alone would keep the waiter waiting: only the signal can end it.
    connection.hset(Job.key_for(job_id), "status", "started")
    threading.Timer(0.2, lambda: connection.rpush(contract.ended_key(job_id), "succeeded")).start()
    assert asyncio.run(wait_until_ended(connection, job_id, 5)) is True
    # Not consumed: a second waiter (another gateway, an event stream) sees it too.
    assert asyncio.run(wait_until_ended(connection, job_id, 5)) is True
    assert connection.llen(contract.ended_key(job_id)) == 1


def test_without_a_signal_the_wait_gives_up_at_its_limit(redis_url):
    connection = redis.Redis.from_url(redis_url)
    job_id = "0b6e7c36-8d65-4a43-9a1c-2f4a5d2b7c10"
    connection.hset(Job.key_for(job_id), "status", "started")
    assert asyncio.run(wait_until_ended(connection, job_id, 0.3)) is False
