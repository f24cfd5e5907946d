"""A job's life as a worker writes it, without a model: the worker's own start, progress,
success, failure and cancel (worker.lifecycle, worker.ending, worker.rq_adapter), for
tests of what the gateway reads of a job. Only the engine's output is made up here."""

from __future__ import annotations

from typing import Any

import numpy as np
from redis import Redis
from safetensors.numpy import save as save_safetensors

from ddim_inversion.contract import META_ENGINE_S, META_PROGRESS, META_RESULT, ResultMetadata
from ddim_inversion.errors import ErrorCode
from ddim_inversion.keys import queue_name_for
from ddim_inversion.scheduler_config import SCHEDULER_DEFAULTS
from worker import payloads, rq_adapter
from worker.ending import Endings
from worker.job_state import Running, Success
from worker.lifecycle import start_batch, write_progress
from worker.rq_worker import BaseWorker
from worker.settings import WorkerSettings
from worker.webhooks import WebhookSender


def result_metadata(steps: int = 10) -> ResultMetadata:
    """What the engine reports of a 64x64 inversion on the tiny model."""
    return ResultMetadata(
        model="tiny",
        width=64,
        height=64,
        prompt="a cat",
        negative_prompt="",
        guidance_scale=1.0,
        token_count=4,
        truncated=False,
        encode_mode="mean",
        seed=None,
        num_inference_steps=steps,
        timesteps=list(range(1, 1000, 1000 // steps))[:steps],
        scheduler_config={**SCHEDULER_DEFAULTS, "clip_sample": False},
        latents_shape=[1, 4, 8, 8],
        trajectory_shape=None,
        dtype="float32",
    )


class WorkerWrites:
    """One worker's writes, job by job, on `connection` (a real or a fake Redis)."""

    def __init__(self, connection: Redis, queue_name: str = queue_name_for("tiny")) -> None:
        self.connection = connection
        self.settings = WorkerSettings(queue_name=queue_name)
        self.queue = rq_adapter.open_queue(connection, queue_name)
        self.worker = BaseWorker(
            [self.queue], connection=connection, execution_ttl_s=self.settings.lost_after_s
        )
        # Redis never goes away here: nothing waits for it, so nothing needs keeping alive.
        self.endings = Endings(
            self.worker, self.settings, WebhookSender.from_settings(self.settings), lambda _: None
        )
        self.running: dict[str, Running] = {}

    def start(self, job_id: str, step: int = 0, total: int = 10) -> Running:
        """Dequeue and start the job, as a batch of one; then its progress at `step`."""
        assert rq_adapter.claim(self.connection, self.queue, [job_id]) == [job_id]
        (job,) = rq_adapter.fetch_jobs(self.connection, [job_id])
        item = Running(job=job, payload=payloads.trusted_payload(job))
        (reply,) = start_batch(self.worker, self.queue, [item], total)
        assert not reply.canceled and reply.image is not None
        if step:
            with self.connection.pipeline(transaction=False) as pipe:
                write_progress(pipe, [item], step, total)
                pipe.execute()
        self.running[job_id] = item
        return item

    def _started(self, job_id: str) -> Running:
        return self.running.pop(job_id, None) or self.start(job_id)

    def succeed(
        self,
        job_id: str,
        reconstruction_png: bytes | None = None,
        throughput: str | None = None,
        **stored: Any,
    ) -> np.ndarray:
        """The job's success with made-up latents (and reconstruction); the latents.
        `stored`: result metadata fields stored as given (NaN too), over the made-up ones;
        `throughput`: the worker's THROUGHPUT_KEY record, written in the same transaction."""
        item = self._started(job_id)
        meta = result_metadata()
        latents = np.arange(256, dtype=np.float32).reshape(1, 4, 8, 8)
        data = save_safetensors(
            {"latents": latents, "timesteps": np.array(meta.timesteps, dtype=np.int64)},
            metadata=meta.to_header(),
        )
        success = Success(data, reconstruction_png, meta.model_dump(mode="json") | stored)
        item.meta[META_PROGRESS] = {"step": 10, "total": 10}
        item.meta[META_RESULT] = success.metadata
        item.meta[META_ENGINE_S] = 0.5
        self.endings.succeed(self.queue, [(item, success)], throughput)
        return latents

    def fail(self, job_id: str, code: ErrorCode, message: str) -> None:
        self.endings.fail(self._started(job_id), self.queue, code, message)

    def cancel(self, job_id: str) -> None:
        self.endings.cancel(self._started(job_id), self.queue, ErrorCode.CANCELED)

    def fail_undescribed(self, job_id: str) -> None:
        """RQ's record of a failure alone, as when the worker's error meta was never written."""
        item = self._started(job_id)
        assert item.execution is not None
        error = RuntimeError("the worker went away mid-failure")
        rq_adapter.record_failure(self.worker, self.queue, item.job, item.execution, error)
