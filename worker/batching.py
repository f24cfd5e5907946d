"""The worker: an RQ worker that runs compatible queued jobs together through the engine.

RQ dequeues the oldest job as usual. Before running it, the worker looks along the queue
for jobs that can share its UNet calls (same resolution, steps, scheduler config and
guidance mode; prompts may differ), waits up to `max_batch_wait_ms` for more, claims them
atomically, and runs them as one batch. Every job still goes through RQ's own lifecycle
(started registry, meta, result, finished / failed / canceled registries), so `rq info`
and rq-dashboard see each job; batching shows only in speed.

1. Dequeue: RQ moves the oldest job to its intermediate queue (so the oldest is always
   in the next batch: no job starves behind a stream of compatible ones).
2. Gather: scan the head of the queue for compatible jobs and claim them with one Lua
   script (LREM from the queue, RPUSH to the intermediate queue), up to the batch size.
3. Start: each job gets RQ's execution record and `started` status.
4. Run: one engine call; between steps, progress goes to every job's meta, cancel flags
   and deadlines are read in one round trip, and a job that must stop drops out alone.
5. Finish: each job succeeds, fails or is canceled on its own. An error in a batch of
   several (out of GPU memory among them) splits it and runs the halves again, so only a
   job that fails alone fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import RedisError
from redis.exceptions import ResponseError as RedisResponseError
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now

from ddim_inversion.contract import (
    META_ENGINE_S,
    META_ERROR,
    META_PROGRESS,
    META_RESULT,
    JobPayload,
    WorkerRecord,
)
from ddim_inversion.errors import ErrorCode, InvalidParameter
from ddim_inversion.keys import (
    CANCEL_CHANNEL,
    THROUGHPUT_KEY,
    WORKERS_KEY,
    cancel_key,
    input_key,
    publish_job_event,
    tokenizer_key,
)
from worker import jobs, storing
from worker.engine import InversionRequest, batch_key, invert, progress_total
from worker.lifecycle import (
    StartReply,
    Success,
    clean_registries,
    expire_canceled,
    forget_failed_inputs,
    signal_end,
    start_batch,
)
from worker.models import LoadedModel
from worker.settings import WorkerSettings
from worker.webhooks import WebhookSender

CLAIM_SCRIPT = """
local claimed = {}
for _, id in ipairs(ARGV) do
  if redis.call('LREM', KEYS[1], 1, id) == 1 then
    redis.call('RPUSH', KEYS[2], id)
    table.insert(claimed, id)
  end
end
return claimed
"""
"""Claim job ids from the queue atomically: a job another worker took is simply skipped."""

RQ_HEARTBEAT_EVERY_S = 1.0
"""Least interval between two of RQ's own worker heartbeats (its worker key lives 80 s)."""

SCAN_FACTOR = 4
"""How far along the queue to look for compatible jobs, in multiples of the batch size."""

THROUGHPUT_ALPHA = 0.3
"""Weight of the newest batch in the images/s EWMA that gateways estimate waits from."""


