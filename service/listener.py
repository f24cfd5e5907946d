"""Waiting on jobs without threads: one pub/sub listener per gateway process.

Workers publish a job's id on `JOB_EVENTS_CHANNEL` each time they write its
progress or its end, and so does a gateway that cancels a queued job. Each gateway process
holds ONE subscription, on the async Redis client, read by one asyncio task that wakes the
`Watch`es of that job. A watch is shared by every waiter that reads a job the same way:
it reads the job once per change for all of them, however many `Prefer: wait` submissions
or event streams follow it. A waiter holds a coroutine while it waits, never a thread, a
Redis connection or a poll of its own.

No change goes unseen for good: a waiter takes the watch's `changed` event before each
read, so a change during the read wakes it at once; the listener wakes every watch after
each (re)subscription, which covers messages lost while it was disconnected; and a watch
is re-read at least every REREAD_S, which covers a job that ended with no message (its
worker was lost) and queue positions, which move without a message of their own.

The listener also counts each key's open waits and streams (`admit` / `leave`): the limit
is per gateway process, like the resources it protects (connections, tasks, memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

import redis.asyncio
from redis.exceptions import RedisError

from ddim_inversion.keys import JOB_EVENTS_CHANNEL

logger = logging.getLogger(__name__)

T = TypeVar("T")

REREAD_S = 2.0
"""A watched job is read again at least this often, message or not."""
LISTEN_TIMEOUT_S = 10.0
"""Longest single read of the subscription: the connection's health check runs between."""
RECONNECT_MIN_S = 0.1
"""First pause before subscribing again after the subscription broke; doubled each time."""
RECONNECT_MAX_S = 5.0
"""Longest pause between two attempts to subscribe again."""
CANCEL_AGAIN_S = 0.1
"""How long `close` waits for the listener to end before cancelling it again: redis-py
can swallow a cancellation that lands while it connects, and the task then listens on."""


class Watch(Generic[T]):
    """One job as its waiters read it: the latest read, and `changed`, set at the next change.

    A waiter takes `changed` first, then `await current()`, then waits on the event it took
    (`until`): a change during the read has already set that event.
    """

    def __init__(self, read: Callable[[], Awaitable[T]], reread_s: float = REREAD_S) -> None:
        self._read = read
        self.reread_s = reread_s
        self.changed = asyncio.Event()
        self.users = 0
        self._version = 0
        self._lock = asyncio.Lock()
        self._read_version = -1
        self._read_at = -math.inf
        self._outcome: Any = None

    def notify(self) -> None:
        """The job changed: the next `current()` reads it again, and its waiters wake."""
        self._version += 1
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    async def current(self) -> T:
        """The job as read after its latest change, or within `reread_s`: one read serves
        every waiter (an error too: each waiter sees the one the read raised)."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            stale = loop.time() - self._read_at >= self.reread_s
            if stale or self._read_version != self._version:
                version = self._version
                try:
                    self._outcome = await self._read()
                except Exception as exc:
                    self._outcome = exc
                self._read_version, self._read_at = version, loop.time()
        if isinstance(self._outcome, Exception):
            raise self._outcome
        outcome: T = self._outcome
        return outcome


async def until(event: asyncio.Event, timeout_s: float) -> bool:
    """Whether `event` was set within `timeout_s` (never raises on the timeout)."""
    if timeout_s <= 0:
        return event.is_set()
    with contextlib.suppress(asyncio.TimeoutError):  # not the builtin one before 3.11
        await asyncio.wait_for(event.wait(), timeout_s)
    return event.is_set()


class JobListener:
    """The process's one subscription to job events, and the watches it wakes."""

    def __init__(self, client: redis.asyncio.Redis, reread_s: float = REREAD_S) -> None:
        self.client = client
        """The async client: the subscription, and reads that need no thread."""
        self.reread_s = reread_s
        """How often each watch reads its job without a message (REREAD_S)."""
        self._watches: dict[str, dict[Hashable, Watch[Any]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._open: Counter[str] = Counter()
        self.open_waits = 0
        """Waits and streams open in this process, all keys together (a plain int: the
        metrics thread reads it)."""

    @contextlib.asynccontextmanager
    async def watch(
        self, job_id: str, kind: Hashable, read: Callable[[], Awaitable[T]]
    ) -> AsyncIterator[Watch[T]]:
        """The watch of `job_id` read as `kind` (one per kind: every waiter that reads the
        job alike shares it, and `read` must be the same for them), while in use."""
        if (self._task is None or self._task.done()) and not self._closing:
            # Started by the first waiter, not at startup: a gateway that never waits
            # holds no subscription.
            self._task = asyncio.create_task(self._listen(), name="job-events listener")
        watches = self._watches.setdefault(job_id, {})
        watch = watches.get(kind)
        if watch is None:
            watch = watches[kind] = Watch(read, self.reread_s)
        watch.users += 1
        try:
            yield watch
        finally:
            watch.users -= 1
            if watch.users == 0:
                del watches[kind]
                if not watches:
                    del self._watches[job_id]

    def admit(self, owner: str, limit: int | None) -> bool:
        """Count one more open wait or stream of `owner`, unless it already holds `limit`
        (None: no limit, counted all the same)."""
        if limit is not None and self._open[owner] >= limit:
            return False
        self._open[owner] += 1
        self.open_waits += 1
        return True

    def leave(self, owner: str) -> None:
        """One wait or stream of `owner` that `admit` counted has ended."""
        self._open[owner] -= 1
        self.open_waits -= 1
        if self._open[owner] <= 0:
            del self._open[owner]

    def _wake(self, job_id: str) -> None:
        for watch in self._watches.get(job_id, {}).values():
            watch.notify()

    def _wake_all(self) -> None:
        for watches in self._watches.values():
            for watch in watches.values():
                watch.notify()

    async def _listen(self) -> None:
        """Subscribe, dispatch each message to its job's watches; subscribe again after any
        failure, with a growing pause (the watches' re-reads carry the waiters meanwhile)."""
        pause = RECONNECT_MIN_S
        while not self._closing:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(JOB_EVENTS_CHANNEL)
                self._wake_all()  # whatever changed before or while unsubscribed
                pause = RECONNECT_MIN_S
                while not self._closing:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=LISTEN_TIMEOUT_S
                    )
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        self._wake(data.decode() if isinstance(data, bytes) else str(data))
            except (RedisError, OSError) as exc:
                logger.warning("job events subscription lost (%s); subscribing again", exc)
            except Exception:
                logger.exception("job events listener failed; subscribing again")
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(pause)
            pause = min(2 * pause, RECONNECT_MAX_S)

    async def close(self) -> None:
        """Stop listening (the lifespan's end), however often the cancellation is lost."""
        self._closing = True
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=CANCEL_AGAIN_S)
