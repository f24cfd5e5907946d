"""The status body of a job (JobView), read from the job as stored and the worker pool.

What the worker wrote (progress, result metadata, error) comes from the job's meta in the
contract's shapes; what RQ alone knows (a lost worker, a timeout) from rq_adapter.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import redis
from pydantic import ValidationError

from ddim_inversion.contract import (
    META_ERROR,
    META_PROGRESS,
    META_RESULT,
    JobStatus,
    Progress,
    ResultMetadata,
)
from ddim_inversion.errors import ErrorCode, JobError
from ddim_inversion.keys import THROUGHPUT_KEY, WORKERS_KEY
from service import rq_adapter, workers
from service.rq_adapter import StoredJob
from service.schemas import JobParams, JobUrls, JobView, Timings

logger = logging.getLogger(__name__)


def status_of(job: StoredJob) -> JobStatus:
    """The contract's five states (rq_adapter.STATUS_BY_RQ)."""
    return job.status


def job_error(job: StoredJob, status: JobStatus) -> JobError | None:
    """What the worker wrote, or what RQ recorded when the worker could not write it."""
    if status not in (JobStatus.FAILED, JobStatus.CANCELED):
        return None
    meta = job.meta.get(META_ERROR)
    if isinstance(meta, dict):
        try:
            return JobError.model_validate(meta)
        except ValidationError:
            logger.warning("job %s has an unreadable error meta %r", job.id, meta)
    if status is JobStatus.CANCELED:
        return JobError(code=ErrorCode.CANCELED, message="canceled")
    return rq_adapter.failure_of(job)


def created_at(job: StoredJob) -> datetime:
    """When the gateway created the job, timezone-aware."""
    return job.created_at or datetime.now(timezone.utc)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds(), 3) if start and end else None


def timings_of(job: StoredJob) -> Timings:
    queued = job.enqueued_at or job.created_at
    return Timings(
        queued_at=queued,
        started_at=job.started_at,
        finished_at=job.ended_at,
        queue_wait_s=_seconds(queued, job.started_at),
        run_s=_seconds(job.started_at, job.ended_at),
    )


def submitted_params(job: StoredJob) -> dict[str, Any]:
    """The parameters as submitted ({} if unreadable)."""
    raw = job.payload.get("params")
    return raw if isinstance(raw, dict) else {}


def _params_of(job: StoredJob, result: ResultMetadata | None) -> JobParams | None:
    raw = job.payload.get("params")
    if raw is None:
        return None
    try:
        params = JobParams.model_validate(raw)
    except ValidationError:
        logger.warning("job %s has unreadable params", job.id)
        return None
    if result is None:
        return params
    return params.model_copy(
        update={
            "resolved_resolution": (result.width, result.height),
            "resolved_scheduler_config": result.scheduler_config,
        }
    )


def _result_of(job: StoredJob, status: JobStatus) -> ResultMetadata | None:
    raw = job.meta.get(META_RESULT)
    if status is not JobStatus.SUCCEEDED or raw is None:
        return None
    try:
        return ResultMetadata.model_validate(raw)
    except ValidationError:
        logger.warning("job %s has unreadable result metadata", job.id)
        return None


def job_model(job: StoredJob) -> str | None:
    """The model the job runs on (None for a job queued before jobs named models)."""
    model = submitted_params(job).get("model")
    return model if isinstance(model, str) else None


def _position_and_workers(
    connection: redis.Redis, job: StoredJob, stale_s: float | None
) -> tuple[int | None, int | None, float | None]:
    """A queued job's 0-based place in its model's queue and, with `stale_s`, the live
    workers serving its model and their images per second together (from what each
    records per batch): one round trip for LPOS, the worker records and the rates.
    """
    queue = rq_adapter.open_queue(connection, job.queue_name)
    pipe = connection.pipeline(transaction=False)
    pipe.lpos(rq_adapter.queue_key(queue), job.id)
    if stale_s is not None:
        pipe.hgetall(WORKERS_KEY)
        pipe.hgetall(THROUGHPUT_KEY)
    position, *rest = pipe.execute()
    if position is None or stale_s is None:
        return position, None, None
    records, raw_rates = rest
    rates = workers.rates_by_worker(raw_rates)
    model = job_model(job)
    live = [w for w in workers.fresh_workers(records, stale_s) if model in (None, w.model.name)]
    return position, len(live), workers.summed_rate(rates.get(w.name) for w in live)


def job_view(job: StoredJob, connection: redis.Redis, stale_s: float | None = None) -> JobView:
    """The status body of a job, read from the job hash (plus, while queued, its position
    in its model's queue, the live workers serving that model and an estimated wait from
    their throughput; `stale_s` None: neither)."""
    status = status_of(job)
    position, serving, rate = None, None, None
    if status is JobStatus.QUEUED:
        position, serving, rate = _position_and_workers(connection, job, stale_s)
    result = _result_of(job, status)
    progress = None
    if status is JobStatus.RUNNING and isinstance(job.meta.get(META_PROGRESS), dict):
        try:
            progress = Progress.model_validate(job.meta[META_PROGRESS])
        except ValidationError:
            progress = None
    return JobView(
        id=job.id,
        status=status,
        created_at=created_at(job),
        queue_position=position,
        estimated_wait_s=workers.estimate_wait_s(position, rate),
        live_workers=serving,
        progress=progress,
        timings=timings_of(job),
        params=_params_of(job, result),
        result=result,
        error=job_error(job, status),
        urls=JobUrls.for_job(job.id),
    )