@contextlib.contextmanager
def redis_outage_tolerated(worker: InversionWorker) -> Iterator[None]:
    """Progress and cancel checks are best effort: the GPU keeps working through an outage."""
    try:
        yield
    except storing.LOST as exc:
        worker.outages.warn("Redis unavailable during a batch (%s); continuing", exc)


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class Running:
    """One job of a batch, with what the worker needs to finish it."""

    job: Job
    payload: JobPayload | None = None
    execution: Execution | None = None
    deadline: float = float("inf")
    stop_code: ErrorCode | None = None
    error: tuple[ErrorCode, str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class InversionWorker(SimpleWorker):
    """Never forks (CUDA cannot be used in a forked child); the model stays loaded."""

    def __init__(
        self,
        queues: Sequence[Queue],
        *,
        model: LoadedModel,
        settings: WorkerSettings,
        max_batch_size: int,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("serializer", JSONSerializer)
        # A short worker TTL makes RQ block for at most a few seconds between heartbeats.
        kwargs.setdefault("worker_ttl", 20)
        super().__init__(queues, **kwargs)
        self.model = model
        self.settings = settings
        self.max_batch_size = max_batch_size
        self._claim = self.connection.register_script(CLAIM_SCRIPT)
        self._last_record = 0.0
        self._tokenizer: tuple[str, str] | None = None
        self._last_keep_alive = 0.0
        self._last_rq_heartbeat = -float("inf")
        self._last_reap = 0.0
        self._running_ids: set[str] = set()
        self._cancel_requests: set[str] = set()
        self._max_value_bytes: int | None = None
        self.outages = storing.OutageLog(self.log)
        self.batches_run = 0
        self.images_per_s: float | None = None
        self.webhooks = WebhookSender.from_settings(settings)

    # -- liveness -------------------------------------------------------------------------

    def publish_record(self, force: bool = False) -> None:
        """Tell gateways this worker is alive with its model loaded (throttled)."""
        moment = time.time()
        if not force and moment - self._last_record < self.settings.heartbeat_s:
            return
        record = WorkerRecord(
            name=self.name,
            model=self.model.info().model_copy(update={"tokenizer_key": self.publish_tokenizer()}),
            heartbeat_at=moment,
            max_batch_size=self.max_batch_size,
        )
        self.connection.hset(WORKERS_KEY, self.name, record.model_dump_json())
        self._last_record = moment

    def publish_tokenizer(self) -> str | None:
        """The tokenizer as `tokenizers` JSON under its content hash, so gateways count tokens."""
        if self._tokenizer is None:
            backend = getattr(self.model.tokenizer, "backend_tokenizer", None)
            if backend is None:
                return None
            text = backend.to_str()
            self._tokenizer = (tokenizer_key(hashlib.sha256(text.encode()).hexdigest()), text)
        key, text = self._tokenizer
        if not self.connection.exists(key):  # once, and again after a Redis without persistence
            self.connection.set(key, text)
        return key

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        moment = time.monotonic()
        if pipeline is not None or timeout is not None:
            super().heartbeat(timeout, pipeline)
            return
        # A missed heartbeat is harmless; RQ's loop would quit on the error after a job.
        with redis_outage_tolerated(self):
            # RQ heartbeats several times per job; its TTL is a minute, so once a second is
            # plenty, and short jobs do not pay three Redis writes for each.
            if moment - self._last_rq_heartbeat >= RQ_HEARTBEAT_EVERY_S:
                super().heartbeat()
                self._last_rq_heartbeat = moment
            self.publish_record()
            self.reap_lost_jobs()

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's check, run before each dequeue; Redis away is the dequeue's to wait for."""
        with redis_outage_tolerated(self):
            super().check_for_suspension(burst)

    def run_maintenance_tasks(self) -> None:
        """RQ's periodic registry cleaning; skipped while Redis is away, not fatal."""
        with redis_outage_tolerated(self):
            super().run_maintenance_tasks()

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """RQ's dequeue, surviving what RQ's own loop lets through and would quit on: Redis
        lost before its first write, and a full Redis, which refuses even a dequeue."""
        delay = storing.RETRY_FIRST_S
        while True:
            try:
                return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except (*storing.LOST, RedisOutOfMemoryError) as exc:
                if self._stop_requested:
                    raise StopRequested() from exc
                self.outages.warn("Redis unavailable or full between jobs (%s); waiting", exc)
                time.sleep(delay)
                delay = min(delay * 2, storing.RETRY_MAX_S)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """A running job's execution expires this long after its worker was last heard from."""
        return max(1, math.ceil(self.settings.lost_after_s))

    def keep_alive(self, batch: list[Running]) -> None:
        """Extend every running job's execution, so that only a dead worker's jobs expire."""
        moment = time.monotonic()
        if moment - self._last_keep_alive < self.settings.heartbeat_s:
            return
        self._last_keep_alive = moment
        for item in batch:
            if item.execution is not None and item.stop_code is None:
                self.maintain_heartbeats(item.job, item.execution)
        self.heartbeat()

    def reap_lost_jobs(self) -> None:
        """Jobs whose worker stopped heartbeating (killed, machine gone) are retried or fail.

        RQ's own StartedJobRegistry.cleanup does it: an expired execution is retried while the
        job has retries left (the gateway enqueues with Retry(max_retries)), else it fails
        with AbandonedJobError, which the gateway reports as `worker_lost`. Any live worker
        runs it, every lost_after_s / 2, and then forgets ended jobs past their TTL from the
        registries.
        """
        moment = time.monotonic()
        if moment - self._last_reap < self.settings.lost_after_s / 2:
            return
        self._last_reap = moment
        for queue in self.queues:
            try:
                registry = queue.started_job_registry
                lost = registry.get_expired_job_ids()
                registry.cleanup()
                if lost:
                    forget_failed_inputs(self.connection, lost)
                clean_registries(self.connection, queue)
            except Exception as exc:  # a reaping hiccup must not stop the worker
                self.log.warning("reaping lost jobs failed: %s", exc)

    def subscribe(self) -> None:
        """RQ's command channel, plus the service's cancel channel, on RQ's pub/sub thread."""
        self.log.info(
            "Worker %s: subscribing to %s and %s",
            self.name,
            self.pubsub_channel_name,
            CANCEL_CHANNEL,
        )
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(
            **{self.pubsub_channel_name: self.handle_payload, CANCEL_CHANNEL: self.on_cancel}
        )
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]
            sleep_time=60, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def on_cancel(self, message: dict[str, Any]) -> None:
        """On the pub/sub thread: remember a cancel of a job this worker is running."""
        data = message.get("data")
        job_id = data.decode() if isinstance(data, bytes) else str(data)
        if job_id in self._running_ids:
            self._cancel_requests.add(job_id)

    def register_birth(self) -> None:
        super().register_birth()
        self.publish_record(force=True)

    def register_death(self) -> None:
        self.webhooks.flush(5.0)
        self.connection.hdel(WORKERS_KEY, self.name)
        self.connection.hdel(THROUGHPUT_KEY, self.name)
        super().register_death()

    # -- 1-2. gathering a batch -------------------------------------------------------------

    def _key_of(self, payload: JobPayload | None) -> str | None:
        if payload is None:
            return None
        try:
            return batch_key(payload.params, self.model)
        except (InvalidParameter, ValueError):
            return None

    def gather(self, head: Running, queue: Queue) -> list[Running]:
        """Compatible queued jobs claimed to run with `head`, waiting at most max_batch_wait_ms."""
        key = self._key_of(head.payload)
        if key is None or self.max_batch_size <= 1:
            return []
        extra: list[Running] = []
        deadline = time.monotonic() + self.settings.max_batch_wait_ms / 1000.0
        seen_incompatible: set[str] = set()
        while len(extra) + 1 < self.max_batch_size:
            depth = self.max_batch_size * SCAN_FACTOR
            ids = [
                i.decode() if isinstance(i, bytes) else str(i)
                for i in self.connection.lrange(queue.key, 0, depth - 1)
            ]
            candidates = [i for i in ids if i not in seen_incompatible]
            wanted: list[str] = []
            payloads: dict[str, JobPayload] = {}
            for job in Job.fetch_many(
                candidates, connection=self.connection, serializer=JSONSerializer
            ):
                if job is None:
                    continue
                try:
                    payload = jobs.trusted_payload(job)
                except jobs.JobFailed:
                    seen_incompatible.add(job.id)
                    continue
                if self._key_of(payload) == key:
                    wanted.append(job.id)
                    payloads[job.id] = payload
                else:
                    seen_incompatible.add(job.id)
                if len(wanted) + len(extra) + 1 >= self.max_batch_size:
                    break
            if wanted:
                claimed = self._claim(keys=[queue.key, queue.intermediate_queue_key], args=wanted)
                for raw in claimed:
                    job_id = raw.decode() if isinstance(raw, bytes) else raw
                    job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
                    extra.append(Running(job=job, payload=payloads[job_id]))
            if len(extra) + 1 >= self.max_batch_size or time.monotonic() >= deadline:
                break
            if not ids:
                # An empty queue means an idle service: waiting would only add latency. Under
                # load the queue is never empty, and the wait collects a fuller batch.
                break
            time.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
        return extra

    # -- 3-5. running a batch -------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        head = Running(job=job)
        try:
            head.payload = jobs.trusted_payload(job)
        except jobs.JobFailed as exc:
            # Before RQ's start and failure paths see it: they would resolve its callbacks.
            jobs.disarm(job)
            head.error = (exc.code, exc.message)
        batch = [head, *self.gather(head, queue)]
        self.run(batch, queue)

    def run(self, batch: list[Running], queue: Queue) -> None:
        """Start a gathered batch and run it to the end; every job ends terminal exactly once."""
        total = next(
            (progress_total(i.payload.params) for i in batch if i.payload and not i.error), None
        )
        # Before the start reads the cancel flags: a cancel set after that read is published
        # after it too, and is heard for a job already registered here.
        self._running_ids.update(item.job.id for item in batch)
        try:
            replies = start_batch(self, queue, batch, total)
            self.run_started(batch, replies, queue)
        finally:
            for item in batch:
                self._running_ids.discard(item.job.id)
                self._cancel_requests.discard(item.job.id)

    def run_started(self, batch: list[Running], replies: list[StartReply], queue: Queue) -> None:
        """Each started job fails, is canceled or joins the engine call, by what start read."""
        requests: list[InversionRequest] = []
        ready: list[Running] = []
        for item, reply in zip(batch, replies, strict=True):
            timeout = item.job.timeout
            if timeout is not None and timeout > 0:
                item.deadline = time.monotonic() + float(timeout)
            if item.error is not None:
                self.fail(item, queue, *item.error)
            elif reply.canceled:
                # Canceled between its dequeue and now: it never runs.
                self.cancel(item, queue, ErrorCode.CANCELED)
            else:
                assert item.payload is not None
                try:
                    image = jobs.image_from_bytes(reply.image, item.payload)
                except jobs.JobFailed as exc:
                    self.fail(item, queue, exc.code, exc.message)
                    continue
                requests.append(InversionRequest(image=image, params=item.payload.params))
                ready.append(item)
        if ready:
            self.run_requests(ready, requests, queue)

    def run_requests(
        self, batch: list[Running], requests: list[InversionRequest], queue: Queue
    ) -> None:
        total = progress_total(requests[0].params)

        last_write = [time.monotonic()]  # step 0 was written when the batch started

        def progress(step: int, steps: int) -> None:
            moment = time.monotonic()
            if (
                step == steps  # the last step is written with the result
                or step % self.settings.progress_every
                or moment - last_write[0] < self.settings.progress_interval_s
            ):
                return
            last_write[0] = moment
            with redis_outage_tolerated(self), self.connection.pipeline(transaction=False) as pipe:
                for item in batch:
                    if item.stop_code is None:
                        item.meta[META_PROGRESS] = {"step": step, "total": steps}
                        pipe.hset(item.job.key, "meta", JSONSerializer.dumps(item.meta))
                        publish_job_event(pipe, item.job.id)
                pipe.execute()
            with redis_outage_tolerated(self):
                self.keep_alive(batch)

        last_poll = [time.monotonic()]  # the flags were read when the batch started

        def check_canceled(active: list[int]) -> list[int]:
            requested = {batch[i].job.id for i in active} & self._cancel_requests
            moment = time.monotonic()
            if moment - last_poll[0] >= self.settings.cancel_check_interval_s:
                last_poll[0] = moment
                with redis_outage_tolerated(self):
                    flags = self.connection.mget([cancel_key(batch[i].job.id) for i in active])
                    requested |= {
                        batch[i].job.id for i, flag in zip(active, flags, strict=True) if flag
                    }
            stopped = []
            for index in active:
                if batch[index].job.id in requested:
                    batch[index].stop_code = ErrorCode.CANCELED
                elif moment > batch[index].deadline:
                    batch[index].stop_code = ErrorCode.TIMEOUT
                else:
                    continue
                stopped.append(index)
            return stopped

        started = time.perf_counter()
        try:
            results = invert(self.model, requests, progress=progress, check_canceled=check_canceled)
        except Exception as exc:
            self.free_memory()
            if len(batch) > 1:
                # Isolation: a batch that fails is split, so only a job that fails alone fails.
                self.log.warning("batch of %d failed (%s); splitting", len(batch), exc)
                half = len(batch) // 2
                for part in (slice(0, half), slice(half, None)):
                    self.run_requests(batch[part], requests[part], queue)
                return
            item = batch[0]
            if isinstance(exc, InvalidParameter):
                self.fail(item, queue, ErrorCode.INVALID_INPUT, str(exc))
            elif is_out_of_memory(exc):
                self.fail(item, queue, ErrorCode.GPU_OUT_OF_MEMORY, f"out of GPU memory: {exc}")
            else:
                self.fail(item, queue, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        self.batches_run += 1
        throughput = self.update_throughput(len(batch), time.perf_counter() - started)
        done: list[tuple[Running, Success]] = []
        for item, result in zip(batch, results, strict=True):
            if result is None:
                self.cancel(item, queue, item.stop_code or ErrorCode.CANCELED)
                continue
            try:
                success = Success(
                    result=result.to_safetensors(),
                    reconstruction_png=result.reconstruction_png,
                    metadata=result.metadata.model_dump(mode="json"),
                )
            except Exception as exc:
                self.fail(item, queue, ErrorCode.INTERNAL, f"serialising the result failed: {exc}")
                continue
            item.meta.pop(META_PROGRESS, None)
            item.meta[META_PROGRESS] = {"step": total, "total": total}
            item.meta[META_RESULT] = success.metadata
            item.meta[META_ENGINE_S] = round(result.timings.get("total_s", 0.0), 6)
            done.append((item, success))
        if done:
            self.finish(queue, done, throughput)

    def finish(
        self, queue: Queue, done: list[tuple[Running, Success]], throughput: str | None
    ) -> None:
        """Write the successes of a batch in one transaction; a job Redis refuses fails alone.

        A result larger than Redis takes in one value fails its job with `result_too_large`
        before anything is sent. Through an outage or a full Redis the worker waits (see
        `storing`); Redis still full after the wait fails the batch's jobs with
        `storage_full`. Any other refusal splits the batch, so that only a job whose own
        writes are refused fails. Failures are final: no other worker runs those jobs again.
        """
        done = self.drop_oversize(queue, done)
        if not done:
            return
        try:
            stored = storing.store(self, queue, done, throughput)
        except RedisResponseError as exc:
            if isinstance(exc, RedisOutOfMemoryError):
                for item, _ in done:
                    self.fail(item, queue, ErrorCode.STORAGE_FULL, f"Redis is full: {exc}")
                return
            if len(done) > 1:
                half = len(done) // 2
                self.finish(queue, done[:half], throughput)
                self.finish(queue, done[half:], None)
                return
            item = done[0][0]
            self.fail(item, queue, ErrorCode.INTERNAL, f"storing the result failed: {exc}")
            return
        for item, _ in stored:
            self.send_webhook(item, "succeeded")

    def drop_oversize(
        self, queue: Queue, done: list[tuple[Running, Success]], reread: bool = False
    ) -> list[tuple[Running, Success]]:
        """Fail the jobs whose result Redis cannot take in one value; the others remain.

        The limit is read once, and again (`reread`) after a write was cut off; a first
        read during an outage is left to the retry after it.
        """
        if self._max_value_bytes is None or reread:
            try:
                self._max_value_bytes = storing.max_value_bytes(self.connection)
            except storing.LOST:
                if reread:
                    raise
                return done
        limit = self._max_value_bytes
        fits = []
        for item, success in done:
            size = storing.largest_value(success)
            if size <= limit:
                fits.append((item, success))
                continue
            self.fail(
                item,
                queue,
                ErrorCode.RESULT_TOO_LARGE,
                f"the result is {size} bytes, over the {limit} bytes Redis takes in one value "
                "(its proto-max-bulk-len): ask for fewer steps, a smaller resolution, or no "
                "trajectory",
            )
        return fits

    def update_throughput(self, images: int, seconds: float) -> str | None:
        """This worker's images/s EWMA, as the record gateways estimate waits from."""
        if images <= 0 or seconds <= 0:
            return None
        rate = images / seconds
        previous = self.images_per_s
        if previous is not None:
            rate = THROUGHPUT_ALPHA * rate + (1 - THROUGHPUT_ALPHA) * previous
        self.images_per_s = rate
        return json.dumps({"images_per_s": self.images_per_s, "updated_at": time.time()})

    def notify(self, item: Running, status: str) -> None:
        """Signal a job's end that was not a success (successes signal in their transaction).

        Best effort: the job's status is recorded, and waiters read it too.
        """
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                signal_end(pipe, item.job, status)
                pipe.execute()
        except RedisError as exc:
            self.outages.warn("could not signal the end of job %s (%s)", item.job.id, exc)
        self.send_webhook(item, status)

    def send_webhook(self, item: Running, status: str) -> None:
        """Queue the job's webhook, if its submission asked for one."""
        url = item.payload.webhook_url if item.payload is not None else None
        if not url:
            return
        body: dict[str, Any] = {"id": item.job.id, "status": status}
        if item.meta.get(META_ERROR) and status != "succeeded":
            body["error"] = item.meta[META_ERROR]
        if status == "succeeded" and item.meta.get(META_RESULT):
            body["result"] = item.meta[META_RESULT]
        body["finished_at"] = datetime.now(timezone.utc).isoformat()
        self.webhooks.send(url, item.job.id, body)

    # -- endings --------------------------------------------------------------------------

    def fail(self, item: Running, queue: Queue, code: ErrorCode, message: str) -> None:
        """A job's final failure, with its code: retries are for jobs whose worker was lost."""
        job = item.job
        try:
            # First what Redis allows even when full (DEL): the job no longer needs them.
            self.connection.delete(input_key(job.id), cancel_key(job.id))
            item.meta[META_ERROR] = jobs.error_meta(code, message)
            job.meta = item.meta
            job.save_meta()
            error = jobs.JobFailed(code, message)
            job.retries_left = 0
            assert item.execution is not None
            self._finalize_failure(job, queue, item.execution, (type(error), error, None))
        except RedisError as exc:
            self.log.error(
                "could not record the failure of job %s (%s: %s): %s; it ends when its "
                "execution expires",
                job.id,
                code.value,
                message,
                exc,
            )
            return
        self.notify(item, "failed")

    def cancel(self, item: Running, queue: Queue, code: ErrorCode) -> None:
        """A job stopped alone: canceled by its client, or past its timeout (a failure)."""
        if code is ErrorCode.TIMEOUT:
            timeout = item.job.timeout
            self.fail(item, queue, code, f"the job ran past its timeout of {timeout} s")
            return
        job = item.job
        try:
            item.meta[META_ERROR] = jobs.error_meta(ErrorCode.CANCELED, "canceled by the client")
            job.meta = item.meta
            job.save_meta()
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe, execution=item.execution)
                pipe.execute()
            job.ended_at = now()
            if job.get_status(refresh=True) != JobStatus.CANCELED:
                job.cancel()
            expire_canceled(self.connection, queue, job)
        except RedisError as exc:
            self.log.error("could not record the cancel of job %s: %s", job.id, exc)
            return
        self.notify(item, "canceled")

    def free_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def describe(worker: InversionWorker) -> str:
    return json.dumps(
        {"name": worker.name, "model": worker.model.name, "max_batch_size": worker.max_batch_size}
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run `ddim-invert worker` or `python -m worker`")
