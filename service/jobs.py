"""The gateway's side of the queue protocol (ddim_inversion.contract): enqueue, load,
cancel and delete jobs, with the writes of the service's own beside RQ's.

No FastAPI here: plain functions over a Redis client and a queue handle, so that the
routes stay thin. RQ itself is behind service/rq_adapter.py; the status body is built in
service/views.py and the worker pool read in service/workers.py (their functions the
routes use are importable from here too).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import redis

from ddim_inversion.contract import META_ERROR, META_IDEMPOTENCY_KEY, META_OWNER, JobPayload
from ddim_inversion.errors import ErrorCode
from ddim_inversion.held_bytes import hash_bytes, record_bytes, settle_held_bytes
from ddim_inversion.keys import (
    ENDED_TTL_S,
    JOB_METRICS_KEY,
    cancel_key,
    ended_key,
    input_key,
    model_job_metrics_key,
    publish_job_event,
    reconstruction_key,
    result_key,
)
from ddim_inversion.params import InversionParams
from service import fairness, limits, protocol, rq_adapter
from service.errors import ProblemError
from service.rq_adapter import AlreadyEnqueued, StoredJob
from service.settings import GatewaySettings
from service.views import created_at, job_error, job_model, job_view, status_of
from service.workers import (
    estimate_wait_s,
    fresh_workers,
    images_per_s,
    live_workers,
)

__all__ = [
    "AlreadyEnqueued",
    "StoredJob",
    "cancel_queued",
    "created_at",
    "delete",
    "enqueue",
    "estimate_wait_s",
    "fresh_workers",
    "images_per_s",
    "job_error",
    "job_view",
    "live_workers",
    "load_job",
    "load_job_and",
    "status_of",
]

logger = logging.getLogger(__name__)


def enqueue(
    connection: redis.Redis,
    queue: rq_adapter.Queue,
    settings: GatewaySettings,
    params: InversionParams,
    rgb: np.ndarray,
    owner: str,
    job_id: str | None = None,
    webhook_url: str | None = None,
    also: Callable[[Any], object] | None = None,
    exclusive: bool = False,
    idempotency_key: str | None = None,
) -> StoredJob:
    """Store the image and enqueue the job in one MULTI/EXEC: a queued job never lacks its
    input, and one round trip does what took three. The job takes its fair place among
    other keys' jobs (service/fairness.py). `also` queues further writes that must land
    with the job (its admission's confirmation) on the same transaction.

    If `execute` raises, nothing was written, or (a reply lost in flight) everything was,
    and the input must then stay.

    `exclusive`: the id may be another request's (the same Idempotency-Key); only the
    first enqueues it, and AlreadyEnqueued tells the others. `idempotency_key` is kept in
    the job's meta, so that deleting the job deletes the key's record.
    """
    job_id = job_id or str(uuid.uuid4())
    height, width = rgb.shape[:2]
    payload = JobPayload(
        params=params, image_width=width, image_height=height, owner=owner, webhook_url=webhook_url
    )

    def store_input(pipe: Any) -> None:
        pipe.set(input_key(job_id), rgb.tobytes(), ex=settings.input_ttl_s)

    def place_fairly(pipe: Any) -> None:
        fairness.place(
            pipe,
            rq_adapter.queue_key(queue),
            rq_adapter.queue_name(queue),
            job_id,
            owner,
            settings.input_ttl_s,
        )
        if also is not None:
            also(pipe)

    return rq_adapter.enqueue(
        connection,
        queue,
        job_id,
        payload.model_dump(mode="json"),
        {META_OWNER: owner}
        if idempotency_key is None
        else {META_OWNER: owner, META_IDEMPOTENCY_KEY: idempotency_key},
        timeout_s=settings.job_timeout_s,
        result_ttl_s=settings.result_ttl_s,
        failure_ttl_s=settings.failure_ttl_s,
        max_retries=settings.max_retries,
        before=store_input,
        after=place_fairly,
        exclusive=exclusive,
    )


def _not_found(job_id: str) -> ProblemError:
    return ProblemError(404, ErrorCode.NOT_FOUND, f"no inversion job {job_id!r}")


def _check_id(job_id: str) -> None:
    """404 for an id that cannot name a job, before any Redis read."""
    try:
        canonical = str(uuid.UUID(job_id))
    except ValueError:
        raise _not_found(job_id) from None
    # Only the form the gateway writes names a job; RQ refuses some others (braces) with
    # a ValueError, which would be a 500.
    if canonical != job_id:
        raise _not_found(job_id)


def _owned(job_id: str, job: StoredJob | None, owner: str) -> StoredJob:
    """The job, or a 404: none, or another owner's alike."""
    if job is None or job.meta.get(META_OWNER, "") != owner:
        raise _not_found(job_id)
    return job


def load_job(connection: redis.Redis, job_id: str, owner: str) -> StoredJob:
    """The job, or a 404 problem: unknown, malformed id, or another owner's job alike."""
    _check_id(job_id)
    return _owned(job_id, rq_adapter.fetch(connection, job_id), owner)


def load_job_and(
    connection: redis.Redis, job_id: str, owner: str, key: str
) -> tuple[StoredJob, bytes | None]:
    """`load_job`, and the value at `key` (a result beside the job) in the same round trip.

    The value is read before the owner is checked, but only returned to its owner.
    """
    _check_id(job_id)
    job, value = rq_adapter.fetch_and_get(connection, job_id, key)
    return _owned(job_id, job, owner), value


def _canceled_writes(job: StoredJob, pipe: Any, done: rq_adapter.Cancellation) -> None:
    """The service's writes of a cancel, on its round trip (see `cancel_queued`)."""
    pipe.delete(input_key(job.id))
    # The DELETE route set the flag to outlive the job's timeout; not the job itself.
    pipe.expire(cancel_key(job.id), min(done.ttl_s, (job.timeout_s or 0) + 60))
    if done.here:
        # A job canceled before any worker saw it ends here: count it like the workers do.
        pipe.hincrby(JOB_METRICS_KEY, "ended:canceled", 1)
        model = job_model(job)
        if model is not None:
            pipe.hincrby(model_job_metrics_key(model), "ended:canceled", 1)
        pipe.rpush(ended_key(job.id), "canceled")
        pipe.expire(ended_key(job.id), min(ENDED_TTL_S, done.ttl_s))
        publish_job_event(pipe, job.id)
    else:
        logger.info("job %s was already canceled", job.id)


def cancel_queued(connection: redis.Redis, job: StoredJob, keep_s: float) -> None:
    """Take a queued job out of the queue for good and say why in its meta.

    It then expires like a failed job (`keep_s`, the failure TTL), with everything of its:
    the input goes now; the job's record, the cancel flag (kept for a worker that dequeued
    the job meanwhile) and the end signal expire with the job at the latest, and count in
    its key's held bytes until then (or until the job is deleted).
    """
    error = {"code": ErrorCode.CANCELED.value, "message": "canceled by the client"}
    rq_adapter.cancel(connection, job, {META_ERROR: error}, partial(_canceled_writes, job))
    kept = hash_bytes(connection, rq_adapter.job_key(job.id))
    kept += record_bytes(cancel_key(job.id), "1") + record_bytes(ended_key(job.id), "canceled")
    # Its input is deleted above: what the job keeps now is its record and signals.
    settle_held_bytes(connection, job.meta.get(META_OWNER, ""), job.id, kept, keep_s)


def delete(connection: redis.Redis, job: StoredJob, owner: str) -> None:
    """Forget a finished job: its result and input, the RQ job, its cancel flag and end
    signal, its Idempotency-Key record, and its share of its key's budgets.

    Works on a Redis that is out of memory (noeviction refuses every command that may need
    memory, and any MULTI): only deletions, each on its own, the largest values first.
    """
    connection.delete(
        result_key(job.id),
        reconstruction_key(job.id),
        input_key(job.id),
        cancel_key(job.id),
        ended_key(job.id),
    )
    rq_adapter.delete(job)
    limits.forget(connection, owner, job.id)
    key = job.meta.get(META_IDEMPOTENCY_KEY)
    if isinstance(key, str):
        protocol.forget_record(connection, owner, key, job.id)
