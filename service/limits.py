"""Admission: the per-key rate, and every limit a job is admitted against, atomically.

All state lives in Redis (contract.py's per-key keys), so every gateway replica enforces
the same limits:

- the rate: a fixed-window counter per key and clock minute (INCR + EXPIRE), counted for
  every submission, replays of an Idempotency-Key included;
- admission, one Lua script: the global queue depth (queued jobs and admissions not yet
  enqueued), and per key the jobs queued or running, their summed GPU cost and estimated
  GPU seconds (service/quotas.py; 0 before the model's workers measured their speed), and
  the bytes its jobs hold in Redis. It refuses or reserves all at once, so that concurrent
  submissions cannot together pass a limit that each passes alone;
- the transaction that enqueues the job confirms the admission (`confirm`); a submission
  refused after its admission gives it back (`release`). One whose enqueue reply was lost
  gives nothing back: the enqueue may have happened, and what it reserved otherwise lapses
  by itself within ADMISSION_GRACE_S.

A key's jobs (their count, cost and GPU seconds) are counted until RQ no longer has them
queued or running (read from their job hashes at the key's next admission, or key_usage);
a deleted job is forgotten at once (`forget`); their bytes until they are settled by the worker
or the gateway (settle_held_bytes) or the deadline held for them passes. The
anonymous owner (auth disabled) is not limited per key; the global queue depth still is.

The script reads the RQ job hashes of a key's jobs by name, beside the keys it is given:
a standalone Redis (as RQ itself needs), not a cluster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from ddim_inversion.errors import ErrorCode
from ddim_inversion.held_bytes import settle_held_bytes
from ddim_inversion.keys import (
    ADMITTING_KEY,
    owner_gpu_ms_key,
    owner_held_bytes_key,
    owner_held_key,
    owner_held_total_key,
    owner_jobs_key,
    rate_key,
)
from service import rq_adapter
from service.errors import RETRY_AFTER_S, ProblemError
from service.settings import GatewaySettings

WINDOW_S = 60

ADMISSION_GRACE_S = 60
"""How long an admission may wait for its enqueue: one whose request was lost (a gateway
killed, a reply lost with a transaction that never ran) lapses after this."""

LIVE_JOBS_LUA = """
-- The owner's jobs still queued or running (by their RQ job hash; one without a hash yet
-- while it is being admitted): their count, summed cost and GPU ms. Ended ones are
-- forgotten here, which gives their cost and GPU ms back.
local function live_jobs(jobs, gpu_ms, admitting, prefix, field, first_status)
  local active = {}
  for i = first_status, #ARGV do active[ARGV[i]] = true end
  local count, cost, gpu = 0, 0, 0
  local entries = redis.call('HGETALL', jobs)
  for i = 1, #entries, 2 do
    local id = entries[i]
    local status = redis.call('HGET', prefix .. id, field)
    local live
    if status then
      live = active[status] == true
    else
      live = redis.call('ZSCORE', admitting, id) ~= false
    end
    if live then
      count = count + 1
      cost = cost + tonumber(entries[i + 1])
      gpu = gpu + tonumber(redis.call('HGET', gpu_ms, id) or '0')
    else
      redis.call('HDEL', jobs, id)
      redis.call('HDEL', gpu_ms, id)
    end
  end
  return count, cost, gpu
end
"""

USAGE_LUA = (
    LIVE_JOBS_LUA
    + """
-- KEYS: owner jobs, owner GPU ms, admitting. ARGV: RQ's job key prefix and status field,
-- then RQ's active statuses.
local count, cost, gpu = live_jobs(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], 3)
return {count, cost, gpu}
"""
)

ADMIT_LUA = (
    LIVE_JOBS_LUA
    + """
-- KEYS: queue, admitting, owner jobs, held, held bytes, held total, owner GPU ms.
-- ARGV: job, now, grace, per-key ('1'), max depth, max jobs, max cost, max bytes,
--       job cost, job bytes, key ttl, RQ's job key prefix and status field, max GPU ms,
--       job GPU ms, then RQ's active statuses (prefix, field and statuses from
--       service/rq_adapter.py).
local job, now, grace = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local per_key = ARGV[4] == '1'
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - grace)
local reserved
if per_key then
  reserved = redis.call('HEXISTS', KEYS[3], job) == 1
