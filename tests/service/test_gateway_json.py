"""POST /v1/inversions with a JSON body: the form's fields, the image as base64 or a data: URL.

The same parameters, limits and protocol as a multipart submission: each test compares
with the form's answer or the form's stored job where there is one.
"""

from __future__ import annotations

import base64
import json

import pytest

from ddim_inversion.contract import JobPayload
from ddim_inversion.keys import input_key
from ddim_inversion.params import InversionParams
from ddim_inversion_client import InversionClient, InversionError
from service import bodies, uploads
from service.bodies import FIELDS
from tests.service.helpers import assert_problem, fetch_job

PARAMETERS = {
    "prompt": "a cat on a sofa",
    "negative_prompt": "blurry",
    "num_inference_steps": 25,
    "guidance_scale": 3.5,
    "resolution": "128x64",
    "resize_mode": "stretch",
    "return_trajectory": True,
    "result_dtype": "float16",
    "scheduler": {"timestep_spacing": "trailing"},
    "refine_iterations": 2,
    "verify": True,
    "model": "stable-diffusion-v1-5",
}
"""Every kind of parameter: text, int, float, a size, a choice, a bool and an object."""


def post_json(client, image: str, headers: dict | None = None, **fields):
    return client.post("/v1/inversions", json={"image": image, **fields}, headers=headers)


def as_form(fields: dict) -> dict[str, str]:
    """The same parameters as multipart text fields."""
    form = {}
    for name, value in fields.items():
        if isinstance(value, bool):
            form[name] = "true" if value else "false"
        elif isinstance(value, dict):
            form[name] = json.dumps(value)
        else:
            form[name] = str(value)
    return form


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def stored(redis, job_id: str) -> tuple[JobPayload, bytes]:
    job = fetch_job(redis, job_id)
    return JobPayload.model_validate(job.kwargs["payload"]), redis.get(input_key(job_id))


# -- accepted ------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["base64", "data_url", "wrapped_base64"])
def test_a_json_submission_makes_the_job_the_form_makes(client, redis, small_png, encoding):
    text = b64(small_png)
    if encoding == "data_url":
        text = f"data:image/png;base64,{text}"
    elif encoding == "wrapped_base64":  # MIME's 76-character lines
        text = "\r\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    by_json = post_json(client, text, **PARAMETERS)
    assert by_json.status_code == 202, by_json.text
    by_form = client.post(
        "/v1/inversions", data=as_form(PARAMETERS), files={"image": ("a.png", small_png)}
    )
    assert by_form.status_code == 202, by_form.text
    json_payload, json_input = stored(redis, by_json.json()["id"])
    form_payload, form_input = stored(redis, by_form.json()["id"])
    assert json_payload.params == form_payload.params
    assert json_payload.params == InversionParams(**PARAMETERS)
    assert json_input == form_input and len(json_input) == 128 * 64 * 3
    assert by_json.headers["location"] == f"/v1/inversions/{by_json.json()['id']}"


def test_absent_parameters_take_the_contracts_defaults(client, redis, small_png):
    answer = post_json(client, b64(small_png), prompt="a cat", seed=None, resolution=None)
    assert answer.status_code == 202, answer.text
    payload, _ = stored(redis, answer.json()["id"])
    # The one the job runs on: the gateway's default, since it names none.
    assert payload.params == InversionParams(prompt="a cat", model="stable-diffusion-v1-5")


def test_a_json_content_type_with_parameters_is_json(client, small_png):
    body = json.dumps({"image": b64(small_png), "prompt": "a cat"})
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        answer = client.post("/v1/inversions", content=body, headers={"content-type": content_type})
        assert answer.status_code == 202, answer.text


# -- refused -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "needle"),
    [
        ({"num_inference_steps": 2000}, "num_inference_steps", "1000"),
        ({"num_inference_steps": "many"}, "num_inference_steps", "integer"),
        ({"num_inference_steps": 1.5}, "num_inference_steps", "integer"),
        ({"guidance_scale": -1}, "guidance_scale", "0"),
        ({"resolution": "big"}, "resolution", "WxH"),
        ({"resolution": "500"}, "resolution", "64"),
        ({"resize_mode": "zoom"}, "resize_mode", "center_crop"),
        ({"prompt": 7}, "prompt", "string"),
        ({"prompt": None}, "prompt", "string"),
        ({"verify": "maybe"}, "verify", "bool"),
        ({"scheduler": '{"timestep_spacing": "trailing"}'}, "scheduler", "dictionary"),
        ({"scheduler": {"warp_speed": 9}}, "scheduler", "scheduler.warp_speed"),
        ({"scheduler": {"clip_sample": "maybe"}}, "scheduler", "true or false"),
        ({"webhook_url": "https://example.com/hook"}, "webhook_url", "not enabled"),
    ],
)
def test_a_bad_field_is_422_naming_it(client, small_png, queue, fields, field, needle):
    body = assert_problem(
        post_json(client, b64(small_png), **{"prompt": "a cat", **fields}),
        422,
        "validation_error",
        field,
    )
    assert needle in body["detail"]
    assert queue.count == 0


