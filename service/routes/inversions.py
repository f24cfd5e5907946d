"""/v1/inversions: submit an image, poll the job, download the latents, cancel or delete."""

from __future__ import annotations

import io
import time
import uuid
from functools import partial
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import (
    APIRouter,
    Depends,
    File,
    Form,
    Header,
    Request,
    Response,
    UploadFile,
    status,
)
from fastapi.responses import JSONResponse, StreamingResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from safetensors.numpy import load as load_safetensors
from starlette.concurrency import run_in_threadpool

from ddim_inversion.contract import META_PROGRESS, JobStatus
from ddim_inversion.errors import ErrorCode
from ddim_inversion.keys import CANCEL_CHANNEL, cancel_key, reconstruction_key, result_key
from service import auth, jobs, limits, protocol, quotas, uploads
from service.deps import (
    ListenerDep,
    MetricsDep,
    OwnerDep,
    QueueDep,
    RedisDep,
    SettingsDep,
    get_owner,
)
from service.errors import PROBLEM_MEDIA_TYPE, RETRY_AFTER_S, ProblemError
from service.schemas import JobAccepted, JobUrls, JobView

_PROBLEM = {"description": "Problem details (RFC 9457)", "content": {PROBLEM_MEDIA_TYPE: {}}}

router = APIRouter(
    prefix="/v1/inversions",
    tags=["inversions"],
    # First of every route's dependencies: a caller without a valid key gets 401 before
    # any 404 or 422 could tell it something.
    dependencies=[Depends(get_owner)],
    responses={401: _PROBLEM},
)


async def reject_unknown_form_fields(request: Request) -> None:
    """Runs on the already parsed form (Starlette caches it), before the route body."""
    form = await request.form()
    uploads.reject_unknown_fields(set(form.keys()))


