"""Per-API-key back-pressure: jobs in flight per key and submissions per key per minute.

Both live in Redis, so every gateway replica enforces the same limits:

- `inversion:owner:{hash}:active`, a set of the owner's job ids that the gateway adds at
  submit; members whose RQ status is no longer queued or running are pruned lazily, at
  the owner's next submission.
- `inversion:owner:{hash}:rate:{minute}`, a fixed-window counter (INCR + EXPIRE).

The anonymous owner (auth disabled) is not limited per key; the global queue depth still is.
"""

from __future__ import annotations

import time

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


def check_rate(connection: redis.Redis, owner: str, limit: int, now: float | None = None) -> None:
    """Count this submission in the owner's current minute; 429 once over `limit`."""
    now = time.time() if now is None else now
    window = int(now // WINDOW_S)
    key = rate_key(owner, window)
    pipe = connection.pipeline(transaction=True)
    pipe.incr(key)
    pipe.expire(key, WINDOW_S + 5)
    count, _ = pipe.execute()
    if int(count) > limit:
        retry_after = max(1, int((window + 1) * WINDOW_S - now + 0.999))
        raise ProblemError(
            429,
            ErrorCode.RATE_LIMITED,
            f"more than {limit} submissions this minute with this API key",
            headers={"Retry-After": str(retry_after)},
        )


def active_jobs(connection: redis.Redis, owner: str) -> int:
    """The owner's jobs still queued or running; finished or expired ones are pruned."""
    key = active_key(owner)
    members = list(connection.smembers(key))  # type: ignore[arg-type]
    if not members:
        return 0
    pipe = connection.pipeline(transaction=False)
    for member in members:
        job_id = member.decode() if isinstance(member, bytes) else str(member)
        pipe.hget(Job.key_for(job_id), "status")
    statuses = pipe.execute()
    done = [
        m for m, status in zip(members, statuses, strict=True) if status not in ACTIVE_RQ_STATUSES
    ]
    if done:
        connection.srem(key, *done)
    return len(members) - len(done)


def check_active(connection: redis.Redis, owner: str, limit: int) -> None:
    """429 when the owner already has `limit` jobs queued or running."""
    active = active_jobs(connection, owner)
    if active >= limit:
        raise ProblemError(
            429,
            ErrorCode.RATE_LIMITED,
            f"{active} jobs of this API key are queued or running; the limit is {limit}",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )


def check_submission(connection: redis.Redis, settings: GatewaySettings, owner: str) -> None:
    """Both per-key limits, before anything is stored; nothing for the anonymous owner."""
    if not owner:
        return
    check_rate(connection, owner, settings.rate_limit_per_minute)
    check_active(connection, owner, settings.max_queued_per_key)


def record_submission(
    connection: redis.Redis, settings: GatewaySettings, owner: str, job_id: str
) -> None:
    """Remember the owner's new job; the set expires once its jobs could no longer be kept."""
    if not owner:
        return
    key = active_key(owner)
    pipe = connection.pipeline(transaction=True)
    pipe.sadd(key, job_id)
    pipe.expire(key, settings.job_timeout_s + settings.result_ttl_s + settings.failure_ttl_s)
    pipe.execute()
