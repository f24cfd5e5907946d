"""HTTP protocol features around a job: Idempotency-Key, `Prefer: wait=N` and the SSE stream.

- Idempotency: `inversion:idem:{owner}:{key}` -> {"payload_hash", "job_id"}, written with
  SET NX before the job is enqueued, expiring with the result TTL. Every request with the
  key enqueues that one job id, exclusively, so concurrent ones, and a retry after a lost
  reply, make one job. The same key with another payload is a 422.
- `Prefer: wait=N` (RFC 7240): the submission waits up to N seconds for the job to end.
- Events: `GET /v1/inversions/{id}/events` streams `status`, `progress` and `end` events.

Waiting and streaming poll Redis from async code, each read in the threadpool, so that no
event loop blocks and no thread is held between polls.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import redis
from pydantic import BaseModel
from rq.job import Job
from starlette.concurrency import run_in_threadpool

import contract
from contract import ErrorCode
from service.errors import ProblemError

IDEMPOTENCY_HEADER = "Idempotency-Key"
_KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,255}")
_WAIT_PATTERN = re.compile(r"^\s*wait\s*=\s*\"?(\d{1,9})\"?\s*$", re.IGNORECASE)

BLOCK_SLICE_S = 0.5
"""Longest single blocking wait on a job's end signal: under the Redis socket timeout."""
EVENTS_POLL_S = 0.1
"""How often the event stream reads its job."""
KEEPALIVE_S = 15.0
"""An SSE comment this often, so that proxies do not close a quiet stream."""

TERMINAL_RQ = frozenset({b"finished", b"failed", b"canceled", b"stopped"})

T = TypeVar("T")


# -- Idempotency-Key ---------------------------------------------------------------------


def idempotency_key(owner: str, key: str) -> str:
    return f"{contract.KEY_PREFIX}idem:{owner}:{key}"


def check_key(value: str | None) -> str | None:
    """The header's value, or 422 when it is not 1-255 visible ASCII characters."""
    if value is None:
        return None
    if not _KEY_PATTERN.fullmatch(value):
        raise ProblemError(
            422,
            ErrorCode.VALIDATION_ERROR,
            "Idempotency-Key must be 1 to 255 visible ASCII characters (a UUID is ideal)",
            field=IDEMPOTENCY_HEADER,
        )
    return value


def _mismatch() -> ProblemError:
    return ProblemError(
        422,
        ErrorCode.VALIDATION_ERROR,
        "this Idempotency-Key was used with a different image or different parameters",
        field=IDEMPOTENCY_HEADER,
    )


def claim(
    connection: redis.Redis, owner: str, key: str, payload_hash: str, job_id: str, ttl_s: int
) -> tuple[str, bool]:
    """(the job the key names, whether that job exists).

    `job_id` and False: this request has just claimed the key and must enqueue that job, or
    `release` the key if it is refused. Another id and False: an earlier request with this
    key has not enqueued its job (it still runs, or its reply was lost, or it died): this
    one enqueues that same id, exclusively (jobs.enqueue), so that whichever gets there
    first makes the one job. Another id and True: the job exists; answer it.
    """
    name = idempotency_key(owner, key)
    record = json.dumps({"payload_hash": payload_hash, "job_id": job_id})
    while True:
        if connection.set(name, record, nx=True, ex=ttl_s):
            return job_id, False
        raw = connection.get(name)
        if raw is None:
            continue  # expired or released between the two calls: try again
        existing = json.loads(raw)
        if existing.get("payload_hash") != payload_hash:
            raise _mismatch()
        other = str(existing["job_id"])
        return other, bool(connection.exists(Job.key_for(other)))


def release(connection: redis.Redis, owner: str, key: str, job_id: str) -> None:
    """Give the key up after a refused submission, if it still names `job_id` and no such
    job exists (another request with the key may have made it meanwhile)."""
    name = idempotency_key(owner, key)
    pipe = connection.pipeline(transaction=False)
    pipe.get(name)
    pipe.exists(Job.key_for(job_id))
    raw, exists = pipe.execute()
    if raw is not None and not exists and json.loads(raw).get("job_id") == job_id:
        connection.delete(name)


# -- Prefer: wait=N ----------------------------------------------------------------------


