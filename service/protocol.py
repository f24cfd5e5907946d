"""HTTP protocol features around a job: Idempotency-Key, `Prefer: wait=N` and the SSE stream.

- Idempotency: `inversion:idem:{owner}:{key}` -> {"payload_hash", "job_id"}, written with
  SET NX before the job is enqueued, expiring with the result TTL. Every request with the
  key enqueues that one job id, exclusively, so concurrent ones, and a retry after a lost
  reply, make one job. The same key with another payload is a 422. The record counts in
  the key's held bytes until it expires, or until the job it names is deleted with it.
- `Prefer: wait=N` (RFC 7240): the submission waits up to N seconds for the job to end.
- Events: `GET /v1/inversions/{id}/events` streams `status`, `progress` and `end` events,
  or `reconnect` once the stream reached its lifetime (INVERSION_MAX_STREAM_S).

Waiting and streaming hold no thread: they sleep on the process's one job-events listener
(service/listener.py) and read the job only when it changed (or every few seconds).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable, Hashable
from functools import partial
from typing import Any

import redis
import redis.asyncio
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ddim_inversion.errors import ErrorCode
from ddim_inversion.held_bytes import hold_record, record_bytes, record_member
from ddim_inversion.keys import ended_key, idempotency_key
from service import auth, rq_adapter
from service.errors import ProblemError
from service.listener import JobListener, until
from service.settings import GatewaySettings

IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_PATTERN = "^[!-~]{1,255}$"
"""1 to 255 visible ASCII characters: the check here and the OpenAPI document's."""
_KEY_PATTERN = re.compile(IDEMPOTENCY_KEY_PATTERN)
_WAIT_PATTERN = re.compile(r"^\s*wait\s*=\s*\"?(\d{1,9})\"?\s*$", re.IGNORECASE)

KEEPALIVE_S = 15.0
"""An SSE comment this often, so that proxies do not close a quiet stream."""


# -- Idempotency-Key ---------------------------------------------------------------------


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
            if owner != auth.ANONYMOUS:
                size = record_bytes(name, record)
                hold_record(connection, owner, record_member(key), size, ttl_s)
            return job_id, False
        raw = connection.get(name)
        if raw is None:
            continue  # expired or released between the two calls: try again
        existing = json.loads(raw)
        if existing.get("payload_hash") != payload_hash:
            raise _mismatch()
        other = str(existing["job_id"])
        return other, bool(connection.exists(rq_adapter.job_key(other)))


def release(connection: redis.Redis, owner: str, key: str, job_id: str) -> None:
    """Give the key up after a refused submission, if it still names `job_id` and no such
    job exists (another request with the key may have made it meanwhile)."""
    name = idempotency_key(owner, key)
    pipe = connection.pipeline(transaction=False)
    pipe.get(name)
    pipe.exists(rq_adapter.job_key(job_id))
    raw, exists = pipe.execute()
    if raw is not None and not exists and json.loads(raw).get("job_id") == job_id:
        connection.delete(name)
        hold_record(connection, owner, record_member(key), 0, 0)


def forget_record(connection: redis.Redis, owner: str, key: str, job_id: str) -> None:
    """Delete the key's record with the job it names (`job_id`), and its held bytes; a
    record naming another job (the key reused after this one expired) stays."""
    name = idempotency_key(owner, key)
    raw = connection.get(name)
    if raw is not None and json.loads(raw).get("job_id") == job_id:
        connection.delete(name)
        hold_record(connection, owner, record_member(key), 0, 0)


# -- Prefer: wait=N ----------------------------------------------------------------------


def waiter_limit(owner: str, settings: GatewaySettings) -> int | None:
    """A key's limit of open waits and event streams; none for the anonymous owner (auth
    disabled), like every per-key limit."""
    return None if owner == auth.ANONYMOUS else settings.max_waiters_per_key


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