def test_the_form_refuses_the_same_fields_with_the_same_words(client, small_png):
    """One contract: the form's refusal of a bad value reads as the JSON body's."""
    for fields in ({"num_inference_steps": 2000}, {"resize_mode": "zoom"}, {"resolution": "big"}):
        by_json = post_json(client, b64(small_png), prompt="a cat", **fields).json()
        by_form = client.post(
            "/v1/inversions",
            data=as_form({"prompt": "a cat", **fields}),
            files={"image": ("a.png", small_png)},
        ).json()
        assert (by_json["field"], by_json["detail"]) == (by_form["field"], by_form["detail"])


def test_an_unknown_field_is_422_naming_it_and_the_valid_ones(client, small_png):
    body = assert_problem(
        post_json(client, b64(small_png), prompt="a cat", steps=10),
        422,
        "validation_error",
        "steps",
    )
    assert all(name in body["detail"] for name in FIELDS)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "a cat"}, "image"),
        ({"image": "iVBORw0KGgo="}, "prompt"),
    ],
)
def test_a_missing_field_is_422_naming_it(client, body, field):
    assert_problem(client.post("/v1/inversions", json=body), 422, "validation_error", field)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[1, 2]", b'"a cat"', b"[" * 50_000, b"1" * 5000],
    ids=["broken", "empty", "array", "string", "nested", "huge_int"],
)
def test_a_body_that_is_not_a_json_object_is_422(client, content):
    answer = client.post(
        "/v1/inversions", content=content, headers={"content-type": "application/json"}
    )
    body = assert_problem(answer, 422, "validation_error")
    assert "JSON" in body["detail"]


@pytest.mark.parametrize(
    "image",
    [
        "not base64 at all!",
        "iVBORw0KGgo",  # unpadded
        "iVBORw0K-_o=",  # the URL-safe alphabet
        "data:image/png,iVBORw0KGgo=",  # a data: URL without ;base64
        "data:image/png;base64",  # no comma, no data
        "ü" * 8,
    ],
)
def test_an_image_that_is_not_base64_is_422(client, queue, image):
    body = assert_problem(
        post_json(client, image, prompt="a cat"), 422, "validation_error", "image"
    )
    assert "base64" in body["detail"]
    assert queue.count == 0


def test_a_character_outside_base64_is_refused_not_skipped(client, small_png):
    """A lenient decoder drops it and decodes the rest: the image must be what was sent."""
    text = b64(small_png)
    corrupted = text[:40] + "*" + text[40:]
    assert_problem(post_json(client, corrupted, prompt="a cat"), 422, "validation_error", "image")


def test_an_empty_image_is_422(client):
    assert_problem(post_json(client, "", prompt="a cat"), 422, "validation_error", "image")


