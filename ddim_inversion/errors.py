"""The stable error codes a client can rely on, and the error of a parameter or a job."""

from __future__ import annotations

import enum

from pydantic import BaseModel


class ErrorCode(str, enum.Enum):
    """Stable codes: the HTTP `code` of a problem and the `code` of a failed job."""

    # A job's failure codes.
    INVALID_INPUT = "invalid_input"
    TIMEOUT = "timeout"
    GPU_OUT_OF_MEMORY = "gpu_out_of_memory"
    WORKER_LOST = "worker_lost"
    CANCELED = "canceled"
    INTERNAL = "internal"
    RESULT_TOO_LARGE = "result_too_large"
    """The result is larger than Redis takes in one value (its `proto-max-bulk-len`)."""
    NON_FINITE_RESULT = "non_finite_result"
    """The result holds NaN or infinite values (the model or the schedule overflowed):
    never stored as a success."""
    STORAGE_FULL = "storage_full"
    """Redis refused to store the result: out of memory (`maxmemory`); submit again later."""
    # Errors of a request, before any job exists.
    VALIDATION_ERROR = "validation_error"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    IMAGE_TOO_LARGE = "image_too_large"
    NOT_FOUND = "not_found"
    NOT_FINISHED = "not_finished"
    NO_RESULT = "no_result"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    QUEUE_FULL = "queue_full"
    QUOTA_EXCEEDED = "quota_exceeded"
    RUN_TIME_EXCEEDED = "run_time_exceeded"
    """The job's run time, estimated from the workers' measured speed, is over the job
    timeout: it could not finish."""
    SERVICE_UNAVAILABLE = "service_unavailable"


class InvalidParameter(ValueError):
    """A parameter that cannot be honoured; `field` names it, the message says what is valid."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class JobError(BaseModel):
    code: ErrorCode
    message: str
