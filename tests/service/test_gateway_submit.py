"""POST /v1/inversions: what is accepted, what is enqueued, and every way it is refused."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from redis import exceptions as redis_errors
from rq import Queue

from ddim_inversion.contract import JOB_FUNCTION, META_OWNER, JobPayload
from ddim_inversion.keys import ADMITTING_KEY, WORKERS_KEY, input_key
from ddim_inversion.params import InversionParams
from tests import hostile_images
from tests.service.helpers import assert_problem, fetch_job


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height: a decompression bomb's header."""
    buffer = io.BytesIO()
    Image.new("1", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


# -- accepted ------------------------------------------------------------------------------


def test_submit_enqueues_a_json_job_with_its_input(client, submit, redis, queue, chelsea):
    response = submit(
        client,
        chelsea,
        prompt="a cat on a sofa",
        num_inference_steps=25,
        guidance_scale=3.5,
        negative_prompt="blurry",
        resolution="768x512",
        resize_mode="stretch",
        return_trajectory="true",
        result_dtype="float16",
        scheduler='{"timestep_spacing": "trailing"}',
    )
    assert response.status_code == 202, response.text
    body = response.json()
    job_id = body["id"]
    assert response.headers["location"] == f"/v1/inversions/{job_id}"
    assert body["status"] == "queued"
    assert body["created_at"]
    assert body["urls"] == {
        "self": f"/v1/inversions/{job_id}",
        "latents": f"/v1/inversions/{job_id}/latents",
        "cancel": f"/v1/inversions/{job_id}",
    }

    assert queue.job_ids == [job_id]
    job = fetch_job(redis, job_id)
    assert job.func_name == JOB_FUNCTION
    assert job.args == []
    payload = JobPayload.model_validate(job.kwargs["payload"])
    assert payload.params == InversionParams(
        model="stable-diffusion-v1-5",  # the gateway's default: the job names none
        prompt="a cat on a sofa",
        negative_prompt="blurry",
        num_inference_steps=25,
        guidance_scale=3.5,
        resolution=(768, 512),
        resize_mode="stretch",
        return_trajectory=True,
        result_dtype="float16",
        scheduler={"timestep_spacing": "trailing"},
    )
    assert (payload.image_width, payload.image_height) == (768, 512)
    assert payload.owner == ""
    assert job.meta[META_OWNER] == ""
    stored = redis.get(input_key(job_id))
    assert len(stored) == 768 * 512 * 3
    assert 0 < redis.ttl(input_key(job_id)) <= 600 + 86400


def test_without_a_worker_the_image_travels_unresized(client, submit, redis, queue, small_png):
    response = submit(client, small_png)
    assert response.status_code == 202
    job = queue.fetch_job(response.json()["id"])
    payload = JobPayload.model_validate(job.kwargs["payload"])
    assert (payload.image_width, payload.image_height) == (96, 64)
    assert payload.params == InversionParams(prompt="a cat", model="stable-diffusion-v1-5")
    stored = redis.get(input_key(job.id))
    assert stored[:3] == bytes([200, 30, 30]) and len(stored) == 96 * 64 * 3


def test_with_a_worker_the_image_is_resized_to_its_native_size(
    client, submit, queue, redis, live_worker, chelsea
):
    response = submit(client, chelsea, scheduler='{"steps_offset": 0}')
    assert response.status_code == 202, response.text
    payload = JobPayload.model_validate(queue.fetch_job(response.json()["id"]).kwargs["payload"])
    assert (payload.image_width, payload.image_height) == (512, 512)
    assert len(redis.get(input_key(response.json()["id"]))) == 512 * 512 * 3


def test_stale_worker_is_ignored(client, submit, queue, redis, worker_record, small_png):
    stale = worker_record(age_s=3600)
    redis.hset(WORKERS_KEY, stale.name, stale.model_dump_json())
    redis.hset(WORKERS_KEY, "garbage", b"{not json")
    response = submit(client, small_png)
    assert response.status_code == 202
    payload = queue.fetch_job(response.json()["id"]).kwargs["payload"]
    assert (payload["image_width"], payload["image_height"]) == (96, 64)


# -- refused parameters --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"resolution": "500"}, "resolution"),
        ({"resolution": "big"}, "resolution"),
        ({"num_inference_steps": 2000}, "num_inference_steps"),
        ({"num_inference_steps": "many"}, "num_inference_steps"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"resize_mode": "zoom"}, "resize_mode"),
        ({"colour": "red"}, "colour"),
        ({"scheduler": "{not json"}, "scheduler"),
        ({"scheduler": "[1, 2]"}, "scheduler"),
        ({"scheduler": '{"warp_speed": 9}'}, "scheduler"),
        ({"scheduler": '{"clip_sample": "maybe"}'}, "scheduler"),
    ],
)
def test_invalid_parameters_are_422_naming_the_field(client, submit, small_png, fields, field):
    body = assert_problem(submit(client, small_png, **fields), 422, "validation_error", field)
    if field == "scheduler" and "warp_speed" in str(fields):
        assert "scheduler.warp_speed" in body["detail"]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"method": "ddim", "eta": 0.5}, "eta"),
        ({"method": "edict", "inverse_scheduler": "dpmsolver"}, "dpmsolver"),
        (
            {"inverse_scheduler": "dpmsolver", "scheduler": '{"set_alpha_to_one": true}'},
            "scheduler",
        ),
    ],
)
def test_impossible_method_combinations_are_422_before_queueing(
    client, submit, small_png, fields, named
):
    body = assert_problem(submit(client, small_png, **fields), 422, "validation_error")
    assert named in body["detail"]


