"""Per-API-key back-pressure: jobs in flight per key and submissions per key per minute.

Both live in Redis, so every gateway replica enforces the same limits:

- `inversion:owner:{hash}:active`, a set of the owner's job ids that the gateway adds at
  submit; members whose RQ status is no longer queued or running are pruned lazily, at
  the owner's next accepted submission (in the transaction that enqueues it).
- `inversion:owner:{hash}:rate:{minute}`, a fixed-window counter (INCR + EXPIRE).

The anonymous owner (auth disabled) is not limited per key; the global queue depth still is.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from rq.job import Job
from rq.job import JobStatus as RQStatus

from contract import ErrorCode
from service.errors import RETRY_AFTER_S, ProblemError
from service.settings import GatewaySettings

WINDOW_S = 60

ACTIVE_RQ_STATUSES = frozenset(
    s.value.encode()
    for s in (
        RQStatus.CREATED,
        RQStatus.QUEUED,
        RQStatus.DEFERRED,
        RQStatus.SCHEDULED,
        RQStatus.READY_TO_ENQUEUE,
        RQStatus.RATE_LIMITED,
        RQStatus.STARTED,
    )
)
"""RQ statuses of a job still waiting or running; a deleted or expired job has none."""


def active_key(owner: str) -> str:
    return f"inversion:owner:{owner}:active"


def rate_key(owner: str, window: int) -> str:
    return f"inversion:owner:{owner}:rate:{window}"


def _count_submission(pipe: Any, owner: str, now: float) -> int:
    """Queue the INCR (and EXPIRE) of the owner's current minute; returns the window."""
    window = int(now // WINDOW_S)
    key = rate_key(owner, window)
    pipe.incr(key)
    pipe.expire(key, WINDOW_S + 5)
    return window


def _refuse_over_rate(count: int, limit: int, window: int, now: float) -> None:
    if count > limit:
        retry_after = max(1, int((window + 1) * WINDOW_S - now + 0.999))
        raise ProblemError(
            429,
            ErrorCode.RATE_LIMITED,
            f"more than {limit} submissions this minute with this API key",
            headers={"Retry-After": str(retry_after)},
        )


def _ended(connection: redis.Redis, members: list[Any]) -> list[Any]:
    """The owner's recorded jobs no longer queued or running (ended, deleted or expired)."""
    if not members:
        return []
    pipe = connection.pipeline(transaction=False)
    for member in members:
        job_id = member.decode() if isinstance(member, bytes) else str(member)
        pipe.hget(Job.key_for(job_id), "status")
    statuses = pipe.execute()
    return [
        m for m, status in zip(members, statuses, strict=True) if status not in ACTIVE_RQ_STATUSES
    ]


def _refuse_over_active(active: int, limit: int) -> None:
    if active >= limit:
        raise ProblemError(
            429,
            ErrorCode.RATE_LIMITED,
            f"{active} jobs of this API key are queued or running; the limit is {limit}",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )


def check_submission(
    connection: redis.Redis, settings: GatewaySettings, owner: str, now: float | None = None
) -> list[Any]:
    """Both per-key limits, before anything is stored; nothing for the anonymous owner.

    Counts this submission in the owner's current minute (429 once over the limit), then
    counts the owner's jobs still queued or running (429 at the limit). The minute's count
    and the owner's recorded jobs are read in one round trip. Returns the recorded jobs
    that have ended, for `record_submission` to prune.
    """
    if not owner:
        return []
    now = time.time() if now is None else now
    pipe = connection.pipeline(transaction=True)
    window = _count_submission(pipe, owner, now)
    pipe.smembers(active_key(owner))
    count, _, members = pipe.execute()
    _refuse_over_rate(int(count), settings.rate_limit_per_minute, window, now)
    ended = _ended(connection, list(members))
    _refuse_over_active(len(members) - len(ended), settings.max_queued_per_key)
    return ended


def record_submission(
    pipe: Any, settings: GatewaySettings, owner: str, job_id: str, ended: list[Any]
) -> None:
    """Remember the owner's new job and forget its `ended` ones, queued on the transaction
    that enqueues the job (a queued job is always counted); the set expires once its jobs
    could no longer be kept."""
    if not owner:
        return
    key = active_key(owner)
    if ended:
        pipe.srem(key, *ended)
    pipe.sadd(key, job_id)
    pipe.expire(key, settings.job_timeout_s + settings.result_ttl_s + settings.failure_ttl_s)
