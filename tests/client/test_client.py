"""The Python client and `ddim-invert submit` against a real gateway and worker.

What needs no worker (refusals, problems, a queued job canceled) runs against the real
gateway app in-process (tests/client/conftest.py). The retry tests use
httpx.MockTransport: they test the client's retry policy, which a healthy server never
exercises.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load as load_numpy

import ddim_inversion_client._common
import ddim_inversion_client.aio
import ddim_inversion_client.sync
from ddim_inversion_client import (
    AsyncInversionClient,
    AsyncJob,
    ClientSettings,
    InversionClient,
    InversionError,
    Job,
    JobFailed,
)
from tests.conftest import BIN, EVENT_GUARD_S, ROOT, SAMPLES, worker_threads
from tests.gateway_app import gateway_app
from tests.rounding import drift, size

CHELSEA = SAMPLES / "chelsea.png"


def engine_latents(tiny_model, prompt: str, **params: object) -> np.ndarray:
    """What `ddim-invert local` computes for chelsea.png, in-process."""
    from ddim_inversion import imaging
    from ddim_inversion.params import InversionParams
    from worker.engine.dispatch import invert
    from worker.engine.types import InversionRequest

    inversion = InversionParams(prompt=prompt, **params)
    size = inversion.resolution or tiny_model.native_resolution
    rgb = imaging.normalize(CHELSEA.read_bytes(), size, inversion.resize_mode)
    with worker_threads():
        (result,) = invert(tiny_model, [InversionRequest(rgb, inversion)])
    assert result is not None
    return result.latents.numpy()


# -- against the real service ----------------------------------------------------------


def test_submit_wait_latents_equal_the_engine(shared_service, tiny_model):
    base = shared_service.url
    seen: list[tuple[int, int]] = []
    with InversionClient(base) as inversions:
        job = inversions.submit(
            CHELSEA, "a photo of a cat", num_inference_steps=6, guidance_scale=2.0
        )
        assert isinstance(job, Job)
        assert job.status in ("queued", "running")
        assert job.wait(timeout=EVENT_GUARD_S, on_progress=lambda s, t: seen.append((s, t))) is job
        assert job.status == "succeeded", job.data
        assert job.data["result"]["latents_shape"] == [1, 4, 8, 8]
        assert seen and seen[-1] == (6, 6)
        assert all(total == 6 and 0 <= step <= 6 for step, total in seen)

        expected = engine_latents(
            tiny_model, "a photo of a cat", num_inference_steps=6, guidance_scale=2.0
        )
        latents = job.latents()
        import torch

        assert isinstance(latents, torch.Tensor)
        assert tuple(latents.shape) == (1, 4, 8, 8)
        # The worker's run and this one (maybe batched with another job): float32 rounding,
        # tests/rounding.py's drift for 6 steps at guidance 2 (1.2e-4 for |z| <= 1).
        tolerance = drift(6, 2.0, size(expected))
        assert np.abs(latents.numpy() - expected).max() <= tolerance

        array = job.latents(format="numpy")
        assert isinstance(array, np.ndarray)
        assert np.abs(array - expected).max() <= tolerance

        result = job.result(format="numpy")
        assert set(result["tensors"]) == {"latents", "timesteps"}
        assert result["metadata"]["prompt"] == "a photo of a cat"
        assert result["metadata"]["num_inference_steps"] == 6
        assert result["metadata"]["latents_shape"] == [1, 4, 8, 8]

        again = inversions.get(job.id)
        assert again.status == "succeeded"
        assert again.data["id"] == job.id


def test_image_as_bytes_and_file_object_and_params(shared_service):
    base = shared_service.url
    with InversionClient(base) as inversions:
        from_bytes = inversions.submit(
            CHELSEA.read_bytes(),
            "x",
            num_inference_steps=3,
            return_trajectory=True,
            resolution=(128, 64),
            scheduler={"timestep_spacing": "trailing"},
        )
        with CHELSEA.open("rb") as handle:
            from_file = inversions.submit(handle, "x", num_inference_steps=3)
        as_json = inversions.submit(
            CHELSEA,
            "x",
            body="json",
            num_inference_steps=3,
            return_trajectory=True,
            resolution=(128, 64),
            scheduler={"timestep_spacing": "trailing"},
        )
        tensors = from_bytes.wait(timeout=EVENT_GUARD_S).result()["tensors"]
        assert tuple(tensors["trajectory"].shape) == (4, 1, 4, 8, 16)
        assert from_bytes.data["params"]["scheduler"] == {"timestep_spacing": "trailing"}
        assert from_file.wait(timeout=EVENT_GUARD_S).status == "succeeded"
        # The JSON body (the image as base64) makes the same job, and the same latents.
        assert as_json.wait(timeout=EVENT_GUARD_S).data["params"] == from_bytes.data["params"]
        by_json = as_json.result(format="numpy")
        assert by_json["metadata"] == from_bytes.result(format="numpy")["metadata"]
        # Two jobs, maybe in different batches: float32 rounding (tests/rounding.py).
        tolerance = drift(3, 1.0, size(tensors["latents"]))
        assert np.abs(by_json["tensors"]["latents"] - tensors["latents"].numpy()).max() <= tolerance


def test_cancel_a_queued_job(in_process):
    with in_process() as inversions:  # no worker: the job stays queued
        job = inversions.submit(CHELSEA, "never", num_inference_steps=3)
        assert job.status == "queued"
        with pytest.raises(TimeoutError):
            job.wait(timeout=0.3)
        with pytest.raises(InversionError) as early:
            job.latents()
        assert (early.value.status, early.value.code) == (409, "not_finished")
        assert job.cancel() is job
        assert job.status == "canceled"
        with pytest.raises(JobFailed) as failed:
            job.wait(timeout=EVENT_GUARD_S)
        assert failed.value.code == "canceled"
        assert job.wait(timeout=EVENT_GUARD_S, raise_on_failure=False).status == "canceled"
        # A finished job is deleted by a second cancel().
        job.cancel()
        with pytest.raises(InversionError) as gone:
            job.refresh()
        assert (gone.value.status, gone.value.code) == (404, "not_found")


def test_problems_raise_inversion_error_with_code(in_process):
    with in_process() as inversions:
        with pytest.raises(InversionError) as invalid:
            inversions.submit(CHELSEA, "x", resolution=100)
        assert invalid.value.status == 422
        assert invalid.value.code == "validation_error"
        assert invalid.value.field == "resolution"
        assert invalid.value.detail
        with pytest.raises(InversionError) as media:
            inversions.submit(b"not an image at all", "x")
        assert (media.value.status, media.value.code) == (415, "unsupported_media_type")
        with pytest.raises(InversionError) as missing:
            inversions.get("6f1c2a53-3f7e-4f4e-9d7c-6b0c1f2b9a11")
        assert (missing.value.status, missing.value.code) == (404, "not_found")


def test_api_key_is_sent(in_process):
    key = "s3cret-client-key"
    keys = {"auth_disabled": False, "api_key_hashes": (hashlib.sha256(key.encode()).hexdigest(),)}
    with in_process(**keys) as anonymous, pytest.raises(InversionError) as refused:
        anonymous.submit(CHELSEA, "x", num_inference_steps=3)
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    with in_process(api_key=key, **keys) as keyed:
        job = keyed.submit(CHELSEA, "x", num_inference_steps=3)
        assert keyed.get(job.id).status == "queued"


def test_async_client_submit_wait_latents(shared_service, tiny_model):
    base = shared_service.url
    expected = engine_latents(tiny_model, "a photo of a cat", num_inference_steps=4)

    async def main() -> tuple[AsyncJob, np.ndarray, object, str]:
        async with AsyncInversionClient(base) as inversions:
            job = await inversions.submit(CHELSEA, "a photo of a cat", num_inference_steps=4)
            assert isinstance(job, AsyncJob)
            await job.wait(timeout=EVENT_GUARD_S)
            array = await job.latents(format="numpy")
            tensor = await job.latents()
            with pytest.raises(InversionError) as invalid:
                await inversions.submit(CHELSEA, "x", resolution=100)
            fetched = await inversions.get(job.id)
            return job, array, tensor, invalid.value.code + ":" + fetched.status

    job, array, tensor, codes = asyncio.run(main())
    assert job.status == "succeeded"
    # The worker's run and this one: float32 rounding (tests/rounding.py, 4 steps).
    tolerance = drift(4, 1.0, size(expected))
    assert np.abs(array - expected).max() <= tolerance
    assert np.abs(tensor.numpy() - expected).max() <= tolerance  # type: ignore[attr-defined]
    assert codes == "validation_error:succeeded"


def test_async_cancel_a_queued_job(fake_server):
    app = gateway_app(fake_server)  # in-process, on this test's event loop; no worker

    async def main() -> str:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport) as http,
            AsyncInversionClient("http://gateway.test", http=http) as inversions,
        ):
            job = await inversions.submit(CHELSEA, "never", num_inference_steps=3)
            await job.cancel()
            with pytest.raises(JobFailed):
                await job.wait(timeout=EVENT_GUARD_S)
            return job.status

    assert asyncio.run(main()) == "canceled"


def test_cli_submit_wait_writes_latents(shared_service, tmp_path: Path):
    base = shared_service.url
    out = tmp_path / "chelsea.safetensors"
    cli = subprocess.run(
        [
            str(BIN / "ddim-invert"),
            "submit",
            str(CHELSEA),
            "--prompt",
            "x",
            "--steps",
            "3",
            "--wait",
            "--out",
            str(out),
            "--url",
            base,
        ],
        env=shared_service.env,
        capture_output=True,
        text=True,
        timeout=EVENT_GUARD_S,
    )
    assert cli.returncode == 0, cli.stderr
    submitted, finished = (json.loads(line) for line in cli.stdout.splitlines())
    assert submitted["status"] in ("queued", "running")
    assert finished == {"id": submitted["id"], "status": "succeeded", "out": str(out)}
    tensors = load_numpy(out.read_bytes())
    assert tensors["latents"].shape == (1, 4, 8, 8)


def test_cli_submit_exit_codes(processes, service_env, tmp_path: Path):
    base = processes.gateway()
    command = [str(BIN / "ddim-invert"), "submit", str(CHELSEA), "--prompt", "x", "--url", base]
    refused = subprocess.run(
        [*command, "--resolution", "100"], env=service_env, capture_output=True, text=True
    )
    assert refused.returncode == 2
    assert "validation_error" in refused.stderr
    # No worker: the job stays queued, so waiting times out.
    waited = subprocess.run(
        [*command, "--wait", "--timeout", "0.5", "--out", str(tmp_path / "f.safetensors")],
        env=service_env,
        capture_output=True,
        text=True,
    )
    assert waited.returncode == 1
    assert "did not finish" in waited.stderr
    unreachable = subprocess.run(
        [*command[:-1], "http://127.0.0.1:9"],
        env=service_env | {"INVERSION_CLIENT_MAX_RETRIES": "0"},
        capture_output=True,
        text=True,
    )
    assert unreachable.returncode == 2
    assert "connection_error" in unreachable.stderr


# -- retries, with a mock transport ------------------------------------------------------

ACCEPTED = {
    "id": "4b7f2c1e-2f8e-4a57-9a51-0d3c7a3b9e10",
    "status": "queued",
    "created_at": "2025-01-01T12:00:00Z",
    "urls": {"self": "/v1/inversions/4b7f2c1e-2f8e-4a57-9a51-0d3c7a3b9e10"},
}


def problem(status: int, code: str, **headers: str) -> httpx.Response:
    body = {"status": status, "code": code, "detail": f"{code} detail", "title": "x"}
    return httpx.Response(
        status, json=body, headers={"content-type": "application/problem+json", **headers}
    )


class Script:
    """A MockTransport handler answering from a list, recording every request."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    recorded: list[float] = []

    async def async_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(ddim_inversion_client.sync.time, "sleep", recorded.append)
    monkeypatch.setattr(ddim_inversion_client.aio.asyncio, "sleep", async_sleep)
    return recorded


