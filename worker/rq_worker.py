"""The worker's base class: RQ's worker loop, its overridable methods turned into hooks.

RQ's `SimpleWorker` (it never forks: CUDA cannot be used in a forked child), with:

- hooks of the worker's own names: `run_dequeued` (RQ dequeued a job, now in its
  intermediate queue), `beat` (RQ heartbeats between and around jobs), `on_birth`,
  `on_death`, and `listen` for channels heard on RQ's pub/sub thread;
- a loop that survives Redis lost or full between jobs (RQ's own quits on both): its
  dequeue waits with backoff, its suspension check, maintenance and heartbeats are best
  effort;
- running jobs' executions that expire `execution_ttl_s` after the worker was last heard
  from, instead of after the job's timeout;
- a stop (SIGTERM, SIGINT) that is never lost: RQ raises StopRequested from its signal
  handler wherever the idle worker is, and a handler there that catches Exception (a
  reaping hiccup's) would swallow it and leave the worker running; the request is also
  kept as a flag, which the next heartbeat raises again. The handlers are in place
  before the worker announces itself, and a stop during the start-up ends it cleanly.

Shutdown: after SIGTERM an idle worker exits within SHUTDOWN_S; a busy one first finishes
its batch (which ends by its jobs' timeout at the latest), then exits within SHUTDOWN_S.

With rq_adapter, the only place the worker uses RQ; the contract tests in
tests/rq_contract/test_worker_rq_adapter.py pin what this class relies on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from worker.outages import AWAY_OR_FULL, OutageLog, backoff, tolerated

SERIALIZER = JSONSerializer
"""Jobs are JSON, never pickle: writing to Redis must not be a way to run code in a worker."""

WORKER_TTL_S = 20
"""RQ's worker key TTL: a short one makes RQ block at most a few seconds between heartbeats."""

DEQUEUE_WAIT_S = max(1, WORKER_TTL_S - 15)
"""How long RQ's dequeue blocks on Redis before its next heartbeat (RQ's `dequeue_timeout`):
a stop that was not acted on at once is by the next heartbeat, this long later at most."""

DEATH_HOOK_S = 5.0
"""Most time `on_death` may take (the batching worker's webhook flush is cut at it)."""

RQ_HEARTBEAT_EVERY_S = 1.0
"""Least interval between two of RQ's own worker heartbeats (its worker key lives 80 s)."""

PUBSUB_POLL_S = 1.0
"""Longest wait of the pub/sub thread for a message before it checks whether to stop. The
worker's exit waits for that check (RQ's unsubscribe joins the thread): RQ's 60 s would
hold an idle worker's exit for up to a minute."""

PUBSUB_RETRY_S = 2.0
"""Wait before the pub/sub thread listens again after a lost connection (as RQ's does)."""

SHUTDOWN_S = DEQUEUE_WAIT_S + DEATH_HOOK_S + PUBSUB_RETRY_S + PUBSUB_POLL_S + 5.0
"""The worker's shutdown bound: from a stop request (or its batch's end) to its exit, on a
Redis that answers. A dequeue's wait, `on_death`, the pub/sub thread's last retry and
poll, and 5 s for RQ's own records, a few round trips and the interpreter's exit."""


