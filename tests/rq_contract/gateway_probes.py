"""Job functions an RQ worker runs in the gateway adapter's contract tests: each reports
what the gateway would read of the job while it runs, or ends it one way or another."""

from __future__ import annotations

import time
from typing import Any

from rq import get_current_job

from service import rq_adapter


def report_while_running() -> dict[str, Any]:
    """The job's status field and the started registry, read through the adapter's names."""
    job = get_current_job()
    assert job is not None
    connection = job.connection
    queue = rq_adapter.open_queue(connection, job.origin)
    raw = connection.hget(rq_adapter.job_key(job.id), rq_adapter.STATUS_FIELD)
    return {
        "status": raw.decode(),
        "running": int(connection.zcard(rq_adapter.started_key(queue))),
        "fetched": rq_adapter.fetch(connection, job.id).status.value,
    }


def raise_error(message: str) -> None:
    raise ValueError(message)


def sleep(seconds: float) -> None:
    time.sleep(seconds)
