"""What the client raises: a refused request, or a job that ended without latents."""

from __future__ import annotations

from typing import Any


class InversionError(Exception):
    """The gateway refused a request (RFC 9457 problem+json), or it could not be reached.

    `status` is the HTTP status (None when no answer came), `code` the stable error code
    (`validation_error`, `not_found`, `rate_limited`, ...; `connection_error` when the gateway
    could not be reached), `detail` the human-readable explanation and `field` the parameter
    at fault, where the problem names one. `problem` is the whole problem body.
    """

    def __init__(
        self,
        status: int | None,
        code: str,
        detail: str,
        *,
        field: str | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        where = f" ({field})" if field else ""
        prefix = f"{status} " if status is not None else ""
        super().__init__(f"{prefix}{code}{where}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field
        self.problem = problem or {}


class JobFailed(Exception):
    """A job ended `failed` or `canceled`: `code` and `message` are the job's error."""

    def __init__(self, job_id: str, status: str, code: str, message: str) -> None:
        super().__init__(f"job {job_id} {status}: {code}: {message}")
        self.job_id = job_id
        self.status = status
        self.code = code
        self.message = message