def mock_client(script: Script, **settings: object) -> InversionClient:
    config = ClientSettings(url="http://gateway.test", **settings)  # type: ignore[arg-type]
    return InversionClient(
        settings=config, http=httpx.Client(transport=httpx.MockTransport(script))
    )


def test_429_with_retry_after_then_202_succeeds_after_one_retry(sleeps):
    script = Script(
        problem(429, "rate_limited", **{"Retry-After": "0"}), httpx.Response(202, json=ACCEPTED)
    )
    job = mock_client(script).submit(b"png", "a cat", num_inference_steps=5, return_trajectory=True)
    assert job.id == ACCEPTED["id"]
    assert len(script.requests) == 2
    assert sleeps == [0.0]
    # The retry resends the whole multipart body: image and form fields.
    body = script.requests[1].read()
    assert b"a cat" in body and b"png" in body and b'name="return_trajectory"\r\n\r\ntrue' in body


def test_max_retries_is_honoured(sleeps):
    script = Script(problem(503, "service_unavailable", **{"Retry-After": "3"}))
    with pytest.raises(InversionError) as refused:
        mock_client(script, max_retries=2).submit(b"png", "x")
    assert (refused.value.status, refused.value.code) == (503, "service_unavailable")
    assert len(script.requests) == 3
    assert sleeps == [3.0, 3.0]

    never = Script(problem(429, "queue_full"))
    with pytest.raises(InversionError):
        mock_client(never, max_retries=0).submit(b"png", "x")
    assert len(never.requests) == 1


