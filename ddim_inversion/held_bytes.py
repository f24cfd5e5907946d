"""The bytes each API key holds in Redis, settled by whoever changes them: the worker when
it stores a result or ends a job otherwise, the gateway when it cancels or deletes one."""

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
