"""Steps 4 and 5 of a batch: one engine call for the started jobs, then each job's end.

Between steps, progress goes to every job's meta, cancel requests (heard on the pub/sub
thread, and the flags read from Redis every `cancel_check_interval_s`) and deadlines are
checked, and a job that must stop drops out alone. An error in a batch of several (out of
GPU memory among them) splits it and runs the halves again, so only a job that fails
alone fails.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from ddim_inversion.contract import META_ENGINE_S, META_PROGRESS, META_RESULT
from ddim_inversion.errors import ErrorCode, InvalidParameter
from ddim_inversion.estimates import job_cost, unet_calls
from ddim_inversion.keys import GPU_SECONDS_KEY, cancel_key
from worker import rq_adapter
from worker.ending import Endings
from worker.engine.dispatch import invert
from worker.engine.types import InversionRequest, progress_total, resolution_of
from worker.fair_share import FairShare, owner_of, split_seconds
from worker.job_state import Running, Success
from worker.lifecycle import StartReply, write_progress
from worker.outages import AWAY_OR_FULL, tolerated
from worker.payloads import JobFailed, image_from_bytes
from worker.rq_adapter import Queue
from worker.rq_worker import BaseWorker
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from worker.models import LoadedModel

THROUGHPUT_ALPHA = 0.3
"""Weight of the newest batch in the EWMAs (images/s, cost/s) that gateways estimate waits
and run times from."""


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def first_total(batch: Sequence[Running]) -> int | None:
    """The progress total of the batch's runnable jobs (they share it), None if none is."""
    return next(
        (progress_total(i.payload.params) for i in batch if i.payload and not i.error), None
    )


class CancelRequests:
    """Cancels published for the jobs this worker is running, heard on the pub/sub thread."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.requested: set[str] = set()
        self._lock = threading.Lock()

    def heard(self, job_id: str) -> None:
        """On the pub/sub thread: remember a cancel of a job this worker is running."""
        with self._lock:
            if job_id in self.running:
                self.requested.add(job_id)

    @contextlib.contextmanager
    def watching(self, batch: Sequence[Running]) -> Iterator[None]:
        """Hear cancels for the batch's jobs while it runs. Entered before the start reads
        the cancel flags: a cancel set after that read is published after it too."""
        ids = {item.job.id for item in batch}
        with self._lock:
            self.running |= ids
        try:
            yield
        finally:
            with self._lock:
                self.running -= ids
                self.requested -= ids


class StepHooks:
    """The engine's callbacks for one call: progress writes and stop checks, throttled."""

    def __init__(
        self,
        worker: BaseWorker,
        settings: WorkerSettings,
        batch: Sequence[Running],
        cancels: CancelRequests,
        keep_alive: Callable[[Sequence[Running]], None],
    ) -> None:
        self.worker = worker
        self.settings = settings
        self.batch = batch
        self.cancels = cancels
        self.keep_alive = keep_alive
        self.last_write = time.monotonic()  # step 0 was written when the batch started
        self.last_poll = time.monotonic()  # the flags were read when the batch started
        self.done = 0.0  # the part of the progress made so far

    def progress(self, step: int, steps: int) -> None:
        self.done = step / steps if steps else 1.0
        moment = time.monotonic()
        if (
            step == steps  # the last step is written with the result
            or step % self.settings.progress_every
            or moment - self.last_write < self.settings.progress_interval_s
        ):
            return
        self.last_write = moment
        active = [item for item in self.batch if item.stop_code is None]
        with (
            tolerated(self.worker.outages),
            self.worker.connection.pipeline(transaction=False) as pipe,
        ):
            write_progress(pipe, active, step, steps)
            pipe.execute()
        with tolerated(self.worker.outages):
            self.keep_alive(self.batch)

    def check_canceled(self, active: list[int]) -> list[int]:
        """Of the active rows, those whose job must stop now (canceled, or past its timeout)."""
        batch = self.batch
        requested = {batch[i].job.id for i in active} & self.cancels.requested
        moment = time.monotonic()
        if moment - self.last_poll >= self.settings.cancel_check_interval_s:
            self.last_poll = moment
            with tolerated(self.worker.outages):
                flags = self.worker.connection.mget([cancel_key(batch[i].job.id) for i in active])
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
            batch[index].ran = self.done
            stopped.append(index)
        return stopped


