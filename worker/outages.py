"""Redis away or full, as the worker sees it: what counts as an outage, and its warnings.

A batch polls Redis at every step (progress, cancel flags, heartbeats); through an outage
the GPU keeps working, and every failed poll would be a log line. So warnings are
rate-limited (`OutageLog`), and the polls that may fail are run `tolerated`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError

LOST = (RedisConnectionError, RedisTimeoutError)
"""What redis-py raises when the connection is lost (or was never made)."""

AWAY_OR_FULL = (*LOST, RedisOutOfMemoryError)
"""LOST, or a full Redis (`maxmemory` under `noeviction`), which refuses even a dequeue."""

OUTAGE_LOG_EVERY_S = 10.0
"""Least interval between two warnings about Redis being away (the others are counted)."""

RETRY_FIRST_S = 0.2
"""First wait before trying Redis again; doubled each time..."""

RETRY_MAX_S = 5.0
"""...up to this."""


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


@contextlib.contextmanager
def tolerated(outages: OutageLog) -> Iterator[None]:
    """Best effort: a lost connection inside is warned about (rate-limited) and swallowed."""
    try:
        yield
    except LOST as exc:
        outages.warn("Redis unavailable during a batch (%s); continuing", exc)


def backoff() -> Iterator[float]:
    """The waits between tries: RETRY_FIRST_S, doubled each time up to RETRY_MAX_S."""
    delay = RETRY_FIRST_S
    while True:
        yield delay
        delay = min(delay * 2, RETRY_MAX_S)
