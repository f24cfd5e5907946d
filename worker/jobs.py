"""From an RQ job to an engine request and back: payloads in, results and errors out.

`run_inversion` is the function RQ records for every job (contract.JOB_FUNCTION). The
batching worker never calls it (it runs many jobs per UNet call), but a plain
`rq worker --serializer rq.serializers.JSONSerializer` with a model loaded through
`set_model` can, one job at a time, with the same results.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from redis import Redis
from rq.exceptions import DeserializationError
from rq.job import Job

from ddim_inversion.contract import JOB_FUNCTION, META_ERROR, META_RESULT, JobPayload
from ddim_inversion.errors import ErrorCode
from ddim_inversion.keys import input_key, reconstruction_key, result_key
from ddim_inversion.params import InversionParams
from worker.engine import InversionRequest, InversionResult, invert
from worker.models import LoadedModel

_model: LoadedModel | None = None


class JobFailed(Exception):
    """A job that fails alone, with a contract error code; the worker lives on."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


def set_model(model: LoadedModel) -> None:
    """The model `run_inversion` uses when RQ itself calls it."""
    global _model
    _model = model


def parse_payload(kwargs: dict[str, Any]) -> JobPayload:
    try:
        return JobPayload.model_validate(kwargs["payload"])
    except Exception as exc:
        raise JobFailed(ErrorCode.INVALID_INPUT, f"the job's payload is not valid: {exc}") from None


FOREIGN_FIELDS = (
    "success_callback_name",
    "failure_callback_name",
    "stopped_callback_name",
    "dependency_id",
    "dependency_ids",
    "webhooks",
)
"""Fields of an RQ job hash through which RQ imports and calls what a job names (callbacks,
while ending it), enqueues other jobs (dependencies) or POSTs (webhooks); gateways never
write them."""


def foreign(job: Job) -> str | None:
    """Why the job is not one a gateway queued, or None. Reads attributes only: nothing
    the job names is imported or called."""
    try:
        function, instance, args, kwargs = job.func_name, job.instance, job.args, job.kwargs
    except DeserializationError:
        return "its data is not a JSON-serialised RQ job"
    if function != JOB_FUNCTION or instance is not None:
        return f"its function is {function!r}, not {JOB_FUNCTION}"
    if args or not isinstance(kwargs, dict) or set(kwargs) != {"payload"}:
        return "its arguments are not the one keyword argument `payload`"
    # RQ's own names for what the job's hash holds: callbacks resolve from them, lazily.
    callbacks = {
        "success": job._success_callback_name,
        "failure": job._failure_callback_name,
        "stopped": job._stopped_callback_name,
    }
    named = [kind for kind, name in callbacks.items() if name]
    if named:
        return f"it has {' and '.join(named)} callbacks"
    if job._dependency_ids:
        return "it depends on other jobs"
    if job.webhooks:
        return "it has RQ webhooks"
    return None


def trusted_payload(job: Job) -> JobPayload:
    """The payload of a job a gateway queued; JobFailed(invalid_input) for any other job
    (one written straight into Redis), which must be `disarm`ed before RQ ends it."""
    reason = foreign(job)
    if reason is not None:
        raise JobFailed(ErrorCode.INVALID_INPUT, f"not a job the service queued: {reason}")
    return parse_payload(job.kwargs)


def disarm(job: Job) -> None:
    """Forget what a foreign job names, in memory and in its hash, so that no path of RQ's
    (failing it here, or the lost-job cleanup of any worker later) imports or calls it."""
    job._success_callback_name = job._failure_callback_name = job._stopped_callback_name = None
    job._success_callback = job._failure_callback = job._stopped_callback = None
    job._dependency_ids = []
    job.webhooks = []
    job.connection.hdel(job.key, *FOREIGN_FIELDS)


def load_image(connection: Redis, job_id: str, payload: JobPayload) -> np.ndarray:
    """The normalised RGB upload the gateway stored beside the job."""
    return image_from_bytes(connection.get(input_key(job_id)), payload)  # type: ignore[arg-type]


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


def request_for(connection: Redis, job_id: str, payload: JobPayload) -> InversionRequest:
    return InversionRequest(image=load_image(connection, job_id, payload), params=payload.params)


def store_result(connection: Redis, job_id: str, result: InversionResult, ttl: int | None) -> dict:
    """Write the safetensors bytes with the job's result TTL; return what the job reports."""
    data = result.to_safetensors()
    expiry = ttl if ttl is not None and ttl > 0 else None
    connection.set(result_key(job_id), data, ex=expiry)
    if result.reconstruction_png is not None:
        connection.set(reconstruction_key(job_id), result.reconstruction_png, ex=expiry)
    connection.delete(input_key(job_id))
    return result.metadata.model_dump(mode="json")


def error_meta(code: ErrorCode, message: str) -> dict[str, str]:
    return {"code": code.value, "message": message}


def run_inversion(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ's entry point for one job, when a plain RQ worker runs it."""
    from rq import get_current_job

    job = get_current_job()
    if job is None or _model is None:
        raise RuntimeError("run_inversion runs inside an RQ worker that called set_model()")
    parsed = parse_payload({"payload": payload})
    try:
        request = request_for(job.connection, job.id, parsed)
        (result,) = invert(_model, [request])
    except JobFailed as exc:
        job.meta[META_ERROR] = error_meta(exc.code, exc.message)
        job.save_meta()
        raise
    assert result is not None
    metadata = store_result(job.connection, job.id, result, job.result_ttl)
    job.meta[META_RESULT] = metadata
    job.save_meta()
    return metadata


__all__ = [
    "InversionParams",
    "JobFailed",
    "disarm",
    "error_meta",
    "foreign",
    "image_from_bytes",
    "load_image",
    "parse_payload",
    "request_for",
    "run_inversion",
    "set_model",
    "store_result",
    "trusted_payload",
]
