"""GET /v1/inversions/{id}/latents and /reconstruction: a succeeded job's result bytes."""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from fastapi import Response
from safetensors.numpy import load as load_safetensors

from ddim_inversion.contract import JobStatus
from ddim_inversion.errors import ErrorCode
from ddim_inversion.keys import reconstruction_key, result_key
from service import jobs, views
from service.deps import OwnerDep, RedisDep
from service.errors import ProblemError
from service.routes.v1 import INVERSIONS_PREFIX, PROBLEM, v1_router

router = v1_router(INVERSIONS_PREFIX, "inversions")


def _require_succeeded(state: JobStatus, what: str) -> None:
    """409 until the job succeeded: `not_finished` while it may still, else `no_result`."""
    if state in (JobStatus.QUEUED, JobStatus.RUNNING):
        raise ProblemError(409, ErrorCode.NOT_FINISHED, f"the job is {state.value}; poll it")
    if state is not JobStatus.SUCCEEDED:
        raise ProblemError(409, ErrorCode.NO_RESULT, f"the job {state.value}; it has no {what}")


@router.get(
    "/{job_id}/latents",
    summary="Download the latents of a succeeded job",
    response_class=Response,
    responses={
        200: {
            "description": "safetensors (latents, timesteps, trajectory) or .npy of latents",
            "content": {"application/octet-stream": {}},
        },
        404: PROBLEM,
        409: PROBLEM,
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
    _require_succeeded(jobs.status_of(job), "latents")
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
        404: PROBLEM,
        409: PROBLEM,
    },
)
def get_reconstruction(job_id: str, redis: RedisDep, owner: OwnerDep) -> Response:
    """404 if the job did not ask for `verify` or its result expired; 409 until it succeeds."""
    job, data = jobs.load_job_and(redis, job_id, owner, reconstruction_key(job_id))
    _require_succeeded(jobs.status_of(job), "reconstruction")
    if not views.submitted_params(job).get("verify"):
        raise ProblemError(404, ErrorCode.NOT_FOUND, "the job was not submitted with verify=true")
    if data is None:
        raise ProblemError(404, ErrorCode.NOT_FOUND, "the reconstruction has expired")
    return Response(
        content=data,
        media_type="image/png",
        headers={"Content-Disposition": f'inline; filename="{job_id}.reconstruction.png"'},
    )