def test_backoff_is_exponential_without_retry_after(sleeps):
    script = Script(problem(429, "rate_limited"))
    with pytest.raises(InversionError):
        mock_client(script, max_retries=3, backoff_s=0.5).get("abc")
    assert sleeps == [0.5, 1.0, 2.0]


def test_other_errors_are_not_retried(sleeps):
    script = Script(problem(422, "validation_error"), httpx.Response(202, json=ACCEPTED))
    with pytest.raises(InversionError) as refused:
        mock_client(script).submit(b"png", "x")
    assert refused.value.code == "validation_error"
    assert len(script.requests) == 1 and sleeps == []
    proxy = Script(httpx.Response(502, text="Bad Gateway"))
    with pytest.raises(InversionError) as bad:
        mock_client(proxy).get("abc")
    assert (bad.value.status, bad.value.code) == (502, "http_error")


def test_connection_errors_are_retried_but_a_sent_submission_is_not(sleeps):
    script = Script(httpx.ConnectError("refused"), httpx.Response(202, json=ACCEPTED))
    assert mock_client(script).submit(b"png", "x").id == ACCEPTED["id"]
    assert len(script.requests) == 2

    lost = Script(httpx.ReadTimeout("no answer"), httpx.Response(202, json=ACCEPTED))
    with pytest.raises(InversionError) as failed:
        mock_client(lost).submit(b"png", "x")
    assert failed.value.code == "connection_error" and failed.value.status is None
    assert len(lost.requests) == 1  # it may have been queued: never submitted twice

    poll = Script(httpx.ReadTimeout("slow"), httpx.Response(200, json=ACCEPTED))
    assert mock_client(poll).get(ACCEPTED["id"]).status == "queued"
    assert len(poll.requests) == 2


