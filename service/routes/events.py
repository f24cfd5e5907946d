"""GET /v1/inversions/{id}/events: a job's Server-Sent Events until it ends."""

from __future__ import annotations

from functools import partial
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ddim_inversion.contract import META_PROGRESS
from ddim_inversion.errors import ErrorCode
from service import jobs, protocol
from service.deps import ListenerDep, OwnerDep, RedisDep, SettingsDep
from service.errors import RETRY_AFTER_S, ProblemError
from service.routes.v1 import INVERSIONS_PREFIX, PROBLEM, v1_router
from service.schemas import JobView

router = v1_router(INVERSIONS_PREFIX, "inversions")


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
        404: PROBLEM,
        429: PROBLEM,
    },
)
async def inversion_events(
    job_id: str,
    redis: RedisDep,
    settings: SettingsDep,
    owner: OwnerDep,
    listener: ListenerDep,
) -> StreamingResponse:
    """Follow a job without polling: the same owner rules as `GET /v1/inversions/{id}`.

    A key holds at most `INVERSION_MAX_WAITERS_PER_KEY` streams and waits at once (429
    above); a stream lasts at most `INVERSION_MAX_STREAM_S`, then sends `reconnect`
    (`{id, after_s}`) and ends: open it again to go on following the job.
    """
    if not listener.admit(owner, protocol.waiter_limit(owner, settings)):
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
        return jobs.job_view(job, redis, settings.worker_stale_s), job.meta.get(META_PROGRESS)

    return protocol.HeldStreamingResponse(
        protocol.job_events(listener, job_id, ("view", owner), read, settings.max_stream_s),
        release=partial(listener.leave, owner),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