else
  reserved = redis.call('ZSCORE', KEYS[2], job) ~= false
end
if reserved then
  -- The same job again (its Idempotency-Key retried): counted once, its wait renewed.
  redis.call('ZADD', KEYS[2], 'XX', now, job)
  local deadline = redis.call('ZSCORE', KEYS[4], job)
  if deadline and tonumber(deadline) < now + grace then
    redis.call('ZADD', KEYS[4], now + grace, job)
  end
  return {'ok', 0}
end
local depth = redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
if depth >= tonumber(ARGV[5]) then return {'queue_full', depth} end
if per_key then
  local count, cost, gpu = live_jobs(KEYS[3], KEYS[7], KEYS[2], ARGV[12], ARGV[13], 16)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
  for _, id in ipairs(gone) do
    local bytes = redis.call('HGET', KEYS[5], id)
    if bytes then
      redis.call('HDEL', KEYS[5], id)
      redis.call('DECRBY', KEYS[6], bytes)
    end
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now) end
  local held = tonumber(redis.call('GET', KEYS[6]) or '0')
  if count >= tonumber(ARGV[6]) then return {'jobs', count} end
  if cost + tonumber(ARGV[9]) > tonumber(ARGV[7]) then return {'cost', cost} end
  if held + tonumber(ARGV[10]) > tonumber(ARGV[8]) then return {'bytes', held} end
  if gpu + tonumber(ARGV[15]) > tonumber(ARGV[14]) then return {'gpu', gpu} end
  redis.call('HSET', KEYS[3], job, ARGV[9])
  redis.call('HSET', KEYS[7], job, ARGV[15])
  redis.call('ZADD', KEYS[4], now + grace, job)
  redis.call('HSET', KEYS[5], job, ARGV[10])
  redis.call('INCRBY', KEYS[6], ARGV[10])
  for k = 3, 7 do redis.call('EXPIRE', KEYS[k], ARGV[11]) end
end
redis.call('ZADD', KEYS[2], now, job)
return {'ok', 1}
"""
)


@dataclass(frozen=True)
class JobSize:
    """What a job is admitted against: its GPU cost, the bytes it may keep in Redis and its
    estimated GPU milliseconds (0 while no worker of its model has measured its speed)."""

    cost: int
    bytes: int
    gpu_ms: int = 0


def count_submission(
    connection: redis.Redis, settings: GatewaySettings, owner: str, now: float | None = None
) -> None:
    """Count this submission in the owner's current minute; 429 once over the limit."""
    if not owner:
        return
    now = time.time() if now is None else now
    window = int(now // WINDOW_S)
    key = rate_key(owner, window)
    pipe = connection.pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, WINDOW_S + 5)
    count, _ = pipe.execute()
    limit = settings.rate_limit_per_minute
    if int(count) > limit:
        retry_after = max(1, int((window + 1) * WINDOW_S - now + 0.999))
        raise ProblemError(
            429,
            ErrorCode.RATE_LIMITED,
            f"more than {limit} submissions this minute with this API key",
            headers={"Retry-After": str(retry_after)},
        )


@dataclass(frozen=True)
class KeyUsage:
    """What one key has in flight (queued or running): jobs, summed cost, estimated GPU ms."""

    jobs: int
    cost: int
    gpu_ms: int


