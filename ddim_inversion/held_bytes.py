"""The bytes each API key holds in Redis, settled by whoever changes them: the worker when
it stores a result or ends a job otherwise, the gateway when it cancels or deletes one.

Beside its jobs' inputs and results, a key holds its Idempotency-Key records (kept as
long as a result): each counts under the member `idem:<key>` (`hold_record`) until it
expires or the job it names is deleted with it."""

from __future__ import annotations

import math
import time
from typing import Any

from ddim_inversion.keys import (
    input_key,
    owner_held_bytes_key,
    owner_held_key,
    owner_held_total_key,
)

SETTLE_HELD_LUA = """
-- KEYS: held, held bytes, held total, the job's input. ARGV: job, bytes kept, deadline, ttl.
-- Deleting comes first: a full Redis (noeviction) refuses a script whose first write may
-- need memory, and accepts what follows a delete.
local old = redis.call('HGET', KEYS[2], ARGV[1])
if ARGV[2] == '0' then
  redis.call('DEL', KEYS[4])
  if old then
    redis.call('HDEL', KEYS[2], ARGV[1])
    redis.call('ZREM', KEYS[1], ARGV[1])
    redis.call('DECRBY', KEYS[3], old)
  end
  return 0
end
if not old then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - tonumber(old))
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
if ARGV[4] ~= '' then
  for i = 1, 3 do
    if redis.call('TTL', KEYS[i]) < tonumber(ARGV[4]) then
      redis.call('EXPIRE', KEYS[i], ARGV[4])
    end
  end
end
return 1
"""


def settle_held_bytes(
    client: Any, owner: str, job_id: str, kept_bytes: int = 0, keep_s: float | None = 0
) -> None:
    """Record what a job now holds against its owner's byte budget, on `client` (a Redis
    client or a pipeline, where it is queued).

    `kept_bytes` > 0: the job keeps that many bytes (its result) for `keep_s` more seconds
    (None: without expiry). 0: its bytes are gone: its input is deleted (if still there) and
    its share released; this much works on a Redis that is out of memory.
    """
    if kept_bytes <= 0:
        kept_bytes, deadline, ttl = 0, "0", ""
    elif keep_s is None:
        deadline, ttl = "+inf", ""
    else:
        deadline, ttl = repr(time.time() + keep_s), str(math.ceil(keep_s) + 60)
    client.eval(
        SETTLE_HELD_LUA,
        4,
        owner_held_key(owner),
        owner_held_bytes_key(owner),
        owner_held_total_key(owner),
        input_key(job_id),
        job_id,
        str(kept_bytes),
        deadline,
        ttl,
    )


KEY_OVERHEAD_BYTES = 160
"""Redis's own bytes per key beside its name and contents (dict entry, object headers,
expiry entry), rounded up from MEMORY USAGE on Redis 7.0: a 200-character
Idempotency-Key's record 106 beyond its name and value, a one-element list 156."""

HASH_FIELD_OVERHEAD_BYTES = 64
"""Redis's own bytes per field of a hash with long values (hashtable-encoded, as an RQ
job's is): about 60 by MEMORY USAGE on Redis 7.0."""

HOLD_LUA = """
-- KEYS: held, held bytes, held total. ARGV: member, bytes (0: release), deadline, ttl.
local old = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if ARGV[2] == '0' then
  if old > 0 then
    redis.call('HDEL', KEYS[2], ARGV[1])
    redis.call('ZREM', KEYS[1], ARGV[1])
    redis.call('DECRBY', KEYS[3], old)
  end
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - old)
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
for i = 1, 3 do
  if redis.call('TTL', KEYS[i]) < tonumber(ARGV[4]) then
    redis.call('EXPIRE', KEYS[i], ARGV[4])
  end
end
return 1
"""


def record_member(key: str) -> str:
    """The held-bytes member of an owner's Idempotency-Key record (jobs' are their ids)."""
    return f"idem:{key}"


def record_bytes(name: str, value: str) -> int:
    """What a small string key of `name` holding `value` costs Redis."""
    return len(name.encode()) + len(value.encode()) + KEY_OVERHEAD_BYTES


def hash_bytes(connection: Any, name: str) -> int:
    """What a hash costs Redis: its name, its fields and values, and a key's overhead
    (0 when it does not exist)."""
    fields = connection.hgetall(name)
    if not fields:
        return 0
    data = sum(len(k) + len(v) + HASH_FIELD_OVERHEAD_BYTES for k, v in fields.items())
    return len(name.encode()) + data + KEY_OVERHEAD_BYTES


def hold_record(client: Any, owner: str, member: str, size: int, keep_s: float) -> None:
    """Count `size` bytes under `member` against the owner's byte budget for `keep_s`
    seconds (size 0: no longer). On `client`, a Redis client or a pipeline."""
    deadline = repr(time.time() + keep_s) if size > 0 else "0"
    client.eval(
        HOLD_LUA,
        3,
        owner_held_key(owner),
        owner_held_bytes_key(owner),
        owner_held_total_key(owner),
        member,
        str(max(size, 0)),
        deadline,
        str(math.ceil(keep_s) + 60),
    )