def preferred_wait(headers: list[str], cap_s: int) -> int | None:
    """Seconds from the first `wait=N` preference among `Prefer` headers, capped; None if
    none was asked for (or waiting is off)."""
    for header in headers:
        for preference in header.split(","):
            match = _WAIT_PATTERN.match(preference.split(";", 1)[0])
            if match:
                wait = min(int(match.group(1)), cap_s)
                return wait if wait > 0 else None
    return None


async def wait_until_ended(
    connection: redis.Redis, job_id: str, wait_s: float, read: Callable[[], T]
) -> tuple[bool, T]:
    """(whether the job ended, or vanished, within `wait_s`; `read()` once it did or the
    time ran out), waiting in `wait_slice`s, each in the threadpool."""
    deadline = time.monotonic() + wait_s
    while True:
        answer = await run_in_threadpool(wait_slice, connection, job_id, deadline, read)
        if answer is not None:
            return answer


def wait_slice(
    connection: redis.Redis,
    job_id: str,
    deadline: float,
    read: Callable[[], T],
    check_status: bool = True,
) -> tuple[bool, T] | None:
    """One slice of a wait for the job's end, blocking (a worker thread): (ended, `read()`)
    once the job ended or vanished or `deadline` (monotonic) passed; None while it runs.

    Blocks on the job's `ended` signal (BLMOVE of the list onto itself, so it is not
    consumed) for at most BLOCK_SLICE_S, under the socket timeout. First it reads the RQ
    status, which covers jobs that ended without a worker (lost); a caller that has just
    enqueued the job skips that (`check_status=False`): the job cannot have ended, and a
    cancel while queued pushes the signal. `read` runs in the thread that saw the end, so
    the answer costs no further threadpool hop.
    """
    if check_status:
        state = connection.hget(Job.key_for(job_id), "status")
        if state is None or state in TERMINAL_RQ:
            return True, read()
    remaining = deadline - time.monotonic()
    if remaining > 0:
        signal = contract.ended_key(job_id)
        if _block_on(connection, signal, max(0.01, min(BLOCK_SLICE_S, remaining))) is not None:
            return True, read()
        if time.monotonic() < deadline:
            return None
    return False, read()


def _block_on(connection: redis.Redis, signal: str, timeout_s: float) -> Any:
    """Wait for the list to hold an element, without taking it (moved onto itself)."""
    return connection.blmove(signal, signal, timeout_s, "RIGHT", "LEFT")  # type: ignore[arg-type]


# -- Server-Sent Events ------------------------------------------------------------------


def sse(event: str, data: Any) -> bytes:
    """One event; `data` is JSON (a pydantic model without its None fields)."""
    if isinstance(data, BaseModel):
        text = data.model_dump_json(exclude_none=True)
    else:
        text = json.dumps(data, separators=(",", ":"))
    return f"event: {event}\ndata: {text}\n\n".encode()


async def job_events(
    read: Callable[[], tuple[Any, dict[str, Any] | None]],
    poll_s: float = EVENTS_POLL_S,
    keepalive_s: float = KEEPALIVE_S,
) -> AsyncIterator[bytes]:
    """`status` on each change of status (or queue position), `progress` on each new step,
    then `end` once the job is terminal.

    `read` returns (JobView, progress meta) and raises ProblemError once the job is gone.
    """
    last_status: tuple[Any, Any] | None = None
    last_progress: dict[str, Any] | None = None
    last_sent = time.monotonic()
    while True:
        try:
            view, progress = await run_in_threadpool(read)
        except ProblemError as exc:
            yield sse("end", {"status": None, "code": exc.code.value, "detail": str(exc)})
            return
        out: list[bytes] = []
        current = (view.status, view.queue_position)
        if current != last_status:
            last_status = current
            out.append(sse("status", view))
        if isinstance(progress, dict) and progress != last_progress:
            last_progress = progress
            step = {"step": progress.get("step"), "total": progress.get("total")}
            # Before the terminal status: the last step is seen before the end.
            out.insert(
                len(out) - 1 if view.status.is_terminal and out else len(out), sse("progress", step)
            )
        if view.status.is_terminal:
            out.append(sse("end", {"id": view.id, "status": view.status.value}))
        for chunk in out:
            yield chunk
        if view.status.is_terminal:
            return
        if out:
            last_sent = time.monotonic()
        elif time.monotonic() - last_sent >= keepalive_s:
            last_sent = time.monotonic()
            yield b": keep-alive\n\n"
        await asyncio.sleep(poll_s)