@pytest.mark.parametrize(
    "data",
    [b"just some words, not an image\n", b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\nendobj\n"],
    ids=["text", "pdf"],
)
def test_bytes_that_are_not_an_image_are_415(client, data):
    assert_problem(
        post_json(client, b64(data), prompt="a cat"), 415, "unsupported_media_type", "image"
    )


def test_a_disallowed_format_is_415(make_client, small_png):
    client = make_client(allowed_formats=("JPEG",))
    assert_problem(
        post_json(client, b64(small_png), prompt="a"), 415, "unsupported_media_type", "image"
    )


def test_an_image_over_max_pixels_is_413(make_client, chelsea):
    client = make_client(max_pixels=100 * 100)
    assert_problem(post_json(client, b64(chelsea), prompt="a cat"), 413, "image_too_large", "image")


def test_decoded_bytes_over_max_upload_bytes_are_413(make_client, chelsea, queue):
    client = make_client(max_upload_bytes=len(chelsea) - 1)
    answer = post_json(client, b64(chelsea), prompt="a cat")
    assert_problem(answer, 413, "payload_too_large", "image")
    assert queue.count == 0
    # The limit is on the bytes, not the text: a wrapped and prefixed one is as large.
    wrapped = "data:image/png;base64," + "\n".join(
        b64(chelsea)[i : i + 76] for i in range(0, 400_000, 76)
    )
    assert_problem(post_json(client, wrapped, prompt="a cat"), 413, "payload_too_large", "image")


def test_base64_text_over_the_limit_is_413_before_it_is_decoded(make_client):
    """Text too long for the limit is refused on its length: junk of that length is 413,
    not the 422 its decoding would give."""
    client = make_client(max_upload_bytes=3000)
    assert_problem(post_json(client, "!" * 4004, prompt="a cat"), 413, "payload_too_large", "image")
    assert uploads.base64_length(3000) == 4000 and uploads.base64_length(3001) == 4004


def test_the_body_limit_admits_an_image_at_the_upload_limit_as_base64(make_client, chelsea):
    """The JSON body is 4/3 of the image: over the multipart body's limit, and admitted."""
    client = make_client(max_upload_bytes=len(chelsea))
    body = json.dumps({"image": b64(chelsea), "prompt": "a cat"}).encode()
    assert len(body) > len(chelsea) + 64 * 1024
    answer = client.post(
        "/v1/inversions", content=body, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 202, answer.text


def test_a_json_body_over_the_body_limit_is_413(make_client, chelsea, queue):
    client = make_client(max_upload_bytes=1000)
    answer = post_json(client, b64(chelsea), prompt="a cat")
    body = assert_problem(answer, 413, "payload_too_large")
    assert "request body" in body["detail"]

    def chunks():  # without a Content-Length: counted while it streams
        yield b'{"prompt": "a cat", "image": "'
        for _ in range(200):
            yield b"A" * 1024
        yield b'"}'

    answer = client.post(
        "/v1/inversions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_problem(answer, 413, "payload_too_large")
    assert queue.count == 0


# -- protocol ------------------------------------------------------------------------------


def test_idempotency_key_replays_across_both_bodies(client, small_png, queue):
    """The same image and parameters are the same payload, whichever body carried them."""
    headers = {"Idempotency-Key": "json-1"}
    first = post_json(client, b64(small_png), headers, **PARAMETERS)
    assert first.status_code == 202, first.text
    again = post_json(client, f"data:image/png;base64,{b64(small_png)}", headers, **PARAMETERS)
    by_form = client.post(
        "/v1/inversions",
        data=as_form(PARAMETERS),
        files={"image": ("a.png", small_png)},
        headers=headers,
    )
    for replay in (again, by_form):
        assert replay.status_code == 202, replay.text
        assert replay.json()["id"] == first.json()["id"]
        assert replay.headers["idempotent-replayed"] == "true"
    assert queue.count == 1
    other = post_json(client, b64(small_png), headers, **{**PARAMETERS, "prompt": "a dog"})
    assert_problem(other, 422, "validation_error", "Idempotency-Key")


def test_prefer_wait_applies_to_a_json_submission(client, small_png):
    answer = post_json(client, b64(small_png), {"Prefer": "wait=1"}, prompt="a cat")
    assert answer.status_code == 202, answer.text
    assert answer.headers["preference-applied"] == "wait=1"
    assert answer.json()["status"] == "queued"


def test_the_python_client_sends_either_body(client, redis, small_png):
    """`submit(..., body="json")` makes the job the multipart default makes."""
    service = InversionClient("http://testserver", http=client)
    params = {
        "num_inference_steps": 5,
        "resolution": (128, 64),
        "scheduler": {"timestep_spacing": "trailing"},
        "verify": True,
    }
    by_form = service.submit(small_png, "a cat", **params)
    by_json = service.submit(small_png, "a cat", body="json", **params)
    form_payload, form_input = stored(redis, by_form.id)
    json_payload, json_input = stored(redis, by_json.id)
    assert json_payload.params == form_payload.params
    expected = InversionParams(prompt="a cat", model="stable-diffusion-v1-5", **params)
    assert json_payload.params == expected
    assert json_input == form_input
    with pytest.raises(InversionError) as refused:
        service.submit(small_png, "a cat", body="json", resolution="big")
    assert (refused.value.status, refused.value.field) == (422, "resolution")


@pytest.mark.parametrize("status", [202, 422])
def test_an_uploaded_file_is_closed_after_the_answer(client, small_png, monkeypatch, status):
    """The route reads its body itself, so it closes the form's files itself."""
    seen, read = [], bodies.from_form

    def spy(form, max_items):
        seen.append(form["image"].file)
        return read(form, max_items)

    monkeypatch.setattr(bodies, "from_form", spy)
    answer = client.post(
        "/v1/inversions",
        data={"prompt": "a cat", "resolution": "512" if status == 202 else "big"},
        files={"image": ("a.png", small_png)},
    )
    assert answer.status_code == status, answer.text
    assert len(seen) == 1 and seen[0].closed
