"""The fidelity parameters at the gateway: every one reaches the queued payload, and
`GET /v1/inversions/{id}/reconstruction` serves a verify job's PNG."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from ddim_inversion.contract import JobPayload
from ddim_inversion.errors import ErrorCode
from ddim_inversion.keys import reconstruction_key
from ddim_inversion.params import InversionParams
from tests.service.helpers import assert_problem, fetch_job


def queued_params(redis, job_id: str) -> InversionParams:
    payload = JobPayload.model_validate(fetch_job(redis, job_id).kwargs["payload"])
    return payload.params


def test_refine_null_text_and_verify_fields_reach_the_payload(client, submit, redis, small_png):
    response = submit(
        client,
        small_png,
        guidance_scale="7.5",
        refine_iterations="3",
        refine_tolerance="1e-6",
        method="null_text",
        null_text_inner_steps="5",
        null_text_learning_rate="0.05",
        null_text_early_stop="1e-4",
        verify="true",
    )
    assert response.status_code == 202, response.text
    params = queued_params(redis, response.json()["id"])
    assert params == InversionParams(
        model="stable-diffusion-v1-5",
        prompt="a cat",
        guidance_scale=7.5,
        refine_iterations=3,
        refine_tolerance=1e-6,
        method="null_text",
        null_text_inner_steps=5,
        null_text_learning_rate=0.05,
        null_text_early_stop=1e-4,
        verify=True,
    )
    # Every contract parameter is a form field of the route (none dropped silently).
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/inversions"]["post"]["requestBody"]["content"]
    properties = next(iter(body.values()))["schema"]
    if "$ref" in properties:
        name = properties["$ref"].rsplit("/", 1)[-1]
        properties = schema["components"]["schemas"][name]
    assert set(InversionParams.model_fields) <= set(properties["properties"])


def test_defaults_are_plain_ddim_without_verify(client, submit, redis, small_png):
    response = submit(client, small_png)
    params = queued_params(redis, response.json()["id"])
    assert params.method == "ddim" and params.verify is False


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"method": "null_text"}, "guidance_scale"),
        ({"method": "null_text", "guidance_scale": "1.0"}, "guidance_scale"),
        ({"method": "other"}, "method"),
        ({"method": "null_text", "guidance_scale": "7.5", "null_text_inner_steps": "0"}, "inner"),
        ({"null_text_learning_rate": "2"}, "null_text_learning_rate"),
        ({"null_text_early_stop": "-1"}, "null_text_early_stop"),
        ({"verify": "maybe"}, "verify"),
    ],
)
def test_invalid_fidelity_fields_are_422(client, submit, small_png, fields, needle):
    response = submit(client, small_png, **fields)
    body = assert_problem(response, 422, "validation_error")
    assert needle in response.text, body


@pytest.fixture
def verify_job(client, submit, small_png) -> str:
    response = submit(client, small_png, verify="true", num_inference_steps="10")
    assert response.status_code == 202, response.text
    return response.json()["id"]


def png(width: int = 64, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_reconstruction_is_served_as_png(client, redis, writes, verify_job):
    url = f"/v1/inversions/{verify_job}/reconstruction"
    assert_problem(client.get(url), 409, "not_finished")
    writes.start(verify_job)
    assert_problem(client.get(url), 409, "not_finished")
    writes.succeed(verify_job, reconstruction_png=png())
    response = client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (64, 64)
    # Deleting the finished job deletes its reconstruction too.
    assert client.delete(f"/v1/inversions/{verify_job}").status_code == 204
    assert redis.get(reconstruction_key(verify_job)) is None


def test_expired_reconstruction_is_404(client, redis, writes, verify_job):
    writes.succeed(verify_job, reconstruction_png=png())
    redis.delete(reconstruction_key(verify_job))
    url = f"/v1/inversions/{verify_job}/reconstruction"
    assert_problem(client.get(url), 404, "not_found")


def test_reconstruction_without_verify_is_404(client, submit, writes, small_png):
    job_id = submit(client, small_png).json()["id"]
    writes.succeed(job_id, reconstruction_png=png())  # even if something were stored
    body = assert_problem(client.get(f"/v1/inversions/{job_id}/reconstruction"), 404, "not_found")
    assert "verify" in body["detail"]


def test_reconstruction_of_a_failed_job_is_409(client, writes, verify_job):
    writes.fail(verify_job, ErrorCode.INTERNAL, "boom")
    url = f"/v1/inversions/{verify_job}/reconstruction"
    assert_problem(client.get(url), 409, "no_result")


def test_python_client_fields_reach_the_payload(client, redis, small_png):
    """The Python client's form fields, posted as it builds them, arrive in the payload."""
    from ddim_inversion_client._common import Transport

    request = Transport("http://gateway", None, None).submit(
        small_png,
        "a cat",
        {
            "guidance_scale": 5.0,
            "method": "null_text",
            "null_text_inner_steps": 4,
            "null_text_learning_rate": 0.1,
            "null_text_early_stop": 0.0,
            "refine_iterations": 2,
            "refine_tolerance": 1e-5,
            "verify": True,
        },
    )
    response = client.post("/v1/inversions", data=request.data, files=request.files)
    assert response.status_code == 202, response.text
    params = queued_params(redis, response.json()["id"])
    assert params.method == "null_text" and params.verify is True
    assert (params.null_text_inner_steps, params.null_text_learning_rate) == (4, 0.1)
    assert params.null_text_early_stop == 0.0 and params.guidance_scale == 5.0
    assert (params.refine_iterations, params.refine_tolerance) == (2, 1e-5)
