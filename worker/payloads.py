"""A queued job's payload: only what a gateway queued runs, and its image comes back as the
array the engine takes.

`JOB_FUNCTION` (`worker.jobs.run_inversion`) is the name the gateway records as every job's
function. No worker imports or calls it: the worker runs a job only if it names exactly
that function with the one keyword argument `payload`, and nothing RQ would import, call,
enqueue or contact when ending it. Jobs queued by earlier versions carry the same name, so
they run on this worker after an upgrade. A plain `rq worker` cannot run these jobs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ddim_inversion.contract import JOB_FUNCTION, JobPayload
from ddim_inversion.errors import ErrorCode
from worker import rq_adapter
from worker.rq_adapter import Job


class JobFailed(Exception):
    """A job that fails alone, with a contract error code; the worker lives on."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


def parse_payload(kwargs: dict[str, Any]) -> JobPayload:
    try:
        return JobPayload.model_validate(kwargs["payload"])
    except Exception as exc:
        raise JobFailed(ErrorCode.INVALID_INPUT, f"the job's payload is not valid: {exc}") from None


def foreign(job: Job) -> str | None:
    """Why the job is not one a gateway queued, or None. Reads attributes only: nothing
    the job names is imported or called."""
    try:
        call = rq_adapter.call_of(job)
    except rq_adapter.UnreadableJob:
        return "its data is not a JSON-serialised RQ job"
    if call.function != JOB_FUNCTION or call.bound:
        return f"its function is {call.function!r}, not {JOB_FUNCTION}"
    if call.args or not isinstance(call.kwargs, dict) or set(call.kwargs) != {"payload"}:
        return "its arguments are not the one keyword argument `payload`"
    armed = rq_adapter.armed_with(job)
    if armed:
        return f"it has {' and '.join(armed)}"
    return None


def trusted_payload(job: Job) -> JobPayload:
    """The payload of a job a gateway queued; JobFailed(invalid_input) for any other job
    (one written straight into Redis), which must be disarmed before RQ ends it."""
    reason = foreign(job)
    if reason is not None:
        raise JobFailed(ErrorCode.INVALID_INPUT, f"not a job the service queued: {reason}")
    return parse_payload(rq_adapter.call_of(job).kwargs)


def image_from_bytes(data: bytes | str | None, payload: JobPayload) -> np.ndarray:
    """The (height, width, 3) array from the stored bytes, checked against the payload."""
    expected = payload.image_width * payload.image_height * 3
    if data is None:
        raise JobFailed(ErrorCode.INVALID_INPUT, "the job's image has expired or was never stored")
    if len(data) != expected:
        raise JobFailed(ErrorCode.INVALID_INPUT, "the job's image has the wrong size")
    raw = data if isinstance(data, bytes) else data.encode("latin-1")
    array = np.frombuffer(raw, dtype=np.uint8)
    return array.reshape(payload.image_height, payload.image_width, 3)


def error_meta(code: ErrorCode, message: str) -> dict[str, str]:
    """The job's `error` meta, as the gateway reports it."""
    return {"code": code.value, "message": message}