def test_steps_over_the_service_limit(make_client, submit, small_png):
    client = make_client(max_steps=100)
    response = submit(client, small_png, num_inference_steps=101)
    body = assert_problem(response, 422, "validation_error", "num_inference_steps")
    assert "100" in body["detail"]


@pytest.mark.parametrize("name", ["prompt", "negative_prompt"])
def test_prompt_too_long(make_client, submit, small_png, name):
    client = make_client(max_prompt_chars=10)
    fields = {"prompt": "x" * 11} if name == "prompt" else {"negative_prompt": "y" * 11}
    response = client.post(
        "/v1/inversions",
        data={"prompt": "ok", **fields},
        files={"image": ("a.png", small_png)},
    )
    assert_problem(response, 422, "validation_error", name)


def test_sample_encoding_needs_a_seed(client, submit, small_png):
    body = assert_problem(submit(client, small_png, encode_mode="sample"), 422, "validation_error")
    assert "seed" in body["detail"]
    assert submit(client, small_png, encode_mode="sample", seed=7).status_code == 202


def test_missing_prompt_and_image(client, small_png):
    response = client.post("/v1/inversions", files={"image": ("a.png", small_png)})
    assert_problem(response, 422, "validation_error", "prompt")
    response = client.post("/v1/inversions", data={"prompt": "a cat"})
    assert_problem(response, 422, "validation_error", "image")


def test_impossible_scheduler_combination_against_the_live_model(
    client, submit, live_worker, small_png
):
    response = submit(
        client,
        small_png,
        scheduler='{"prediction_type": "sample", "set_alpha_to_one": true}',
    )
    body = assert_problem(response, 422, "validation_error", "scheduler.prediction_type")
    assert "set_alpha_to_one" in body["detail"]


def test_steps_offset_past_the_last_timestep_against_the_live_model(
    client, submit, live_worker, small_png
):
    response = submit(client, small_png, num_inference_steps=1000)
    assert_problem(response, 422, "validation_error", "scheduler.steps_offset")


# -- refused images ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"just some words, not an image\n", b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\nendobj\n"],
    ids=["text", "pdf"],
)
def test_not_an_image_is_415(client, submit, data):
    assert_problem(submit(client, data, filename="a.png"), 415, "unsupported_media_type", "image")


def test_disallowed_format_is_415(make_client, submit, small_png):
    client = make_client(allowed_formats=("JPEG",))
    assert_problem(submit(client, small_png), 415, "unsupported_media_type", "image")