async def has_ended(client: redis.asyncio.Redis, job_id: str) -> bool:
    """Whether the job ended or vanished: its RQ status (which also covers a job that ended
    without a worker: lost), or its `ended` signal (written with the end)."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.hget(rq_adapter.job_key(job_id), rq_adapter.STATUS_FIELD)
        pipe.exists(ended_key(job_id))
        raw, signalled = await pipe.execute()
    state = rq_adapter.contract_status(raw)
    return state is None or state.is_terminal or bool(signalled)


async def wait_until_ended(listener: JobListener, job_id: str, wait_s: float) -> bool:
    """Whether the job ended (or vanished) within `wait_s`, woken by its events: no thread
    and no poll of its own (one shared status read per change, for every waiter)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    read = partial(has_ended, listener.client, job_id)
    async with listener.watch(job_id, "ended", read) as watch:
        while True:
            changed = watch.changed
            if await watch.current():
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await until(changed, min(remaining, watch.reread_s))


async def wait_while_connected(
    listener: JobListener, job_id: str, wait_s: float, receive: Receive
) -> bool | None:
    """`wait_until_ended`, given up as soon as the client disconnects (None then): a
    client gone must not keep its wait, nor its place among its key's waits."""
    waiting = asyncio.ensure_future(wait_until_ended(listener, job_id, wait_s))
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((waiting, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        waiting.cancel()
    return waiting.result() if waiting.done() and not waiting.cancelled() else None


async def _disconnected(receive: Receive) -> None:
    """Returns once the client is gone (the request body was read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


# -- Server-Sent Events ------------------------------------------------------------------


def sse(event: str, data: Any) -> bytes:
    """One event; `data` is JSON (a pydantic model without its None fields)."""
    if isinstance(data, BaseModel):
        text = data.model_dump_json(exclude_none=True)
    else:
        text = json.dumps(data, separators=(",", ":"))
    return f"event: {event}\ndata: {text}\n\n".encode()


async def job_events(
    listener: JobListener,
    job_id: str,
    kind: Hashable,
    read: Callable[[], tuple[Any, dict[str, Any] | None]],
    lifetime_s: float,
    keepalive_s: float = KEEPALIVE_S,
) -> AsyncIterator[bytes]:
    """`status` on each change of status (or queue position), `progress` on each new step,
    then `end` once the job is terminal; `reconnect` (and the stream ends) after
    `lifetime_s`.

    `read` (blocking: it runs in the threadpool, once per change for every stream of the
    same `kind`) returns (JobView, progress meta) and raises ProblemError once the job is
    gone. Between changes the stream holds no thread.
    """
    loop = asyncio.get_running_loop()
    ends_at = loop.time() + lifetime_s
    last_status: tuple[Any, Any] | None = None
    last_progress: dict[str, Any] | None = None
    last_sent = loop.time()
    async with listener.watch(job_id, kind, partial(run_in_threadpool, read)) as watch:
        while True:
            changed = watch.changed
            try:
                view, progress = await watch.current()
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
                at = len(out) - 1 if view.status.is_terminal and out else len(out)
                out.insert(at, sse("progress", step))
            if view.status.is_terminal:
                out.append(sse("end", {"id": view.id, "status": view.status.value}))
            for chunk in out:
                yield chunk
            if view.status.is_terminal:
                return
            now = loop.time()
            if now >= ends_at:
                yield sse("reconnect", {"id": view.id, "after_s": lifetime_s})
                return
            if out:
                last_sent = now
            elif now - last_sent >= keepalive_s:
                last_sent = now
                yield b": keep-alive\n\n"
            wake_in = min(watch.reread_s, last_sent + keepalive_s - now, ends_at - now)
            await until(changed, wake_in)


class HeldStreamingResponse(StreamingResponse):
    """A stream that runs `release` once it ends, however it ends (done, client gone,
    error): the per-key count of open streams (`JobListener.admit`) stays exact."""

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], None], **kw: Any):
        super().__init__(content, **kw)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