class Runner:
    """Runs started batches through the engine and ends each of their jobs."""

    def __init__(
        self,
        worker: BaseWorker,
        model: LoadedModel,
        settings: WorkerSettings,
        endings: Endings,
        cancels: CancelRequests,
        keep_alive: Callable[[Sequence[Running]], None],
        share: FairShare,
    ) -> None:
        self.worker = worker
        self.model = model
        self.settings = settings
        self.endings = endings
        self.cancels = cancels
        self.keep_alive = keep_alive
        self.share = share
        self.batches_run = 0
        self.images_per_s: float | None = None
        self.cost_per_s: float | None = None

    def run(self, batch: list[Running], replies: list[StartReply], queue: Queue) -> None:
        """Each started job fails, is canceled or joins the engine call, by what start read."""
        requests: list[InversionRequest] = []
        ready: list[Running] = []
        for item, reply in zip(batch, replies, strict=True):
            timeout = rq_adapter.timeout_s(item.job)
            if timeout is not None:
                item.deadline = time.monotonic() + timeout
            if item.error is not None:
                self.endings.fail(item, queue, *item.error)
            elif reply.canceled:
                # Canceled between its dequeue and now: it never runs.
                self.endings.cancel(item, queue, ErrorCode.CANCELED)
            else:
                assert item.payload is not None
                try:
                    image = image_from_bytes(reply.image, item.payload)
                except JobFailed as exc:
                    self.endings.fail(item, queue, exc.code, exc.message)
                    continue
                requests.append(InversionRequest(image=image, params=item.payload.params))
                ready.append(item)
        if ready:
            self.run_requests(ready, requests, queue)

    def run_requests(
        self, batch: list[Running], requests: list[InversionRequest], queue: Queue
    ) -> None:
        """One engine call; a batch that fails is split, so only a job failing alone fails."""
        hooks = StepHooks(self.worker, self.settings, batch, self.cancels, self.keep_alive)
        started = time.perf_counter()
        try:
            results = invert(
                self.model, requests, progress=hooks.progress, check_canceled=hooks.check_canceled
            )
        except Exception as exc:
            self.charge(batch, time.perf_counter() - started)
            free_memory()
            if len(batch) > 1:
                self.worker.log.warning("batch of %d failed (%s); splitting", len(batch), exc)
                half = len(batch) // 2
                for part in (slice(0, half), slice(half, None)):
                    self.run_requests(batch[part], requests[part], queue)
                return
            self.endings.fail(batch[0], queue, *failure_of(exc))
            return
        self.batches_run += 1
        # A canceled row stopped early: only the rows run through count towards the rate.
        cost = sum(
            job_cost(r.params, self.model.info(), resolution_of(r.params, self.model))
            for r, result in zip(requests, results, strict=True)
            if result is not None
        )
        seconds = time.perf_counter() - started
        self.charge(batch, seconds)
        throughput = self.update_throughput(len(batch), cost, seconds)
        total = progress_total(requests[0].params)
        done: list[tuple[Running, Success]] = []
        for item, result in zip(batch, results, strict=True):
            if result is None:
                self.endings.cancel(item, queue, item.stop_code or ErrorCode.CANCELED)
                continue
            non_finite = result.non_finite()
            if non_finite:
                self.endings.fail(
                    item,
                    queue,
                    ErrorCode.NON_FINITE_RESULT,
                    f"the result's {', '.join(non_finite)} hold NaN or infinite values: the "
                    "schedule or the model overflowed; try result_dtype float32, another "
                    "scheduler or fewer steps",
                )
                continue
            try:
                success = Success(
                    result=result.to_safetensors(),
                    reconstruction_png=result.reconstruction_png,
                    metadata=result.metadata.model_dump(mode="json"),
                )
            except Exception as exc:
                message = f"serialising the result failed: {exc}"
                self.endings.fail(item, queue, ErrorCode.INTERNAL, message)
                continue
            item.meta[META_PROGRESS] = {"step": total, "total": total}
            item.meta[META_RESULT] = success.metadata
            item.meta[META_ENGINE_S] = round(result.timings.get("total_s", 0.0), 6)
            done.append((item, success))
        if done:
            self.endings.succeed(queue, done, throughput)

    def charge(self, batch: Sequence[Running], seconds: float) -> None:
        """The engine call's seconds, split between its rows' owners by the UNet calls each
        row made: to the fair share's account, and to the service-wide counter."""
        rows = [
            (owner_of(item.payload), unet_calls(item.payload.params) * item.ran)
            for item in batch
            if item.payload is not None
        ]
        seconds_by_owner = split_seconds(seconds, rows)
        self.share.account.charge(seconds_by_owner)
        try:
            with self.worker.connection.pipeline(transaction=False) as pipe:
                for owner, part in seconds_by_owner.items():
                    pipe.hincrbyfloat(GPU_SECONDS_KEY, owner, part)
                pipe.execute()
        except AWAY_OR_FULL as exc:
            # A metric: the batch's results matter more than a count lost in an outage.
            self.worker.outages.warn("GPU seconds not counted (%s)", exc)

    def update_throughput(self, images: int, cost: int, seconds: float) -> str | None:
        """This worker's images/s and cost/s (job_cost per second) EWMAs, as the record
        gateways estimate waits and run times from."""
        if images <= 0 or seconds <= 0:
            return None
        self.images_per_s = ewma(images / seconds, self.images_per_s)
        if cost > 0:
            self.cost_per_s = ewma(cost / seconds, self.cost_per_s)
        record = {"images_per_s": self.images_per_s, "updated_at": time.time()}
        if self.cost_per_s is not None:
            record["cost_per_s"] = self.cost_per_s
        return json.dumps(record)


def ewma(rate: float, previous: float | None) -> float:
    """The newest batch's rate weighed THROUGHPUT_ALPHA against the previous average."""
    if previous is None:
        return rate
    return THROUGHPUT_ALPHA * rate + (1 - THROUGHPUT_ALPHA) * previous


def failure_of(exc: Exception) -> tuple[ErrorCode, str]:
    """The code and message of a job that failed alone in the engine."""
    if isinstance(exc, InvalidParameter):
        return ErrorCode.INVALID_INPUT, str(exc)
    if is_out_of_memory(exc):
        return ErrorCode.GPU_OUT_OF_MEMORY, f"out of GPU memory: {exc}"
    return ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"