def test_truncated_png_is_422(client, submit, chelsea):
    truncated = chelsea[: len(chelsea) // 2]
    assert_problem(submit(client, truncated), 422, "invalid_input", "image")


def test_empty_upload_is_422(client, submit):
    assert_problem(submit(client, b""), 422, "validation_error", "image")


def test_decompression_bomb_is_413_before_decoding(client, submit):
    bomb = png_declaring(20_000, 20_000)
    assert len(bomb) < 100
    body = assert_problem(submit(client, bomb), 413, "image_too_large", "image")
    assert "20000" in body["detail"] or "pixels" in body["detail"]


def test_image_over_max_pixels_is_413(make_client, submit, chelsea):
    client = make_client(max_pixels=100 * 100)
    assert_problem(submit(client, chelsea), 413, "image_too_large", "image")


def test_upload_over_max_upload_bytes_is_413(make_client, submit, chelsea, queue):
    client = make_client(max_upload_bytes=len(chelsea) - 1)
    assert_problem(submit(client, chelsea), 413, "payload_too_large", "image")
    assert queue.count == 0


def test_body_far_over_the_limit_is_refused_while_streaming(make_client, submit, chelsea):
    client = make_client(max_upload_bytes=1000)
    assert_problem(submit(client, chelsea), 413, "payload_too_large")


# -- hostile images (issue 21): refused from their header, or decoded off the gateway ------


def test_a_jpeg_with_hundreds_of_scans_is_422_before_decoding(client, submit, queue):
    hostile = hostile_images.many_scans_jpeg(512, 300)
    body = assert_problem(submit(client, hostile), 422, "invalid_input", "image")
    assert "100 scans" in body["detail"]  # INVERSION_MAX_JPEG_SCANS's default
    assert queue.count == 0


def test_a_huge_palette_png_is_413_by_its_decode_bytes(make_client, submit, queue):
    client = make_client(decode_memory_bytes=100 * 2**20)
    palette = hostile_images.palette_png(4000, 4000)  # 16 KB, 16 Mpx x 13 bytes = 208 MB
    body = assert_problem(submit(client, palette), 413, "image_too_large", "image")
    assert "208000000 bytes" in body["detail"]
    assert queue.count == 0


def test_an_image_refused_by_its_decoder_gives_back_its_idempotency_key(client, small_png):
    hostile = hostile_images.many_scans_jpeg(64, 200)
    headers = {"Idempotency-Key": "decode-refused"}
    refused = client.post(
        "/v1/inversions",
        data={"prompt": "a cat"},
        files={"image": ("a.jpg", hostile)},
        headers=headers,
    )
    assert_problem(refused, 422, "invalid_input", "image")
    # The key is free again: the same key with a good image makes a job (not a 422 for a
    # key reused with another payload).
    accepted = client.post(
        "/v1/inversions",
        data={"prompt": "a cat"},
        files={"image": ("a.png", small_png)},
        headers=headers,
    )
    assert accepted.status_code == 202, accepted.text


@pytest.mark.parametrize("kind", ["sixteen_bit_png", "float_tiff"])
def test_sixteen_bit_and_float_greys_are_stored_scaled_to_8_bits(client, submit, redis, kind):
    data, pixels = getattr(hostile_images, kind)(48, 32)
    response = submit(client, data)  # no worker: stored at its own size
    assert response.status_code == 202, response.text
    scale = 1 / 257.0 if pixels.dtype == np.uint16 else 255.0
    grey = np.clip(np.rint(pixels.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    stored = np.frombuffer(redis.get(input_key(response.json()["id"])), dtype=np.uint8)
    assert np.array_equal(stored.reshape(32, 48, 3), np.repeat(grey[..., None], 3, axis=-1))


def test_the_decoders_are_exported_as_metrics(client, submit, small_png):
    assert submit(client, small_png).status_code == 202
    text = client.get("/metrics").text
    assert "inversion_image_decoders_started_total 1.0" in text
    assert 'inversion_image_decoders_stopped_total{reason="cpu"} 0.0' in text
    assert "inversion_image_decodes_in_progress 0.0" in text


# -- back-pressure -------------------------------------------------------------------------


def test_full_queue_is_429_with_retry_after(make_client, submit, small_png, queue):
    client = make_client(max_queue_depth=2)
    assert submit(client, small_png).status_code == 202
    assert submit(client, small_png).status_code == 202
    response = submit(client, small_png)
    assert_problem(response, 429, "queue_full")
    assert int(response.headers["retry-after"]) > 0
    assert queue.count == 2


def test_an_enqueue_that_fails_midway_writes_nothing(client, submit, small_png, redis, monkeypatch):
    # The input and RQ's first writes are already queued when the push fails: none may land.
    def lost(*args, **kwargs):
        raise redis_errors.ConnectionError("connection lost")

    monkeypatch.setattr(Queue, "push_job_id", lost)
    assert_problem(submit(client, small_png), 503, "service_unavailable")
    # Only the admission is left: after a lost connection the gateway cannot tell whether
    # the enqueue ran, so it gives nothing back, and the admission lapses by itself.
    assert redis.keys("*") == [ADMITTING_KEY.encode()]


def test_chunked_body_over_the_limit_is_stopped_while_streaming(make_client, queue):
    client = make_client(max_upload_bytes=1000)
    boundary = "xyz"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na cat\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def body():
        yield head
        for _ in range(200):  # 200 KiB, sent without a Content-Length
            yield b"\0" * 1024

    response = client.post(
        "/v1/inversions",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert_problem(response, 413, "payload_too_large")
    assert queue.count == 0
