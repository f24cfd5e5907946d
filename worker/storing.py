"""Writing a batch's results when Redis is away, full, or will not take a value.

Three refusals look alike from redis-py and must not be treated alike:

1. A value over Redis's `proto-max-bulk-len` (512 MB by default; a 1000-step trajectory at
   1536x1536 is 590 MB): Redis answers with a protocol error and closes the connection,
   which redis-py reports as a *lost connection*, not as an error reply. Retrying it is
   retrying forever. So each value is compared with the limit (read once from Redis, and
   again whenever a write is cut off) before it is sent.
2. Out of memory (`maxmemory` under `noeviction`): an error reply to every write, until
   results expire or jobs are deleted. The batch's inputs are freed (DEL is allowed on a
   full Redis), then the write is retried like after an outage.
3. A real outage: the connection is lost. The GPU's work is kept and the write retried
   with backoff, for at most `redis_outage_wait_s`, heartbeating the jobs whenever Redis
   answers, unless the lost reply hid a transaction that went through.

Warnings about a Redis outage are rate-limited (`OutageLog`): a batch polls Redis at every
step, and an outage must not turn into thousands of log lines.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import RedisError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue

from ddim_inversion.keys import input_key
from worker.lifecycle import Success, already_finished, finish_successes

if TYPE_CHECKING:
    from worker.batching import InversionWorker, Running

REDIS_MAX_VALUE_BYTES = 512 * 2**20
"""Redis's default `proto-max-bulk-len`, assumed when its CONFIG GET is refused."""

OUTAGE_LOG_EVERY_S = 10.0
"""Least interval between two warnings about Redis being away (the others are counted)."""

RETRY_FIRST_S = 0.2
"""First wait before writing results again; doubled each time..."""

RETRY_MAX_S = 5.0
"""...up to this."""

LOST = (RedisConnectionError, RedisTimeoutError)
"""What redis-py raises when the connection is lost (or was never made)."""


class OutageLog:
    """Warnings about Redis being away, at most one per OUTAGE_LOG_EVERY_S."""

    def __init__(self, log: logging.Logger | logging.LoggerAdapter) -> None:
        self.log = log
        self.last = -float("inf")
        self.skipped = 0

    def warn(self, message: str, *args: object) -> None:
        moment = time.monotonic()
        if moment - self.last < OUTAGE_LOG_EVERY_S:
            self.skipped += 1
            return
        if self.skipped:
            message += f" ({self.skipped} more like it not logged)"
        self.log.warning(message, *args)
        self.last = moment
        self.skipped = 0


def max_value_bytes(connection: Redis) -> int:
    """The largest value Redis takes in one command (`proto-max-bulk-len`)."""
    try:
        reply: Any = connection.config_get("proto-max-bulk-len")
        return int(next(iter(reply.values())))
    except (RedisResponseError, StopIteration, ValueError):
        return REDIS_MAX_VALUE_BYTES  # CONFIG disabled (a managed Redis): its default


def largest_value(success: Success) -> int:
    """The largest value the success writes: its result, or its reconstruction."""
    return max(len(success.result), len(success.reconstruction_png or b""))


def free_inputs(connection: Redis, items: Sequence[Running]) -> None:
    """Delete the inputs of jobs that will not run again: allowed even on a full Redis."""
    with contextlib.suppress(RedisError):
        connection.delete(*[input_key(item.job.id) for item in items])


def store(
    worker: InversionWorker,
    queue: Queue,
    done: list[tuple[Running, Success]],
    throughput: str | None,
) -> list[tuple[Running, Success]]:
    """Write the successes through an outage or a full Redis of up to `redis_outage_wait_s`;
    what was stored. A value over the limit (found after a cut-off write) fails its job.

    Raises RedisOutOfMemoryError when Redis is still full after the wait, and any other
    error reply at once; gives the batch up (returns []) when Redis is still away: the
    lost-job cleanup then runs its jobs again.
    """
    deadline = time.monotonic() + worker.settings.redis_outage_wait_s
    delay = RETRY_FIRST_S
    retrying = full = False
    while True:
        try:
            if retrying:
                if already_finished(worker, done):
                    return done
                # A limit lowered since it was read: the cut-off write was not an outage.
                done = worker.drop_oversize(queue, done, reread=True)
                if not done:
                    return []
                worker.keep_alive([item for item, _ in done])
            finish_successes(worker, queue, done, throughput)
            return done
        except (*LOST, RedisOutOfMemoryError) as exc:
            out_of_memory = isinstance(exc, RedisOutOfMemoryError)
            if out_of_memory and not full:
                full = True
                free_inputs(worker.connection, [item for item, _ in done])
            if time.monotonic() >= deadline:
                if out_of_memory:
                    raise
                worker.log.error(
                    "Redis unavailable for %g s while storing %d results (%s); giving them "
                    "up: their jobs run again once their executions expire",
                    worker.settings.redis_outage_wait_s,
                    len(done),
                    exc,
                )
                return []
            what = "full" if out_of_memory else "unavailable"
            worker.outages.warn("Redis %s while storing results (%s); waiting", what, exc)
            time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 2, RETRY_MAX_S)
            retrying = True
