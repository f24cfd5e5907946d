"""GET and DELETE /v1/inversions/{id}: a job's state; cancel it, or delete it once ended."""

from __future__ import annotations

from fastapi import Response, status

from ddim_inversion.contract import JobStatus
from ddim_inversion.keys import CANCEL_CHANNEL, cancel_key
from service import jobs
from service.deps import OwnerDep, RedisDep, SettingsDep
from service.routes.v1 import INVERSIONS_PREFIX, PROBLEM, v1_router
from service.schemas import JobView

router = v1_router(INVERSIONS_PREFIX, "inversions")


@router.get(
    "/{job_id}",
    response_model=JobView,
    response_model_exclude_none=True,
    summary="The state of a job",
    responses={404: PROBLEM},
)
def get_inversion(job_id: str, redis: RedisDep, settings: SettingsDep, owner: OwnerDep) -> JobView:
    """Queue position while queued, progress while running, result metadata or error after."""
    return jobs.job_view(jobs.load_job(redis, job_id, owner), redis, settings.worker_stale_s)


@router.delete(
    "/{job_id}",
    summary="Cancel a job, or delete a finished one and its result",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    response_model_exclude_none=True,
    responses={204: {"description": "Deleted with its result"}, 404: PROBLEM},
)
def delete_inversion(
    job_id: str, redis: RedisDep, settings: SettingsDep, owner: OwnerDep
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
        jobs.cancel_queued(redis, job, settings.failure_ttl_s)
    return jobs.job_view(jobs.load_job(redis, job_id, owner), redis, settings.worker_stale_s)
