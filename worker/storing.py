"""Writing a batch's results when Redis is away, full, or will not take a value.

Three refusals look alike from redis-py and must not be treated alike:

1. A value over Redis's `proto-max-bulk-len` (512 MB by default; a 1000-step trajectory at
   1536x1536 is 590 MB): Redis answers with a protocol error and closes the connection,
   which redis-py reports as a *lost connection*, not as an error reply. Retrying it is
   retrying forever. So each value is compared with the limit (`ValueLimit`: read once
   from Redis, and again whenever a write is cut off) before it is sent.
2. Out of memory (`maxmemory` under `noeviction`): an error reply to every write, until
   results expire or jobs are deleted. The batch's inputs are freed (DEL is allowed on a
   full Redis), then the write is retried like after an outage.
3. A real outage: the connection is lost. The GPU's work is kept and the write retried
   with backoff, for at most `wait_s`, heartbeating the jobs whenever Redis answers,
   unless the lost reply hid a transaction that went through.

This module decides when to write and what does not fit; how a job that cannot be stored
ends is the caller's (worker.ending).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis import Redis
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import RedisError
from redis.exceptions import ResponseError as RedisResponseError

from ddim_inversion.keys import input_key
from worker.job_state import Running, Success
from worker.lifecycle import already_finished, finish_successes
from worker.outages import AWAY_OR_FULL, LOST, backoff
from worker.rq_adapter import Queue
from worker.rq_worker import BaseWorker

REDIS_MAX_VALUE_BYTES = 512 * 2**20
"""Redis's default `proto-max-bulk-len`, assumed when its CONFIG GET is refused."""

Done = list[tuple[Running, Success]]


def max_value_bytes(connection: Redis) -> int:
    """The largest value Redis takes in one command (`proto-max-bulk-len`)."""
    try:
        reply: Any = connection.config_get("proto-max-bulk-len")
        return int(next(iter(reply.values())))
    except (RedisResponseError, StopIteration, ValueError):
        return REDIS_MAX_VALUE_BYTES  # CONFIG disabled (a managed Redis): its default


class ValueLimit:
    """Redis's largest value, read once, and again after a write was cut off."""

    def __init__(self) -> None:
        self.bytes: int | None = None

    def read(self, connection: Redis, reread: bool = False) -> int | None:
        """The limit; None while it could never be read (an outage: the retry checks)."""
        if self.bytes is None or reread:
            try:
                self.bytes = max_value_bytes(connection)
            except LOST:
                if reread:
                    raise
        return self.bytes


def split_oversize(done: Done, limit: int | None) -> tuple[Done, Done]:
    """(the successes Redis takes, those with a value over `limit`)."""
    if limit is None:
        return done, []
    fits = [(item, success) for item, success in done if success.largest_value() <= limit]
    over = [(item, success) for item, success in done if success.largest_value() > limit]
    return fits, over


def free_inputs(connection: Redis, items: Sequence[Running]) -> None:
    """Delete the inputs of jobs that will not run again: allowed even on a full Redis."""
    with contextlib.suppress(RedisError):
        connection.delete(*[input_key(item.job.id) for item in items])


class StillFull(Exception):
    """Redis was still full when the wait ended; `done`: the successes it refused."""

    def __init__(self, done: Done, cause: RedisOutOfMemoryError) -> None:
        super().__init__(str(cause))
        self.done = done


def store(
    worker: BaseWorker,
    queue: Queue,
    done: Done,
    throughput: str | None,
    *,
    wait_s: float,
    recheck: Callable[[Done], Done],
    keep_alive: Callable[[Sequence[Running]], None],
) -> Done:
    """Write the successes through an outage or a full Redis of up to `wait_s`; what was
    stored. Before each retry, `recheck` keeps those that still fit a limit read again
    (a value over it cut the write off) and `keep_alive` heartbeats the jobs.

    Raises StillFull when Redis is still full after the wait, and any other error reply at
    once; gives the batch up (returns []) when Redis is still away: the lost-job cleanup
    then runs its jobs again.
    """
    deadline = time.monotonic() + wait_s
    waits = backoff()
    retrying = full = False
    while True:
        try:
            if retrying:
                if already_finished(worker.connection, done):
                    return done
                done = recheck(done)
                if not done:
                    return []
                keep_alive([item for item, _ in done])
            finish_successes(worker, queue, done, throughput)
            return done
        except AWAY_OR_FULL as exc:
            out_of_memory = isinstance(exc, RedisOutOfMemoryError)
            if out_of_memory and not full:
                full = True
                free_inputs(worker.connection, [item for item, _ in done])
            if time.monotonic() >= deadline:
                if isinstance(exc, RedisOutOfMemoryError):
                    raise StillFull(done, exc) from exc
                worker.log.error(
                    "Redis unavailable for %g s while storing %d results (%s); giving them "
                    "up: their jobs run again once their executions expire",
                    wait_s,
                    len(done),
                    exc,
                )
                return []
            what = "full" if out_of_memory else "unavailable"
            worker.outages.warn("Redis %s while storing results (%s); waiting", what, exc)
            time.sleep(max(0.0, min(next(waits), deadline - time.monotonic())))
            retrying = True