def _field(description: str, example: str | None = None) -> Any:
    """An optional form field: absent means the contract's default."""
    return Form(description=description, examples=[example] if example else None)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    summary="Submit an image for DDIM inversion",
    dependencies=[Depends(reject_unknown_form_fields)],
    responses={
        200: {
            "model": JobView,
            "description": "The job ended within `Prefer: wait=N`, or an Idempotency-Key "
            "replay of an ended job: the full status body",
        },
        413: _PROBLEM,
        415: _PROBLEM,
        422: _PROBLEM,
        429: _PROBLEM,
        503: _PROBLEM,
    },
)
async def submit_inversion(
    request: Request,
    response: Response,
    listener: ListenerDep,
    redis: RedisDep,
    queue: QueueDep,
    settings: SettingsDep,
    owner: OwnerDep,
    metrics: MetricsDep,
    image: Annotated[UploadFile, File(description="PNG, JPEG, WEBP, BMP, TIFF or GIF.")],
    prompt: Annotated[str, Form(description="The text the image is inverted under.")],
    negative_prompt: Annotated[str | None, _field("Unconditional prompt for guidance.")] = None,
    num_inference_steps: Annotated[int | None, _field("DDIM inversion steps.", "50")] = None,
    guidance_scale: Annotated[float | None, _field("1.0: no guidance.", "1.0")] = None,
    resolution: Annotated[str | None, _field("N or WxH, multiples of 64.", "768x512")] = None,
    resize_mode: Annotated[str | None, _field("center_crop or stretch.", "center_crop")] = None,
    encode_mode: Annotated[str | None, _field("mean, or sample (needs seed).", "mean")] = None,
    seed: Annotated[int | None, _field("Seed for encode_mode=sample.")] = None,
    return_trajectory: Annotated[bool | None, _field("Also keep every step's latent.")] = None,
    result_dtype: Annotated[str | None, _field("float32 or float16.", "float32")] = None,
    scheduler: Annotated[
        str | None, _field("JSON object of DDIMInverseScheduler overrides.", '{"steps_offset": 1}')
    ] = None,
    refine_iterations: Annotated[
        int | None, _field("Fixed-point refinement iterations per step (0: off).", "0")
    ] = None,
    refine_tolerance: Annotated[
        float | None, _field("Relative change that ends a step's refinement.", "0.0001")
    ] = None,
    method: Annotated[
        str | None, _field("ddim, or null_text (needs guidance_scale > 1).", "ddim")
    ] = None,
    null_text_inner_steps: Annotated[
        int | None, _field("null_text: Adam iterations per step.", "10")
    ] = None,
    null_text_learning_rate: Annotated[
        float | None, _field("null_text: Adam learning rate.", "0.01")
    ] = None,
    null_text_early_stop: Annotated[
        float | None, _field("null_text: latent MSE that ends a step's optimisation.", "1e-05")
    ] = None,
    verify: Annotated[
        bool | None, _field("Sample back and decode: error, PSNR, reconstruction PNG.")
    ] = None,
    webhook_url: Annotated[
        str | None, _field("POSTed the job's end (allowed hosts only).", "https://example.com/hook")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Same key and payload: the same job, never a second one.",
        ),
    ] = None,
    prefer: Annotated[
        str | None, Header(description="`wait=N`: answer 200 if the job ends within N s.")
    ] = None,
) -> Any:
    """Validate everything a worker would refuse, store the normalised image, enqueue.

    Answers 202 with the job's URLs; poll `GET /v1/inversions/{id}` until it succeeds.
    With `Prefer: wait=N` it first waits up to N seconds (capped) and answers 200 with the
    full status body if the job ended; a key that already holds its limit of open waits
    and streams gets the 202 at once, without `Preference-Applied`. An `Idempotency-Key`
    seen before with the same payload answers the original job (200 once ended) and queues
    nothing.
    """
    fields = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "resolution": resolution,
        "resize_mode": resize_mode,
        "encode_mode": encode_mode,
        "seed": seed,
        "return_trajectory": return_trajectory,
        "result_dtype": result_dtype,
        "scheduler": scheduler,
        "refine_iterations": refine_iterations,
        "refine_tolerance": refine_tolerance,
        "method": method,
        "null_text_inner_steps": null_text_inner_steps,
        "null_text_learning_rate": null_text_learning_rate,
        "null_text_early_stop": null_text_early_stop,
        "verify": verify,
    }
    wait_s = protocol.preferred_wait(request.headers.getlist("prefer"), settings.max_prefer_wait_s)
    job_id, replayed, (code, body) = await run_in_threadpool(
        _accept_and_answer,
        redis,
        queue,
        settings,
        owner,
        metrics,
        image,
        fields,
        webhook_url,
        idempotency_key,
    )
    headers = {"Location": JobUrls.for_job(job_id).self}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if wait_s is not None and code == status.HTTP_202_ACCEPTED:
        # Over the key's limit of open waits the preference is not applied (RFC 7240): the
        # job is queued all the same, and the 202 says so at once.
        if listener.admit(owner, _waiter_limit(owner, settings)):
            headers["Preference-Applied"] = f"wait={wait_s}"
            try:
                waited = await protocol.wait_while_connected(
                    listener, job_id, wait_s, request.receive
                )
            finally:
                listener.leave(owner)
            if waited is None:  # the client is gone: nobody reads the answer
                return Response(status_code=status.HTTP_202_ACCEPTED, headers=headers)
            code, body = await run_in_threadpool(_answer, redis, queue, settings, owner, job_id)
    elif wait_s is not None:
        headers["Preference-Applied"] = f"wait={wait_s}"
    return JSONResponse(body, status_code=code, headers=headers)


def _waiter_limit(owner: str, settings: Any) -> int | None:
    """A key's limit of open waits and streams; none for the anonymous owner (auth
    disabled), like every per-key limit."""
    return None if owner == auth.ANONYMOUS else settings.max_waiters_per_key


def _accept_and_answer(
    redis: Any,
    queue: Any,
    settings: Any,
    owner: str,
    metrics: Any,
    image: UploadFile,
    fields: dict[str, Any],
    webhook_url: str | None,
    idempotency_key: str | None,
) -> tuple[str, bool, tuple[int, Any]]:
    """`_accept`, then, in the same worker thread, the answer: (job id, whether replayed,
    (status, body)); one threadpool hop for a submission that does not wait."""
    job_id, replayed = _accept(
        redis, queue, settings, owner, metrics, image, fields, webhook_url, idempotency_key
    )
    return job_id, replayed, _answer(redis, queue, settings, owner, job_id)


def _answer(redis: Any, queue: Any, settings: Any, owner: str, job_id: str) -> tuple[int, Any]:
    """(status, body) of a submission's answer, from the job as it is now: the full status
    body (200) once it ended, else the acceptance (202), which needs no queue position."""
    job = jobs.load_job(redis, job_id, owner)
    state = jobs.status_of(job)
    if state.is_terminal:
        view = jobs.job_view(job, queue, settings.worker_stale_s)
        return status.HTTP_200_OK, view.model_dump(mode="json", exclude_none=True)
    accepted = JobAccepted(
        id=job_id, status=state, created_at=jobs.created_at(job), urls=JobUrls.for_job(job_id)
    )
    return status.HTTP_202_ACCEPTED, accepted.model_dump(mode="json")


