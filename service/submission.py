"""A submission's synchronous half: validate, admit, store and enqueue; then its answer.

The route (service/routes/inversions.py) reads the body (service/bodies.py), runs these in
the threadpool and speaks HTTP around them (Location, Prefer: wait, Idempotent-Replayed).
"""

from __future__ import annotations

import time
import uuid
from functools import partial
from typing import Any

from fastapi import status
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ddim_inversion.errors import ErrorCode
from service import jobs, limits, pool, protocol, quotas, rq_adapter, uploads
from service.bodies import Submission
from service.errors import RETRY_AFTER_S, ProblemError
from service.schemas import JobAccepted, JobUrls


def accept_and_answer(
    redis: Any,
    settings: Any,
    owner: str,
    metrics: Any,
    submission: Submission,
    idempotency_key: str | None,
) -> tuple[str, bool, tuple[int, Any]]:
    """`accept`, then, in the same worker thread, the answer: (job id, whether replayed,
    (status, body)); one threadpool hop for a submission that does not wait."""
    job_id, replayed = accept(redis, settings, owner, metrics, submission, idempotency_key)
    return job_id, replayed, answer(redis, settings, owner, job_id)


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


def accept(
    redis: Any,
    settings: Any,
    owner: str,
    metrics: Any,
    submission: Submission,
    idempotency_key: str | None,
) -> tuple[str, bool]:
    """The synchronous half of a submission: (job id, whether an earlier one is replayed).

    Cheap checks first; the job's model is chosen (service/pool.py: the one it names, else
    the default) and the job is checked against that model's record and queued in its
    queue. The image is decoded only for a submission within the rate, and
    the job's place under every limit is reserved (limits.admit) only once its size is
    known. A refusal gives back what it took (admission, Idempotency-Key); a lost
    connection gives back nothing: the enqueue may have happened, a retry with the key
    finds or makes the one job, and an admission never enqueued lapses by itself.
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
            return job_id, True
    admitted = False
    try:
        known, _live = pool.read_pool(redis, settings.worker_stale_s)
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
        decoded = uploads.decode_image(data, settings)
        if model is not None and settings.prompt_overflow == "reject":
            uploads.check_prompt_tokens(redis, params, model)
        rgb = uploads.normalise(decoded, params, model)
        size = quotas.size_job(params, settings, model, rgb)
        admitted = limits.admit(redis, settings, queue, owner, job_id, size)
        job = jobs.enqueue(
            redis,
            queue,
            settings,
            params,
            rgb,
            owner,
            job_id=job_id,
            webhook_url=webhook_url,
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