def key_usage(connection: redis.Redis, owner: str) -> KeyUsage:
    """The owner's jobs in flight now, as admission counts them (ended ones forgotten)."""
    keys = [owner_jobs_key(owner), owner_gpu_ms_key(owner), ADMITTING_KEY]
    args = [rq_adapter.JOB_KEY_PREFIX, rq_adapter.STATUS_FIELD, *rq_adapter.ACTIVE_STATUSES]
    jobs, cost, gpu_ms = connection.eval(USAGE_LUA, len(keys), *keys, *args)  # type: ignore[misc]
    return KeyUsage(int(jobs), int(cost), int(gpu_ms))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def admit(
    connection: redis.Redis,
    settings: GatewaySettings,
    queue: rq_adapter.Queue,
    owner: str,
    job_id: str,
    size: JobSize,
    now: float | None = None,
) -> bool:
    """Reserve the job's place under every limit, or raise the 429 of the first it passes.

    True when this call made the reservation (`release` it if the job is not enqueued);
    False when the job was already admitted (a retry of the same Idempotency-Key).
    """
    now = time.time() if now is None else now
    keys = [
        rq_adapter.queue_key(queue),
        ADMITTING_KEY,
        owner_jobs_key(owner),
        owner_held_key(owner),
        owner_held_bytes_key(owner),
        owner_held_total_key(owner),
        owner_gpu_ms_key(owner),
    ]
    args = [
        job_id,
        repr(now),
        ADMISSION_GRACE_S,
        "1" if owner else "0",
        settings.max_queue_depth,
        settings.max_queued_per_key,
        settings.max_queued_cost_per_key,
        settings.max_held_bytes_per_key,
        size.cost,
        size.bytes,
        settings.input_ttl_s + settings.failure_ttl_s,
        rq_adapter.JOB_KEY_PREFIX,
        rq_adapter.STATUS_FIELD,
        int(settings.max_gpu_seconds_per_key * 1000),
        size.gpu_ms,
        *rq_adapter.ACTIVE_STATUSES,
    ]
    verdict, value = connection.eval(ADMIT_LUA, len(keys), *keys, *args)  # type: ignore[misc]
    verdict, value = _text(verdict), int(value)
    if verdict == "ok":
        return bool(value)
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    if verdict == "queue_full":
        raise ProblemError(
            429,
            ErrorCode.QUEUE_FULL,
            f"{value} jobs are waiting; the limit is {settings.max_queue_depth}",
            headers=retry,
        )
    if verdict == "jobs":
        raise ProblemError(
            429,
            ErrorCode.RATE_LIMITED,
            f"{value} jobs of this API key are queued or running; the limit is "
            f"{settings.max_queued_per_key}",
            headers=retry,
        )
    if verdict == "cost":
        raise ProblemError(
            429,
            ErrorCode.QUOTA_EXCEEDED,
            f"this API key's queued and running jobs cost {value}; this job's {size.cost} "
            f"would pass the key's limit of {settings.max_queued_cost_per_key} "
            "(INVERSION_MAX_QUEUED_COST_PER_KEY); wait for them to finish",
            headers=retry,
        )
    if verdict == "gpu":
        raise ProblemError(
            429,
            ErrorCode.QUOTA_EXCEEDED,
            f"this API key's queued and running jobs would run about {value / 1000:.1f} GPU "
            f"seconds; this job's {size.gpu_ms / 1000:.1f} would pass the key's limit of "
            f"{settings.max_gpu_seconds_per_key:g} (INVERSION_MAX_GPU_SECONDS_PER_KEY); wait "
            "for them to finish",
            headers=retry,
        )
    raise ProblemError(
        429,
        ErrorCode.QUOTA_EXCEEDED,
        f"this API key's jobs hold {value} bytes in the job store; this job's {size.bytes} "
        f"would pass the key's limit of {settings.max_held_bytes_per_key} "
        "(INVERSION_MAX_HELD_BYTES_PER_KEY); delete results you have downloaded, or wait "
        "for them to expire",
        headers=retry,
    )


def confirm(pipe: Any, settings: GatewaySettings, owner: str, job_id: str, now: float) -> None:
    """Queued on the transaction that enqueues the job: its admission is complete, and its
    input's bytes are held for as long as the input is kept."""
    pipe.zrem(ADMITTING_KEY, job_id)
    if owner:
        pipe.zadd(owner_held_key(owner), {job_id: now + settings.input_ttl_s}, xx=True)


def release(connection: redis.Redis, owner: str, job_id: str) -> None:
    """Give back an admission whose job was not enqueued; only deletes (a full Redis takes
    them), in one round trip without MULTI (which a full Redis refuses whole)."""
    pipe = connection.pipeline(transaction=False)
    pipe.zrem(ADMITTING_KEY, job_id)
    forget(pipe, owner, job_id)
    pipe.execute()


def forget(client: Any, owner: str, job_id: str) -> None:
    """A job that is gone (deleted, or never enqueued) no longer counts against its key."""
    client.hdel(owner_jobs_key(owner), job_id)
    client.hdel(owner_gpu_ms_key(owner), job_id)
    settle_held_bytes(client, owner, job_id)
