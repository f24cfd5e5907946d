"""`Prefer: wait` ends on the worker's job-ended signal, not on a status poll."""

from __future__ import annotations

import asyncio
import threading
import time

import redis
from rq.job import Job

import contract
from service.protocol import BLOCK_SLICE_S, wait_slice, wait_until_ended


def test_the_ended_signal_ends_the_wait_while_the_status_still_says_started(redis_url):
    connection = redis.Redis.from_url(redis_url)
    job_id = "6f1c2a53-3f7e-4f4e-9d7c-6b0c1f2b9a11"
    # The status alone would keep the waiter waiting: only the signal can end it.
    connection.hset(Job.key_for(job_id), "status", "started")
    threading.Timer(0.2, lambda: connection.rpush(contract.ended_key(job_id), "succeeded")).start()

    def read() -> list[bytes]:
        return connection.lrange(contract.ended_key(job_id), 0, -1)

    assert asyncio.run(wait_until_ended(connection, job_id, 5, read)) == (True, [b"succeeded"])
    # Not consumed: a second waiter (another gateway, an event stream) sees it too.
    assert asyncio.run(wait_until_ended(connection, job_id, 5, read)) == (True, [b"succeeded"])
    assert connection.llen(contract.ended_key(job_id)) == 1


def test_without_a_signal_the_wait_gives_up_at_its_limit_and_still_reads(redis_url):
    connection = redis.Redis.from_url(redis_url)
    job_id = "0b6e7c36-8d65-4a43-9a1c-2f4a5d2b7c10"
    connection.hset(Job.key_for(job_id), "status", "started")

    def read() -> bytes | None:
        return connection.hget(Job.key_for(job_id), "status")

    assert asyncio.run(wait_until_ended(connection, job_id, 0.3, read)) == (False, b"started")


def test_a_job_that_ends_without_a_signal_ends_the_wait_at_the_next_slice(redis_url):
    # A lost job is failed by RQ's cleanup, which pushes no signal: the status read before
    # each slice ends the wait, also after a first slice that skipped it (just enqueued).
    connection = redis.Redis.from_url(redis_url)
    job_id = "3c1d7a0e-5b8f-4e2a-9c6d-1f0e2d3c4b5a"
    connection.hset(Job.key_for(job_id), "status", "failed")
    started = time.monotonic()
    deadline = started + 5

    def read() -> str:
        return "read"

    assert wait_slice(connection, job_id, deadline, read, check_status=False) is None
    assert BLOCK_SLICE_S <= time.monotonic() - started < 2 * BLOCK_SLICE_S
    assert wait_slice(connection, job_id, deadline, read) == (True, "read")
    assert asyncio.run(wait_until_ended(connection, job_id, 5, read)) == (True, "read")
    assert time.monotonic() - started < 2 * BLOCK_SLICE_S


def test_a_vanished_job_ends_the_wait_at_once(redis_url):
    connection = redis.Redis.from_url(redis_url)
    started = time.monotonic()
    answer = asyncio.run(wait_until_ended(connection, "no-such-job", 5, lambda: "read"))
    assert answer == (True, "read")
    assert time.monotonic() - started < BLOCK_SLICE_S
