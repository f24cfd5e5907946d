"""/v1/inversions: submit an image, poll the job, download the latents, cancel or delete."""

from __future__ import annotations

import io
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile, status
from safetensors.numpy import load as load_safetensors

import contract
from contract import ErrorCode, JobStatus
from service import jobs, limits, uploads
from service.deps import MetricsDep, OwnerDep, QueueDep, RedisDep, SettingsDep, get_owner
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
        413: _PROBLEM,
        415: _PROBLEM,
        422: _PROBLEM,
        429: _PROBLEM,
        503: _PROBLEM,
    },
)
def submit_inversion(
    response: Response,
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
) -> JobAccepted:
    """Validate everything a worker would refuse, store the normalised image, enqueue.

    Answers 202 with the job's URLs; poll `GET /v1/inversions/{id}` until it succeeds.
    """
    params = uploads.build_params(
        {
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
        },
        settings,
    )
    limits.check_submission(redis, settings, owner)
    depth = queue.count
    if depth >= settings.max_queue_depth:
        raise ProblemError(
            429,
            ErrorCode.QUEUE_FULL,
            f"{depth} jobs are waiting; the limit is {settings.max_queue_depth}",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    data = uploads.read_upload(image.file, settings.max_upload_bytes)
    decoded = uploads.decode_image(data, settings)
    workers = jobs.live_workers(redis, settings.worker_stale_s)
    rgb = uploads.normalise(decoded, params, workers[0] if workers else None)
    job = jobs.enqueue(redis, queue, settings, params, rgb, owner)
    limits.record_submission(redis, settings, owner, job.id)
    metrics.submissions.inc()
    urls = JobUrls.for_job(job.id)
    response.headers["Location"] = urls.self
    return JobAccepted(id=job.id, created_at=jobs.created_at(job), urls=urls)


@router.get(
    "/{job_id}",
    response_model=JobView,
    response_model_exclude_none=True,
    summary="The state of a job",
    responses={404: _PROBLEM},
)
def get_inversion(job_id: str, redis: RedisDep, queue: QueueDep, owner: OwnerDep) -> JobView:
    """Queue position while queued, progress while running, result metadata or error after."""
    return jobs.job_view(jobs.load_job(redis, job_id, owner), queue)


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
    job = jobs.load_job(redis, job_id, owner)
    state = jobs.status_of(job)
    if state in (JobStatus.QUEUED, JobStatus.RUNNING):
        raise ProblemError(409, ErrorCode.NOT_FINISHED, f"the job is {state.value}; poll it")
    if state is not JobStatus.SUCCEEDED:
        raise ProblemError(409, ErrorCode.NO_RESULT, f"the job {state.value}; it has no latents")
    data: bytes | None = redis.get(contract.result_key(job_id))  # type: ignore[assignment]
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
    # Set first: a worker may dequeue the job between the status read and the cancel.
    redis.set(contract.cancel_key(job_id), b"1", ex=settings.job_timeout_s + 60)
    state = jobs.status_of(job)
    if state is JobStatus.QUEUED:
        jobs.cancel_queued(redis, job)
    elif state.is_terminal:
        jobs.delete(redis, job)
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    job.refresh()
    return jobs.job_view(job, queue)
