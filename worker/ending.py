"""How each job of a batch ends: it succeeds (stored), fails with its code, or is canceled.

Each job ends exactly once, alone: its RQ records (rq_adapter), the service's keys, the
job-ended signal and metrics (lifecycle), and its webhook, if its submission asked for one.
Failures are final: retries are for jobs whose worker was lost, never for a job that
failed with a code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from redis.exceptions import RedisError
from redis.exceptions import ResponseError as RedisResponseError

from ddim_inversion.contract import META_ERROR, META_OWNER, META_RESULT
from ddim_inversion.errors import ErrorCode
from ddim_inversion.keys import cancel_key, input_key
from worker import rq_adapter, storing
from worker.job_state import Running
from worker.lifecycle import expire_canceled, signal_end
from worker.payloads import JobFailed, error_meta
from worker.rq_adapter import Queue
from worker.rq_worker import BaseWorker
from worker.settings import WorkerSettings
from worker.storing import Done
from worker.webhooks import WebhookSender


class Endings:
    """Ends the jobs of `worker`'s batches. `keep_alive` heartbeats jobs whose results wait
    for Redis to come back."""

    def __init__(
        self,
        worker: BaseWorker,
        settings: WorkerSettings,
        webhooks: WebhookSender,
        keep_alive: Callable[[Sequence[Running]], None],
    ) -> None:
        self.worker = worker
        self.connection = worker.connection
        self.settings = settings
        self.webhooks = webhooks
        self.keep_alive = keep_alive
        self.value_limit = storing.ValueLimit()

    def succeed(self, queue: Queue, done: Done, throughput: str | None) -> None:
        """Write the successes of a batch in one transaction; a job Redis refuses fails alone.

        A result larger than Redis takes in one value fails its job with `result_too_large`
        before anything is sent. Through an outage or a full Redis the worker waits (see
        `storing`); Redis still full after the wait fails the batch's jobs with
        `storage_full`. Any other refusal splits the batch, so that only a job whose own
        writes are refused fails.
        """
        done = self.drop_oversize(queue, done)
        if not done:
            return
        try:
            stored = storing.store(
                self.worker,
                queue,
                done,
                throughput,
                wait_s=self.settings.redis_outage_wait_s,
                recheck=lambda left: self.drop_oversize(queue, left, reread=True),
                keep_alive=self.keep_alive,
            )
        except storing.StillFull as full:
            for item, _ in full.done:
                self.fail(item, queue, ErrorCode.STORAGE_FULL, f"Redis is full: {full}")
            return
        except RedisResponseError as exc:
            if len(done) > 1:
                half = len(done) // 2
                self.succeed(queue, done[:half], throughput)
                self.succeed(queue, done[half:], None)
                return
            item = done[0][0]
            self.fail(item, queue, ErrorCode.INTERNAL, f"storing the result failed: {exc}")
            return
        for item, _ in stored:
            self.send_webhook(item, "succeeded")

    def drop_oversize(self, queue: Queue, done: Done, reread: bool = False) -> Done:
        """Fail the jobs whose result Redis cannot take in one value; the others remain."""
        limit = self.value_limit.read(self.connection, reread)
        fits, over = storing.split_oversize(done, limit)
        for item, success in over:
            self.fail(
                item,
                queue,
                ErrorCode.RESULT_TOO_LARGE,
                f"the result is {success.largest_value()} bytes, over the {limit} bytes Redis "
                "takes in one value (its proto-max-bulk-len): ask for fewer steps, a smaller "
                "resolution, or no trajectory",
            )
        return fits

    def fail(self, item: Running, queue: Queue, code: ErrorCode, message: str) -> None:
        """A job's final failure, with its code."""
        job = item.job
        try:
            # First what Redis allows even when full (DEL): the job no longer needs them.
            self.connection.delete(input_key(job.id), cancel_key(job.id))
            item.meta[META_ERROR] = error_meta(code, message)
            rq_adapter.write_meta(self.connection, job, item.meta)
            assert item.execution is not None
            rq_adapter.record_failure(
                self.worker, queue, job, item.execution, JobFailed(code, message)
            )
        except RedisError as exc:
            self.worker.log.error(
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
            timeout = rq_adapter.timeout_s(item.job)
            self.fail(item, queue, code, f"the job ran past its timeout of {timeout:g} s")
            return
        job = item.job
        try:
            item.meta[META_ERROR] = error_meta(ErrorCode.CANCELED, "canceled by the client")
            rq_adapter.write_meta(self.connection, job, item.meta)
            rq_adapter.record_cancel(self.worker, job, item.execution)
            expire_canceled(self.connection, queue, item)
        except RedisError as exc:
            self.worker.log.error("could not record the cancel of job %s: %s", job.id, exc)
            return
        self.notify(item, "canceled")

    def notify(self, item: Running, status: str) -> None:
        """Signal a job's end that was not a success (successes signal in their transaction).

        Best effort: the job's status is recorded, and waiters read it too.
        """
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                signal_end(pipe, item, status)
                pipe.execute()
        except RedisError as exc:
            self.worker.outages.warn("could not signal the end of job %s (%s)", item.job.id, exc)
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
        self.webhooks.send(url, item.job.id, body, owner=item.meta.get(META_OWNER, ""))
