"""A submission: validate, decode, admit, store and enqueue; then its answer.

The route (service/routes/inversions.py) reads the body (service/bodies.py), awaits
`accept` and speaks HTTP around it (Location, Prefer: wait, Idempotent-Replayed).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from fastapi import status
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.concurrency import run_in_threadpool

from ddim_inversion.contract import ModelInfo
from ddim_inversion.errors import ErrorCode
from ddim_inversion.params import InversionParams
from service import jobs, limits, pool, protocol, quotas, rq_adapter, uploads, workers
from service.bodies import Submission
from service.decode_pool import DecodePool, DecodeRequest
from service.errors import RETRY_AFTER_S, ProblemError
from service.schemas import JobAccepted, JobUrls

logger = logging.getLogger(__name__)


def answer(redis: Any, settings: Any, owner: str, job_id: str) -> tuple[int, Any]:
    """(status, body) of a submission's answer, from the job as it is now: the full status
    body (200) once it ended, else the acceptance (202), which needs no queue position."""
    job = jobs.load_job(redis, job_id, owner)
    state = jobs.status_of(job)
    if state.is_terminal:
        view = jobs.job_view(job, redis, settings.worker_stale_s)
        return status.HTTP_200_OK, view.model_dump(mode="json", exclude_none=True)
    accepted = JobAccepted(
        id=job_id, status=state, created_at=jobs.created_at(job), urls=JobUrls.for_job(job_id)
    )
    return status.HTTP_202_ACCEPTED, accepted.model_dump(mode="json")


async def accept(
    decoders: DecodePool,
    redis: Any,
    settings: Any,
    owner: str,
    metrics: Any,
    submission: Submission,
    idempotency_key: str | None,
) -> tuple[str, bool, tuple[int, Any]]:
    """A submission, from its body to its answer: (job id, whether an earlier one is
    replayed, (status, body)).

    `prepare` (in the threadpool), the image's decode (in a decoder process, awaited on
    the event loop: no thread waits on it), then `enqueue` and the answer (threadpool).
    An image refused gives back the Idempotency-Key `prepare` claimed.
    """
    prepared = await run_in_threadpool(prepare, redis, settings, owner, submission, idempotency_key)
    if prepared.replay is not None:
        return prepared.job_id, True, prepared.replay
    request = DecodeRequest(prepared.data, prepared.size, prepared.params.resize_mode)
    try:
        rgb = await decoders.decode(owner, request)
    except BaseException:
        try:
            await run_in_threadpool(give_back, redis, owner, prepared)
        except RedisError:  # the key lapses with its TTL; the refusal is what matters
            logger.warning("could not release Idempotency-Key of job %s", prepared.job_id)
        raise
    return await run_in_threadpool(
        enqueue_and_answer, redis, settings, owner, metrics, prepared, rgb
    )


@dataclass
class Prepared:
    """A submission checked up to its image's decode: what the rest of it needs."""

    job_id: str
    params: InversionParams
    webhook_url: str | None
    key: str | None
    data: bytes
    queue: Any
    model: ModelInfo | None
    size: tuple[int, int] | None
    replay: tuple[int, Any] | None = None
    """The answer of an earlier submission with the same Idempotency-Key and payload."""
    cost_rate: float | None = None
    """The fastest cost/s a live worker of the job's model measured; None before any did."""


