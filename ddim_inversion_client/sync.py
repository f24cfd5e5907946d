"""The blocking client: `InversionClient` submits images, `Job` follows one job."""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from pydantic import SecretStr

from ddim_inversion_client import _common
from ddim_inversion_client._common import (
    BodyEncoding,
    FileFormat,
    ImageInput,
    ProgressCallback,
    Request,
    TensorFormat,
)
from ddim_inversion_client.settings import ClientSettings


class InversionClient:
    """A client of the DDIM inversion service, on `httpx.Client`.

    `url` and `api_key` default to the settings (INVERSION_CLIENT_URL,
    INVERSION_CLIENT_API_KEY). Requests answered 429 or 503, and requests that could not
    connect, are repeated up to `settings.max_retries` times, waiting `Retry-After` seconds
    when the gateway says so and an exponential backoff otherwise. Pass `http` to use your own
    `httpx.Client` (it is then not closed by `close()`).

        with InversionClient("http://127.0.0.1:8000") as client:
            job = client.submit("cat.png", "a photo of a cat", num_inference_steps=50)
            latents = job.wait().latents()
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | SecretStr | None = None,
        *,
        settings: ClientSettings | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self._transport = _common.Transport(url, api_key, settings)
        self._owns_http = http is None
        self._http = http or httpx.Client(timeout=self._transport.timeout)

    @property
    def url(self) -> str:
        """The gateway's base URL."""
        return self._transport.base_url

    @property
    def settings(self) -> ClientSettings:
        return self._transport.settings

    def submit(
        self, image: ImageInput, prompt: str, *, body: BodyEncoding = "form", **params: Any
    ) -> Job:
        """Queue an inversion of `image` under `prompt`; answers at once with the queued job.

        `params` are the fields of `POST /v1/inversions` besides the image and the prompt:
        the README's parameter table, generated from `InversionParams` and
        `SubmissionOptions` (ddim_inversion/params.py). None means the service's default;
        `resolution` may also be a (width, height) pair. A name that is not a field raises
        TypeError, naming the valid ones, before anything is sent. `body` is "form"
        (multipart, the image as a file) or "json" (the image as base64).
        Raises InversionError when the gateway refuses the submission.
        """
        request = self._transport.submit(image, prompt, params, body)
        return Job(self, _common.job_json(self._send(request)))

    def get(self, job_id: str) -> Job:
        """The job with this id, as it is now (InversionError `not_found` if unknown)."""
        return Job(self, self._status(job_id))

    def close(self) -> None:
        """Close the HTTP connections, unless the httpx.Client was passed in."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> InversionClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- what Job uses -------------------------------------------------------------------

    def _status(self, job_id: str) -> dict[str, Any]:
        return _common.job_json(self._send(self._transport.status(job_id)))

    def _latents_bytes(self, job_id: str, file_format: FileFormat) -> bytes:
        return self._send(self._transport.latents(job_id, file_format)).content

    def _delete(self, job_id: str) -> dict[str, Any] | None:
        response = self._send(self._transport.delete(job_id))
        return None if response.status_code == 204 else _common.job_json(response)

    def _send(self, request: Request) -> httpx.Response:
        """One request, repeated as the retry policy allows; InversionError when refused."""
        attempt = 0
        while True:
            try:
                response = self._http.request(request.method, request.url, **request.kwargs())
            except httpx.TransportError as exc:
                delay = self._transport.retry_after_error(request, exc, attempt)
                if delay is None:
                    raise _common.connection_error(exc) from exc
            else:
                delay = self._transport.retry_after_response(response, attempt)
                if delay is None:
                    return _common.check(response)
                response.close()
            attempt += 1
            time.sleep(delay)


class Job:
    """One inversion job: `id`, `status` and `data` (the last status body of the gateway)."""

    def __init__(self, client: InversionClient, data: dict[str, Any]) -> None:
        self._client = client
        self.data = data

    @property
    def id(self) -> str:
        return str(self.data["id"])

    @property
    def status(self) -> str:
        """queued, running, succeeded, failed or canceled."""
        return str(self.data["status"])

    @property
    def done(self) -> bool:
        """Whether the job has ended (succeeded, failed or canceled)."""
        return self.status in _common.TERMINAL

    @property
    def progress(self) -> tuple[int, int] | None:
        """(step, total) while running, (steps, steps) once succeeded, else None."""
        return _common.progress_of(self.data)

    def refresh(self) -> Job:
        """Read the job's status again; returns the job itself."""
        self.data = self._client._status(self.id)
        return self

    def wait(
        self,
        timeout: float | None = None,
        poll_interval: float = 0.2,
        on_progress: ProgressCallback | None = None,
        *,
        raise_on_failure: bool = True,
    ) -> Job:
        """Poll until the job ends; returns the job itself.

        `on_progress(step, total)` is called whenever the progress changes. Raises
        TimeoutError after `timeout` seconds (None: no limit), and JobFailed when the job
        failed or was canceled, unless `raise_on_failure` is false.
        """
        deadline = _common.Deadline(timeout)
        report = _common.ProgressReporter(on_progress)
        report(self.data)
        while not self.done:
            time.sleep(deadline.sleep_for(poll_interval, self.id))
            self.refresh()
            report(self.data)
        if raise_on_failure:
            _common.raise_if_failed(self.data)
        return self

    def latents(self, format: TensorFormat = "torch") -> Any:
        """The latents (1, C, H/8, W/8) as a torch tensor or, with format="numpy", an array.

        InversionError `not_finished` (409) while the job runs, `no_result` if it failed.
        """
        return self.tensors(format)["latents"]

    def tensors(self, format: TensorFormat = "torch") -> dict[str, Any]:
        """Every tensor of the result: latents, timesteps, when asked trajectory, and what the
        method adds (null_embeddings, latents_pair, noise_maps, noisy_latents)."""
        return _common.decode_tensors(self.safetensors(), format)

    def result(self, format: TensorFormat = "torch") -> dict[str, Any]:
        """`{"tensors": {name: tensor}, "metadata": {...}}` of the result file."""
        return _common.result_dict(self.safetensors(), format)

    def safetensors(self) -> bytes:
        """The result file's bytes, as the worker wrote them."""
        return self._client._latents_bytes(self.id, "safetensors")

    def download(self, path: str | Path) -> Path:
        """Write the result file (safetensors) to `path`; returns the path."""
        target = Path(path)
        target.write_bytes(self.safetensors())
        return target

    def cancel(self) -> Job:
        """Cancel a queued or running job, or delete a finished one with its result.

        A running job stops at its next step: `wait()` then raises JobFailed (canceled).
        """
        data = self._client._delete(self.id)
        if data is not None:
            self.data = data
        else:
            self.data = {**self.data, "deleted": True}
        return self

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, status={self.status!r})"