def _accept(
    redis: Any,
    queue: Any,
    settings: Any,
    owner: str,
    metrics: Any,
    image: UploadFile,
    fields: dict[str, Any],
    webhook_url: str | None,
    idempotency_key: str | None,
) -> tuple[str, bool]:
    """The synchronous half of a submission: (job id, whether an earlier one is replayed).

    Cheap checks first; the image is decoded only for a submission within the rate, and
    the job's place under every limit is reserved (limits.admit) only once its size is
    known. A refusal gives back what it took (admission, Idempotency-Key); a lost
    connection gives back nothing: the enqueue may have happened, a retry with the key
    finds or makes the one job, and an admission never enqueued lapses by itself.
    """
    params = uploads.build_params(fields, settings)
    webhook_url = uploads.check_webhook_url(webhook_url, settings)
    key = protocol.check_key(idempotency_key)
    data = uploads.read_upload(image.file, settings.max_upload_bytes)
    # Before the replay check: replays cost a request like any other.
    limits.count_submission(redis, settings, owner)
    job_id = str(uuid.uuid4())
    if key is not None:
        digest = uploads.payload_hash(data, params, webhook_url)
        job_id, exists = protocol.claim(redis, owner, key, digest, job_id, settings.result_ttl_s)
        if exists:
            return job_id, True
    admitted = False
    try:
        depth, workers = jobs.queue_depth_and_workers(redis, queue, settings.worker_stale_s)
        if depth >= settings.max_queue_depth:  # cheap, before decoding; admit() is exact
            raise ProblemError(
                429,
                ErrorCode.QUEUE_FULL,
                f"{depth} jobs are waiting; the limit is {settings.max_queue_depth}",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        worker = workers[0] if workers else None
        quotas.check_resolution(params, settings, worker)
        decoded = uploads.decode_image(data, settings)
        if worker is not None and settings.prompt_overflow == "reject":
            uploads.check_prompt_tokens(redis, params, worker)
        rgb = uploads.normalise(decoded, params, worker)
        size = quotas.size_job(params, settings, worker, rgb)
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


@router.get(
    "/{job_id}",
    response_model=JobView,
    response_model_exclude_none=True,
    summary="The state of a job",
    responses={404: _PROBLEM},
)
def get_inversion(
    job_id: str, redis: RedisDep, queue: QueueDep, settings: SettingsDep, owner: OwnerDep
) -> JobView:
    """Queue position while queued, progress while running, result metadata or error after."""
    return jobs.job_view(jobs.load_job(redis, job_id, owner), queue, settings.worker_stale_s)


@router.get(
    "/{job_id}/latents",
    summary="Download the latents of a succeeded job",
    response_class=Response,
    responses={
        200: {
            "description": "safetensors (latents, timesteps, trajectory) or .npy of latents",
            "content": {"application/octet-stream": {}},
        },
        404: _PROBLEM,
        409: _PROBLEM,
    },
)
def get_latents(
    job_id: str,
    redis: RedisDep,
    owner: OwnerDep,
    format: Literal["safetensors", "npy"] = "safetensors",
) -> Response:
    """The result bytes as the worker wrote them, or the latents alone as .npy."""
    job, data = jobs.load_job_and(redis, job_id, owner, result_key(job_id))
    state = jobs.status_of(job)
    if state in (JobStatus.QUEUED, JobStatus.RUNNING):
        raise ProblemError(409, ErrorCode.NOT_FINISHED, f"the job is {state.value}; poll it")
    if state is not JobStatus.SUCCEEDED:
        raise ProblemError(409, ErrorCode.NO_RESULT, f"the job {state.value}; it has no latents")
    if data is None:
        raise ProblemError(404, ErrorCode.NOT_FOUND, "the result has expired")
    if format == "npy":
        buffer = io.BytesIO()
        np.save(buffer, load_safetensors(data)["latents"], allow_pickle=False)
        data = buffer.getvalue()
    return Response(
        content=data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{job_id}.{format}"'},
    )


@router.get(
    "/{job_id}/reconstruction",
    summary="The reconstruction PNG of a succeeded job submitted with verify=true",
    response_class=Response,
    responses={
        200: {
            "description": "The latents sampled back and decoded, at the job's resolution",
            "content": {"image/png": {}},
        },
        404: _PROBLEM,
        409: _PROBLEM,
    },
)
def get_reconstruction(job_id: str, redis: RedisDep, owner: OwnerDep) -> Response:
    """404 if the job did not ask for `verify` or its result expired; 409 until it succeeds."""
    job, data = jobs.load_job_and(redis, job_id, owner, reconstruction_key(job_id))
    state = jobs.status_of(job)
    if state in (JobStatus.QUEUED, JobStatus.RUNNING):
        raise ProblemError(409, ErrorCode.NOT_FINISHED, f"the job is {state.value}; poll it")
    if state is not JobStatus.SUCCEEDED:
        raise ProblemError(
            409, ErrorCode.NO_RESULT, f"the job {state.value}; it has no reconstruction"
        )
    params = (job.kwargs or {}).get("payload", {}).get("params") or {}
    if not params.get("verify"):
        raise ProblemError(404, ErrorCode.NOT_FOUND, "the job was not submitted with verify=true")
    if data is None:
        raise ProblemError(404, ErrorCode.NOT_FOUND, "the reconstruction has expired")
    return Response(
        content=data,
        media_type="image/png",
        headers={"Content-Disposition": f'inline; filename="{job_id}.reconstruction.png"'},
    )


@router.delete(
    "/{job_id}",
    summary="Cancel a job, or delete a finished one and its result",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    response_model_exclude_none=True,
    responses={204: {"description": "Deleted with its result"}, 404: _PROBLEM},
)
def delete_inversion(
    job_id: str, redis: RedisDep, queue: QueueDep, settings: SettingsDep, owner: OwnerDep
) -> JobView | Response:
    """Queued: canceled, never runs (202). Running: stops at the next step (202).
    Finished, failed or canceled: deleted with its input and result (204)."""
    job = jobs.load_job(redis, job_id, owner)
    state = jobs.status_of(job)
    if state.is_terminal:
        # Only deletions: they free memory even when Redis is full.
        jobs.delete(redis, job, owner)
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    # Set first: a worker may dequeue the job between the status read and the cancel. The
    # message stops a running job at its next step; the flag also covers a worker that
    # missed it or dequeues the job later.
    with redis.pipeline(transaction=False) as pipe:
        pipe.set(cancel_key(job_id), b"1", ex=settings.job_timeout_s + 60)
        pipe.publish(CANCEL_CHANNEL, job_id)
        pipe.execute()
    if state is JobStatus.QUEUED:
        jobs.cancel_queued(redis, job)
    job.refresh()
    return jobs.job_view(job, queue, settings.worker_stale_s)


@router.get(
    "/{job_id}/events",
    summary="Server-Sent Events of a job until it ends",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "`text/event-stream`: `status` (the status body, on each change of "
            "status or queue position), `progress` (`{step, total}`, on each new step), then "
            "`end` (`{id, status}`) once the job is terminal, and the stream closes; "
            "`reconnect` (`{id, after_s}`) when the stream reached its lifetime",
            "content": {"text/event-stream": {}},
        },
        404: _PROBLEM,
        429: _PROBLEM,
    },
)
async def inversion_events(
    job_id: str,
    redis: RedisDep,
    queue: QueueDep,
    settings: SettingsDep,
    owner: OwnerDep,
    listener: ListenerDep,
) -> StreamingResponse:
    """Follow a job without polling: the same owner rules as `GET /v1/inversions/{id}`.

    A key holds at most `INVERSION_MAX_WAITERS_PER_KEY` streams and waits at once (429
    above); a stream lasts at most `INVERSION_MAX_STREAM_S`, then sends `reconnect`
    (`{id, after_s}`) and ends: open it again to go on following the job.
    """
    if not listener.admit(owner, _waiter_limit(owner, settings)):
        raise ProblemError(
            429,
            ErrorCode.RATE_LIMITED,
            f"this key already holds {settings.max_waiters_per_key} open event streams and "
            "waits on this gateway, its limit; close one, or poll the job instead",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    try:
        await run_in_threadpool(jobs.load_job, redis, job_id, owner)
    except BaseException:
        listener.leave(owner)
        raise

    def read() -> tuple[JobView, Any]:
        job = jobs.load_job(redis, job_id, owner)
        return jobs.job_view(job, queue, settings.worker_stale_s), job.meta.get(META_PROGRESS)

    return protocol.HeldStreamingResponse(
        protocol.job_events(listener, job_id, ("view", owner), read, settings.max_stream_s),
        release=partial(listener.leave, owner),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