def prepare(
    redis: Any,
    settings: Any,
    owner: str,
    submission: Submission,
    idempotency_key: str | None,
) -> Prepared:
    """Everything before the decode: cheap checks first; the job's model is chosen
    (service/pool.py: the one it names, else the default) and the job is checked against
    that model's record. The submission counts against the key's rate (replays too); an
    Idempotency-Key seen before answers its job. A refusal gives back the key it claimed.
    """
    params = uploads.build_params(submission.fields, settings)
    webhook_url = uploads.check_webhook_url(submission.webhook_url, settings)
    key = protocol.check_key(idempotency_key)
    data = uploads.read_image(submission.image, settings.max_upload_bytes)
    job_id = str(uuid.uuid4())
    if key is not None:
        digest = uploads.payload_hash(data, params, webhook_url)
        job_id, exists = protocol.claim(redis, owner, key, digest, job_id, settings.result_ttl_s)
        if exists:
            replay = answer(redis, settings, owner, job_id)
            return Prepared(job_id, params, webhook_url, key, b"", None, None, None, replay)
    try:
        known, live = pool.read_pool(redis, settings.worker_stale_s)
        name, model = pool.choose(params.model, known, settings.default_model)
        params = params.model_copy(update={"model": name})
        queue = pool.model_queue(redis, settings, name)
        depth = rq_adapter.queue_depth(queue)
        if depth >= settings.max_queue_depth:  # cheap, before decoding; admit() is exact
            raise ProblemError(
                429,
                ErrorCode.QUEUE_FULL,
                f"{depth} jobs of model {name!r} are waiting; the limit is "
                f"{settings.max_queue_depth}",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        quotas.check_resolution(params, settings, model)
        quotas.check_model_parameters(params, model)
        if model is not None and settings.prompt_overflow == "reject":
            uploads.check_prompt_tokens(redis, params, model)
        size = uploads.target_size(params, model)
        cost_rate = workers.model_cost_rate(redis, live, name)
    except (RedisConnectionError, RedisTimeoutError):
        raise
    except BaseException:
        if key is not None:
            protocol.release(redis, owner, key, job_id)
        raise
    return Prepared(job_id, params, webhook_url, key, data, queue, model, size, None, cost_rate)


def give_back(redis: Any, owner: str, prepared: Prepared) -> None:
    """Release the Idempotency-Key of a submission refused after `prepare`."""
    if prepared.key is not None:
        protocol.release(redis, owner, prepared.key, prepared.job_id)


def enqueue_and_answer(
    redis: Any,
    settings: Any,
    owner: str,
    metrics: Any,
    prepared: Prepared,
    rgb: np.ndarray,
) -> tuple[str, bool, tuple[int, Any]]:
    """`enqueue`, then, in the same worker thread, the answer."""
    job_id, replayed = enqueue(redis, settings, owner, metrics, prepared, rgb)
    return job_id, replayed, answer(redis, settings, owner, job_id)


def enqueue(
    redis: Any,
    settings: Any,
    owner: str,
    metrics: Any,
    prepared: Prepared,
    rgb: np.ndarray,
) -> tuple[str, bool]:
    """The job sized from its decoded image, admitted and queued: (job id, whether an
    earlier one is replayed).

    The job's place under every limit is reserved (limits.admit) only once its size is
    known. A refusal gives back what it took (admission, Idempotency-Key); a lost
    connection gives back nothing: the enqueue may have happened, a retry with the key
    finds or makes the one job, and an admission never enqueued lapses by itself.
    """
    job_id, key, params = prepared.job_id, prepared.key, prepared.params
    admitted = False
    try:
        size = quotas.size_job(params, settings, prepared.model, rgb, prepared.cost_rate)
        admitted = limits.admit(redis, settings, prepared.queue, owner, job_id, size)
        job = jobs.enqueue(
            redis,
            prepared.queue,
            settings,
            params,
            rgb,
            owner,
            job_id=job_id,
            webhook_url=prepared.webhook_url,
            also=partial(
                limits.confirm, settings=settings, owner=owner, job_id=job_id, now=time.time()
            ),
            exclusive=key is not None,
            idempotency_key=key,
        )
    except jobs.AlreadyEnqueued:
        return job_id, True
    except (RedisConnectionError, RedisTimeoutError):
        raise
    except BaseException:
        if admitted:
            limits.release(redis, owner, job_id)
        if key is not None:
            protocol.release(redis, owner, key, job_id)
        raise
    metrics.submissions.inc()
    return job.id, False