STARTING = "starting"
"""RQ's state of a worker before its start-up (`bootstrap`) sets STARTED."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class BaseWorker(SimpleWorker):
    """RQ's worker loop with the batching worker's hooks. `execution_ttl_s`: a running job's
    execution expires this long after its worker was last heard from."""

    def __init__(self, queues: Sequence[Queue], *, execution_ttl_s: float, **kwargs: Any) -> None:
        kwargs.setdefault("serializer", SERIALIZER)
        kwargs.setdefault("worker_ttl", WORKER_TTL_S)
        super().__init__(queues, **kwargs)
        self.execution_ttl_s = execution_ttl_s
        self.outages = OutageLog(self.log)
        self._channels: dict[str, Callable[[str], None]] = {}
        self._last_rq_heartbeat = -float("inf")

    # The hooks: a job dequeued (now in RQ's intermediate queue), a heartbeat between and
    # around jobs, the worker registered, and about to be unregistered.

    def run_dequeued(self, job: Job, queue: Queue) -> None:
        raise NotImplementedError

    def beat(self) -> None:
        self.rq_heartbeat()

    def on_birth(self) -> None: ...

    def on_death(self) -> None: ...

    def listen(self, channel: str, handler: Callable[[str], None]) -> None:
        """Call `handler(data)` on RQ's pub/sub thread for each message on `channel`
        (from the next `work()` on)."""
        self._channels[channel] = handler

    def rq_heartbeat(self) -> None:
        """RQ's worker heartbeat; RQ calls it several times per job, once a second is plenty."""
        moment = time.monotonic()
        if moment - self._last_rq_heartbeat >= RQ_HEARTBEAT_EVERY_S:
            super().heartbeat()
            self._last_rq_heartbeat = moment

    def keep_alive(self, running: Iterable[tuple[Job, Execution]]) -> None:
        """Extend each running job's execution (and RQ's worker key): only a dead worker's
        executions expire."""
        for job, execution in running:
            self.maintain_heartbeats(job, execution)

    # RQ's overridable methods, each turned into a hook or made to survive an outage.

    def execute_job(self, job: Job, queue: Queue) -> None:
        self.run_dequeued(job, queue)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        if pipeline is not None or timeout is not None:
            super().heartbeat(timeout, pipeline)  # inside RQ's own writes
            return
        # A missed heartbeat is harmless; RQ's loop would quit on the error after a job.
        with tolerated(self.outages):
            self.beat()
        if self._stop_requested and self.get_state() != WorkerStatus.BUSY:
            raise StopRequested()  # a stop whose raise from the signal handler was swallowed

    def _shutdown(self) -> None:
        """RQ's reaction to a stop signal (private), with the request also kept as a flag
        when RQ raises it at once (idle): the raise may land inside code that swallows it.
        While the worker starts, the flag alone: RQ's loop ends on it before its first
        dequeue, with its teardown (a raise there would skip the teardown)."""
        self._stop_requested = True
        if self.get_state() in (STARTING, WorkerStatus.STARTED):
            return
        super()._shutdown()

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return max(1, math.ceil(self.execution_ttl_s))

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's check, run before each dequeue; Redis away is the dequeue's to wait for."""
        with tolerated(self.outages):
            super().check_for_suspension(burst)

    def run_maintenance_tasks(self) -> None:
        """RQ's periodic registry cleaning; skipped while Redis is away, not fatal."""
        with tolerated(self.outages):
            super().run_maintenance_tasks()

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """RQ's dequeue, surviving what RQ's own loop lets through and would quit on: Redis
        lost before its first write, and a full Redis, which refuses even a dequeue."""
        waits = backoff()
        while True:
            try:
                return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except AWAY_OR_FULL as exc:
                # Private: RQ's signal handler sets only this flag; its loop ends on
                # StopRequested, which the wait must not swallow.
                if self._stop_requested:
                    raise StopRequested() from exc
                self.outages.warn("Redis unavailable or full between jobs (%s); waiting", exc)
                time.sleep(next(waits))

    def subscribe(self) -> None:
        """RQ's command channel and the `listen`ed ones, on RQ's pub/sub thread."""
        names = [self.pubsub_channel_name, *self._channels]
        self.log.info("Worker %s: subscribing to %s", self.name, ", ".join(names))
        handlers = {
            name: lambda message, handler=handler: handler(_text(message.get("data", b"")))
            for name, handler in self._channels.items()
        }
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload, **handlers})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]
            sleep_time=PUBSUB_POLL_S, daemon=True, exception_handler=self._keep_listening
        )

    def _keep_listening(self, exc: Exception, pubsub: Any, thread: Any) -> None:
        """The pub/sub thread outlives a lost connection (redis-py subscribes again)."""
        if not isinstance(exc, RedisConnectionError):
            raise exc
        self.outages.warn("Redis unavailable to the pub/sub thread (%s); retrying", exc)
        time.sleep(PUBSUB_RETRY_S)

    def register_birth(self) -> None:
        # RQ installs its handlers after its start-up: a worker already announced (on_birth)
        # would die of a SIGTERM's default action there, its records left behind.
        self._install_signal_handlers()
        super().register_birth()
        self.on_birth()

    def register_death(self) -> None:
        self.on_death()
        super().register_death()
