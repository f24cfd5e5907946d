"""Request building and response parsing shared by the sync and the async client.

Everything here is free of I/O, so that `InversionClient` and `AsyncInversionClient` differ
only in how they send a request and how they sleep.
"""

from __future__ import annotations

import base64
import email.utils
import json
import mimetypes
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import httpx
from pydantic import SecretStr

from ddim_inversion.params import submission_fields
from ddim_inversion_client.errors import InversionError, JobFailed
from ddim_inversion_client.settings import ClientSettings

ImageInput = str | Path | bytes | IO[bytes]
"""A path, the image's bytes, or a binary file object open for reading."""

TensorFormat = Literal["torch", "numpy"]
FileFormat = Literal["safetensors", "npy"]
BodyEncoding = Literal["form", "json"]
"""How a submission travels: multipart form data (the image as a file), or JSON (base64)."""
ProgressCallback = Callable[[int, int], None]

API_PATH = "/v1/inversions"
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
FAILED = frozenset({"failed", "canceled"})
RETRY_STATUSES = frozenset({429, 503})

# A request that never reached the gateway is safe to repeat, whatever its method; one that
# may have reached it (a read timeout, a dropped answer) is repeated only when idempotent,
# so a submission is never queued twice.
_UNSENT_ERRORS: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout)
_IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


@dataclass(frozen=True)
class Request:
    """One HTTP request, ready for httpx.Client.request or httpx.AsyncClient.request."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] | None = None
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    json: dict[str, Any] | None = None

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"headers": self.headers}
        for name in ("params", "data", "files", "json"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


class Transport:
    """Where and how requests go: base URL, auth header and retry policy."""

    def __init__(
        self,
        url: str | None,
        api_key: str | SecretStr | None,
        settings: ClientSettings | None,
    ) -> None:
        self.settings = settings or ClientSettings()
        self.base_url = (url or self.settings.url).rstrip("/")
        key = api_key if api_key is not None else self.settings.api_key
        self._api_key = key.get_secret_value() if isinstance(key, SecretStr) else key

    @property
    def timeout(self) -> float:
        return self.settings.timeout_s

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json, application/problem+json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def url(self, path: str) -> str:
        """An absolute URL from a path such as the status body's `urls.self`."""
        if path.startswith(("http://", "https://")):
            return path
        return self.base_url + (path if path.startswith("/") else "/" + path)

    # -- the requests of the API ---------------------------------------------------------

    def submit(
        self,
        image: ImageInput,
        prompt: str,
        params: Mapping[str, Any],
        body: BodyEncoding = "form",
    ) -> Request:
        check_parameters(params)
        if body not in ("form", "json"):
            raise ValueError(f"body must be 'form' or 'json', not {body!r}")
        filename, content, content_type = read_image(image)
        given = {"prompt": prompt} | {k: v for k, v in params.items() if v is not None}
        if body == "json":
            fields = {name: json_value(value) for name, value in given.items()}
            fields["image"] = base64.b64encode(content).decode("ascii")
            return Request("POST", self.url(API_PATH), self.headers(), json=fields)
        return Request(
            "POST",
            self.url(API_PATH),
            self.headers(),
            data={name: form_value(value) for name, value in given.items()},
            files={"image": (filename, content, content_type)},
        )

    def status(self, job_id: str) -> Request:
        return Request("GET", self.url(f"{API_PATH}/{job_id}"), self.headers())

    def latents(self, job_id: str, file_format: FileFormat) -> Request:
        params: dict[str, str] | None = (
            {"format": file_format} if file_format != "safetensors" else None
        )
        headers = self.headers() | {"Accept": "application/octet-stream, application/problem+json"}
        return Request("GET", self.url(f"{API_PATH}/{job_id}/latents"), headers, params=params)

    def delete(self, job_id: str) -> Request:
        return Request("DELETE", self.url(f"{API_PATH}/{job_id}"), self.headers())

    # -- retries -------------------------------------------------------------------------

    def retry_after_response(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before repeating a 429 or 503; None: do not repeat it."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.settings.max_retries:
            return None
        announced = parse_retry_after(response.headers.get("Retry-After"))
        return announced if announced is not None else self.backoff(attempt)

    def retry_after_error(self, request: Request, error: Exception, attempt: int) -> float | None:
        """Seconds to wait before repeating a request that got no answer; None: give up."""
        if attempt >= self.settings.max_retries or not isinstance(error, httpx.TransportError):
            return None
        if request.method not in _IDEMPOTENT and not isinstance(error, _UNSENT_ERRORS):
            return None
        return self.backoff(attempt)

    def backoff(self, attempt: int) -> float:
        return float(self.settings.backoff_s * 2**attempt)


def read_image(image: ImageInput) -> tuple[str, bytes, str]:
    """(filename, bytes, content type) of an upload; read once so that retries resend it."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        return path.name, path.read_bytes(), guess_type(path.name)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "image", bytes(image), "application/octet-stream"
    content = image.read()
    if not isinstance(content, bytes):
        raise TypeError("the image file must be opened in binary mode ('rb')")
    name = Path(str(getattr(image, "name", "image"))).name
    return name, content, guess_type(name)


def guess_type(name: str) -> str:
    # The gateway decides the format from the bytes; the type is a courtesy.
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def check_parameters(params: Mapping[str, Any]) -> None:
    """TypeError, before anything is sent, for a name that is not a submission's field (a
    misspelt parameter would otherwise come back as the gateway's 422)."""
    valid = sorted(set(submission_fields()) - {"prompt"})
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise TypeError(f"unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(valid)}")


def json_value(value: Any) -> Any:
    """A parameter as a JSON body's value: a (width, height) pair as its text, WxH."""
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]}x{value[1]}"
    return value