def test_api_key_header_and_settings_from_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("INVERSION_CLIENT_URL", "http://env.test/")
    monkeypatch.setenv("INVERSION_CLIENT_API_KEY", "k-123")
    monkeypatch.setenv("INVERSION_CLIENT_MAX_RETRIES", "7")
    script = Script(httpx.Response(200, json=ACCEPTED))
    inversions = InversionClient(http=httpx.Client(transport=httpx.MockTransport(script)))
    assert inversions.url == "http://env.test"
    assert inversions.settings.max_retries == 7
    assert "k-123" not in repr(inversions.settings)
    inversions.get("abc")
    assert str(script.requests[0].url) == "http://env.test/v1/inversions/abc"
    assert script.requests[0].headers["authorization"] == "Bearer k-123"
    explicit = InversionClient(
        "http://other.test", api_key="k-9", http=httpx.Client(transport=httpx.MockTransport(script))
    )
    explicit.get("abc")
    assert script.requests[1].headers["authorization"] == "Bearer k-9"


def test_async_retries(sleeps):
    script = Script(
        problem(429, "rate_limited", **{"Retry-After": "0"}), httpx.Response(202, json=ACCEPTED)
    )

    async def main() -> str:
        settings = ClientSettings(url="http://gateway.test", max_retries=1)
        async with httpx.AsyncClient(transport=httpx.MockTransport(script)) as http:
            inversions = AsyncInversionClient(settings=settings, http=http)
            job = await inversions.submit(io.BytesIO(b"png"), "x")
            limited = Script(problem(429, "rate_limited", **{"Retry-After": "0"}))
            other = AsyncInversionClient(
                settings=settings,
                http=httpx.AsyncClient(transport=httpx.MockTransport(limited)),
            )
            with pytest.raises(InversionError):
                await other.get("abc")
            assert len(limited.requests) == 2
            return job.id

    assert asyncio.run(main()) == ACCEPTED["id"]
    assert len(script.requests) == 2


def test_form_values():
    form = ddim_inversion_client._common.form_value
    assert form(True) == "true" and form(False) == "false"
    assert json.loads(form({"steps_offset": 1})) == {"steps_offset": 1}
    assert form((768, 512)) == "768x512"
    assert form(2.5) == "2.5" and form("512") == "512"
    assert ddim_inversion_client._common.parse_retry_after("7") == 7.0
    assert ddim_inversion_client._common.parse_retry_after("soon") is None


def test_importing_the_client_does_not_import_torch():
    code = (
        "import sys; import ddim_inversion_client, ddim_inversion_client.cli; "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
