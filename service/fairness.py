"""Fair order between API keys, kept in the one RQ queue list at enqueue time.

Workers take jobs from the head of the queue (RQ's dequeue, then the batch gathering of
worker/batching.py), so the order of the list is the order jobs start. Each job gets a
round: an owner's jobs take consecutive rounds, never below the round of the job at the
head (or, in an empty queue, the highest round given so far), and the list is kept sorted
by round, ties in arrival order. A key that queues 20 jobs takes rounds r..r+19; another
key submitting then gets round r and runs right after the head: round-robin between keys,
with no credit banked by a key that was idle.

The queue stays one plain RQ list, so `rq info`, rq-dashboard and a list-length autoscaler
see it as before, and the worker needs no change. The script runs inside the transaction
that enqueues the job, right after RQ's RPUSH, and moves the job from the tail to its
place with LINSERT (a binary search over the rounds, O(log n) reads). Rounds of jobs that
left the queue are dropped once below the head's. A job RQ queues itself (a retry after
a lost worker) has no round and counts as round 0.
"""

from __future__ import annotations

from typing import Any

from ddim_inversion.keys import fair_owners_key, fair_rounds_key

PLACE_LUA = """
-- KEYS: queue, rounds, owners. ARGV: job (RQ has just pushed it to the tail), owner, ttl.
local job, owner = ARGV[1], ARGV[2]
local function round_of(id)
  local score = redis.call('ZSCORE', KEYS[2], id)
  if score then return tonumber(score) end
  return 0
end
local n = redis.call('LLEN', KEYS[1])
local floor
if n > 1 then
  floor = round_of(redis.call('LINDEX', KEYS[1], 0))
else
  local top = redis.call('ZREVRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  floor = top[2] and tonumber(top[2]) or 0
end
local last = redis.call('HGET', KEYS[3], owner)
local round = floor
if last and tonumber(last) + 1 > round then round = tonumber(last) + 1 end
if n > 1 and redis.call('LINDEX', KEYS[1], -1) == job then
  -- The last queued job of round <= this one's: index lo, with round_of(lo) <= round and
  -- round_of(hi) > round (hi = n - 1, the job itself, counts as above).
  local lo, hi = 0, n - 1
  while hi - lo > 1 do
    local mid = math.floor((lo + hi) / 2)
    if round_of(redis.call('LINDEX', KEYS[1], mid)) <= round then lo = mid else hi = mid end
  end
  if lo < n - 2 then
    redis.call('RPOP', KEYS[1])
    redis.call('LINSERT', KEYS[1], 'AFTER', redis.call('LINDEX', KEYS[1], lo), job)
  end
end
redis.call('ZADD', KEYS[2], round, job)
redis.call('HSET', KEYS[3], owner, round)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. floor)
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return round
"""


def place(pipe: Any, queue_key: str, queue_name: str, job_id: str, owner: str, ttl_s: int) -> None:
    """Queued on the enqueue transaction after RQ's push: move the job to its fair place."""
    pipe.eval(
        PLACE_LUA,
        3,
        queue_key,
        fair_rounds_key(queue_name),
        fair_owners_key(queue_name),
        job_id,
        owner,
        ttl_s,
    )