def form_value(value: Any) -> str:
    """A parameter as a multipart form field: JSON objects, true/false, WxH, text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]}x{value[1]}"
    return str(value)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (a number, or an HTTP date); None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def check(response: httpx.Response) -> httpx.Response:
    """The response when it succeeded; InversionError from its problem+json otherwise."""
    if response.status_code < 400:
        return response
    raise problem_error(response)


def problem_error(response: httpx.Response) -> InversionError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "code" in body:
        return InversionError(
            response.status_code,
            str(body["code"]),
            str(body.get("detail") or body.get("title") or ""),
            field=body.get("field"),
            problem=body,
        )
    reason = response.reason_phrase or "HTTP error"
    text = response.text[:500].strip() if response.content else ""
    return InversionError(response.status_code, "http_error", text or reason)


def connection_error(error: Exception) -> InversionError:
    return InversionError(None, "connection_error", f"{type(error).__name__}: {error}")


def job_json(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    if not isinstance(body, dict) or "id" not in body or "status" not in body:
        raise InversionError(response.status_code, "http_error", "the answer is not a job")
    return body


def progress_of(data: Mapping[str, Any]) -> tuple[int, int] | None:
    """(step, total) of a job: its progress while running, (steps, steps) once succeeded."""
    progress = data.get("progress")
    if isinstance(progress, dict) and "step" in progress and "total" in progress:
        return int(progress["step"]), int(progress["total"])
    if data.get("status") == "succeeded":
        steps = (data.get("params") or {}).get("num_inference_steps")
        if isinstance(steps, int):
            return steps, steps
    return None


def raise_if_failed(data: Mapping[str, Any]) -> None:
    """JobFailed for a failed or canceled job."""
    status = str(data.get("status"))
    if status in FAILED:
        error = data.get("error") or {}
        raise JobFailed(
            str(data.get("id")),
            status,
            str(error.get("code") or status),
            str(error.get("message") or f"the job {status}"),
        )


class ProgressReporter:
    """Calls `on_progress` once per change of (step, total)."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.last: tuple[int, int] | None = None

    def __call__(self, data: Mapping[str, Any]) -> None:
        if self.callback is None:
            return
        current = progress_of(data)
        if current is not None and current != self.last:
            self.last = current
            self.callback(*current)


class Deadline:
    """The end of `wait(timeout)`; None never ends."""

    def __init__(self, timeout: float | None) -> None:
        self.end = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout

    def sleep_for(self, poll_interval: float, job_id: str) -> float:
        """How long to sleep before the next poll; TimeoutError once the deadline passed."""
        if self.end is None:
            return poll_interval
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"job {job_id} did not finish within {self.timeout} s")
        return min(poll_interval, left)


def decode_tensors(data: bytes, tensor_format: TensorFormat) -> dict[str, Any]:
    """The tensors of a safetensors file; torch is imported only when asked for."""
    if tensor_format == "torch":
        from safetensors.torch import load as load_torch

        return dict(load_torch(data))
    if tensor_format == "numpy":
        from safetensors.numpy import load as load_numpy

        return dict(load_numpy(data))
    raise ValueError(f"format must be 'torch' or 'numpy', not {tensor_format!r}")


def safetensors_metadata(data: bytes) -> dict[str, Any]:
    """The header metadata of a result file, decoded as the engine wrote it.

    safetensors metadata is str -> str: text fields stay text, the rest is JSON.
    """
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    raw: dict[str, str] = header.get("__metadata__") or {}
    try:
        from ddim_inversion.contract import ResultMetadata

        text_fields = {
            name for name, info in ResultMetadata.model_fields.items() if info.annotation is str
        }
    except ImportError:  # pragma: no cover - the contract ships with the client
        text_fields = set()
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in text_fields:
            out[key] = value
            continue
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def result_dict(data: bytes, tensor_format: TensorFormat) -> dict[str, Any]:
    return {"tensors": decode_tensors(data, tensor_format), "metadata": safetensors_metadata(data)}
