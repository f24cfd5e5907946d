"""Property tests: hostile uploads and parameters never make the gateway answer 5xx.

POST /v1/inversions gets mutated images (real and generated files, truncated, bit-flipped,
with junk inserted, a swapped magic number or a PNG header declaring huge dimensions) and
random subsets of form fields with valid, boundary and junk values, as multipart and as JSON
(any JSON value in any field, the image as base64). Every answer must be a 202 with an id
and a Location, or a 4xx problem+json with a `code`; never a 5xx. GET and DELETE with
random ids likewise.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import fakeredis
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ddim_inversion.contract import ModelInfo, WorkerRecord
from ddim_inversion.keys import WORKERS_KEY
from ddim_inversion.scheduler_config import SCHEDULER_OVERRIDES
from service.app import create_app
from service.errors import PROBLEM_MEDIA_TYPE
from service.settings import GatewaySettings
from tests.service.helpers import SD15_SCHEDULER

SAMPLES = Path(__file__).resolve().parents[2] / "samples"

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _encode(fmt: str, mode: str = "RGB", size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    colour: Any = (10, 200, 30, 128)[: len(mode)] if mode in ("RGB", "RGBA") else 90
    Image.new(mode, size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


BASE_IMAGES: list[bytes] = [
    (SAMPLES / "chelsea.png").read_bytes(),
    _encode("PNG"),
    _encode("PNG", "RGBA"),
    _encode("PNG", "L", (16, 24)),
    _encode("JPEG"),
    _encode("GIF", "P"),
    _encode("BMP"),
    _encode("TIFF"),
    _encode("WEBP"),
]
MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"%PDF"]


def _png_with_size(width: int, height: int) -> bytes:
    """A small PNG whose IHDR declares another size, CRC fixed: a decompression bomb header."""
    data = bytearray(_encode("PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@st.composite
def mutated_image(draw: st.DrawFn) -> bytes | None:
    """A base image, mutated or not; None (no image part at all) now and then."""
    data = bytearray(draw(st.sampled_from(BASE_IMAGES)))
    kind = draw(
        st.sampled_from(
            [
                *("none", "none", "none", "truncate", "flip", "overwrite", "insert"),
                *("magic", "empty", "ihdr", "junk", "missing"),
            ]
        )
    )
    if kind == "truncate":
        del data[draw(st.integers(0, len(data))) :]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "overwrite":
        start = draw(st.integers(0, len(data) - 1))
        junk = draw(st.binary(min_size=1, max_size=32))
        data[start : start + len(junk)] = junk
    elif kind == "insert":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    elif kind == "magic":
        magic = draw(st.sampled_from(MAGICS))
        data[: len(magic)] = magic
    elif kind == "empty":
        data = bytearray()
    elif kind == "ihdr":
        size = st.one_of(
            st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 65535]), st.integers(0, 2**32 - 1)
        )
        data = bytearray(_png_with_size(draw(size), draw(size)))
    elif kind == "junk":
        data = bytearray(draw(st.binary(max_size=256)))
    elif kind == "missing":
        return None
    return bytes(data)


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
JUNK = st.one_of(
    TEXT,
    st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "1e400", "-0", "null", "true"]),
    st.sampled_from(["²", "１２８", "0x40", "1_000", "9" * 5000, "\x00", "💥", "[]", "{}"]),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
SCHEDULER_VALUE = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**500), 10**500),
        st.floats(allow_nan=True, allow_infinity=True),
        TEXT,
        st.sampled_from(["linear", "scaled_linear", "leading", "trailing", "v_prediction"]),
    ),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=8,
)


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


SCHEDULER = st.one_of(
    st.dictionaries(st.sampled_from(sorted(SCHEDULER_OVERRIDES)), SCHEDULER_VALUE).map(_dumps),
    st.dictionaries(TEXT, SCHEDULER_VALUE, max_size=3).map(_dumps),
    SCHEDULER_VALUE.map(_dumps),
    st.sampled_from(
        [
            "{",
            '{"eta": 0}',
            '{"beta_start": NaN}',
            '{"beta_start": 1' + "0" * 400 + "}",
            '{"trained_betas": [1' + "0" * 400 + "]}",
            '{"num_train_timesteps": 100000000}',
            '{"steps_offset": 999}',
            '{"trained_betas": [0.5]}',
            "[" * 50_000,
            '{"a":' * 50_000,
        ]
    ),
    JUNK,
)

VALID: dict[str, st.SearchStrategy[str]] = {
    "prompt": st.one_of(st.just("a cat"), TEXT),
    "negative_prompt": st.one_of(st.just(""), TEXT),
    "num_inference_steps": st.integers(1, 1000).map(str),
    "guidance_scale": st.floats(0, 50).map(str),
    "resolution": st.sampled_from(["64", "128", "64x128", "192x64", "64X64", " 64 ", "１２８"]),
    "resize_mode": st.sampled_from(["center_crop", "stretch"]),
    "encode_mode": st.sampled_from(["mean", "sample"]),
    "seed": st.integers(0, 2**63 - 1).map(str),
    "return_trajectory": st.sampled_from(["true", "false", "1", "0", "yes", "off"]),
    "result_dtype": st.sampled_from(["float32", "float16"]),
    "scheduler": st.sampled_from(
        [
            "",
            "{}",
            '{"steps_offset": 0}',
            '{"timestep_spacing": "trailing"}',
            '{"clip_sample": false, "set_alpha_to_one": true}',
            '{"prediction_type": "v_prediction", "rescale_betas_zero_snr": true}',
            '{"beta_schedule": "squaredcos_cap_v2", "trained_betas": null}',
        ]
    ),
}
BAD: dict[str, st.SearchStrategy[str]] = {
    "prompt": st.one_of(st.just("x" * 2001), JUNK),
    "negative_prompt": st.one_of(st.just("y" * 2001), JUNK),
    "num_inference_steps": st.one_of(
        st.sampled_from(["0", "-1", "1001", "10" * 30, "1.5", "1e3"]),
        st.integers(-(2**64), 2**64).map(str),
        JUNK,
    ),
    "guidance_scale": st.one_of(
        st.sampled_from(["50.0001", "-0.1", "1e308", "5e-324", "nan", "inf"]),
        st.floats().map(str),
        JUNK,
    ),
    "resolution": st.one_of(
        st.sampled_from(["0", "63", "65", "64x", "x64", "64x64x64", "-64", "64 x 64", "²"]),
        st.sampled_from(["64000x64000", "6400000x64", "9" * 30, "8192x8192"]),
        st.tuples(st.integers(-2, 2**20), st.integers(-2, 2**20)).map(lambda t: f"{t[0]}x{t[1]}"),
        JUNK,
    ),
    "resize_mode": st.one_of(st.just("CENTER_CROP"), JUNK),
    "encode_mode": st.one_of(st.just("mode"), JUNK),
    "seed": st.one_of(
        st.sampled_from([str(2**63), "-1"]), st.integers(-(2**80), 2**80).map(str), JUNK
    ),
    "return_trajectory": st.one_of(st.just("maybe"), JUNK),
    "result_dtype": st.one_of(st.just("bfloat16"), JUNK),
    "scheduler": SCHEDULER,
    # Names the contract knows but the form may not take.
    "refine_iterations": st.one_of(st.sampled_from(["0", "3", "-1", "51"]), JUNK),
    "refine_tolerance": JUNK,
    "webhook_url": st.one_of(
        st.sampled_from(["http://example.com/hook", "ftp://x", "http://[::1", "http://h:99999"]),
        JUNK,
    ),
}
UNKNOWN_FIELD = st.one_of(
    st.sampled_from(["steps", "Prompt", "num_inference_step", "image2", "", "webhook"]),
    st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='"\\'),
        min_size=1,
        max_size=12,
    ),
)


@st.composite
def form_fields(draw: st.DrawFn) -> dict[str, str]:
    """Mostly valid forms with one or two bad fields, so that most reach the image decoder."""
    names = draw(st.sets(st.sampled_from(sorted(VALID))))
    fields = {name: draw(VALID[name]) for name in names}
    if draw(st.integers(0, 9)) < 9:
        fields.setdefault("prompt", "a cat")
    style = draw(st.sampled_from(["valid", "one_bad", "one_bad", "chaos"]))
    if style == "one_bad":
        name = draw(st.sampled_from(sorted(BAD)))
        fields[name] = draw(BAD[name])
    elif style == "chaos":
        for name in draw(st.sets(st.sampled_from(sorted(BAD)), max_size=len(BAD))):
            fields[name] = draw(st.one_of(VALID.get(name, BAD[name]), BAD[name]))
        for _ in range(draw(st.integers(0, 2))):
            fields[draw(UNKNOWN_FIELD)] = draw(JUNK)
    return fields


@pytest.fixture(scope="module")
def fuzz_env() -> Iterator[tuple[TestClient, fakeredis.FakeRedis]]:
    redis = fakeredis.FakeRedis()
    gateway = GatewaySettings(
        redis_url="redis://unused.invalid:6379/0",
        auth_disabled=True,
        max_queued_per_key=10**6,
        rate_limit_per_minute=10**6,
    )
    app = create_app(gateway, redis=redis)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, redis


def _reset(redis: fakeredis.FakeRedis, with_worker: bool) -> None:
    redis.flushall()
    if with_worker:
        record = WorkerRecord(
            name="gpu-0",
            model=ModelInfo(
                name="stable-diffusion-v1-5",
                native_resolution=(512, 512),
                latent_channels=4,
                vae_scale_factor=8,
                tokenizer_max_length=77,
                scheduler_config=SD15_SCHEDULER,
                dtype="float16",
                device="cuda:0",
            ),
            heartbeat_at=time.time(),
            max_batch_size=4,
        )
        redis.hset(WORKERS_KEY, record.name, record.model_dump_json())


def _assert_well_formed(response: Any) -> None:
    status = response.status_code
    assert status < 500, f"{status}: {response.text[:2000]}"
    if status == 202:
        body = response.json()
        assert isinstance(body.get("id"), str) and body["id"]
        assert response.headers["Location"].endswith(body["id"])
    elif status >= 400:
        assert response.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE), response.headers
        body = response.json()
        assert isinstance(body.get("code"), str) and body["code"], body
        assert body.get("status") == status, body


@FUZZ
@given(
    image=mutated_image(),
    filename=st.one_of(st.just("image.png"), st.just("cat.jpg"), TEXT),
    fields=form_fields(),
    with_worker=st.booleans(),
)
def test_submit_never_5xx(
    fuzz_env: tuple[TestClient, fakeredis.FakeRedis],
    image: bytes | None,
    filename: str,
    fields: dict[str, str],
    with_worker: bool,
) -> None:
    client, redis = fuzz_env
    _reset(redis, with_worker)
    data = dict(fields)
    files = {"image": (filename, image, "application/octet-stream")} if image is not None else None
    if files is None and not data:
        data = {"prompt": "a cat"}
    response = client.post("/v1/inversions", data=data, files=files)
    _assert_well_formed(response)
    if response.status_code == 202:
        assert "prompt" in fields and image


JSON_VALUE = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        TEXT,
    ),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=6,
)


@st.composite
def json_body(draw: st.DrawFn) -> dict[str, Any]:
    """The form's fields as a JSON object, some retyped to any JSON value, and the image as
    base64 text: plain, a data: URL, cut short, or with a character outside the alphabet."""
    fields: dict[str, Any] = dict(draw(form_fields()))
    for name in draw(st.sets(st.sampled_from(sorted(fields)))) if fields else ():
        fields[name] = draw(JSON_VALUE)
    image = draw(mutated_image())
    if image is not None:
        text = base64.b64encode(image).decode()
        fields["image"] = draw(
            st.sampled_from([text, f"data:image/png;base64,{text}", text[:-1], "*" + text])
        )
    return fields


@FUZZ
@given(body=json_body(), with_worker=st.booleans())
def test_a_json_submission_never_5xx(
    fuzz_env: tuple[TestClient, fakeredis.FakeRedis], body: dict[str, Any], with_worker: bool
) -> None:
    client, redis = fuzz_env
    _reset(redis, with_worker)
    response = client.post(
        "/v1/inversions",
        content=json.dumps(body, allow_nan=True),
        headers={"content-type": "application/json"},
    )
    _assert_well_formed(response)
    if response.status_code == 202:
        assert "prompt" in body and body.get("image")


@FUZZ
@given(
    job_id=st.one_of(
        TEXT,
        st.uuids().map(str),
        st.sampled_from(["..", "%2e%2e", "a/b", "00000000-0000-0000-0000-000000000000"]),
    ),
    method=st.sampled_from(["GET", "DELETE", "GET_LATENTS"]),
)
def test_job_routes_never_5xx(
    fuzz_env: tuple[TestClient, fakeredis.FakeRedis], job_id: str, method: str
) -> None:
    client, _ = fuzz_env
    path = "/v1/inversions/" + quote(job_id, safe="")
    if method == "GET":
        response = client.get(path)
    elif method == "DELETE":
        response = client.delete(path)
    else:
        response = client.get(path + "/latents")
    _assert_well_formed(response)
    assert response.status_code in (404, 405, 422), response.text


def test_huge_numbers_in_a_float_valued_scheduler_override_are_refused(
    fuzz_env: tuple[TestClient, fakeredis.FakeRedis],
) -> None:
    """Regression: `math.isfinite` of an int past the float range raised OverflowError (500)."""
    client, redis = fuzz_env
    _reset(redis, with_worker=True)
    huge = "1" + "0" * 400
    for scheduler in (f'{{"beta_start": {huge}}}', f'{{"trained_betas": [{huge}]}}'):
        response = client.post(
            "/v1/inversions",
            data={"prompt": "a cat", "scheduler": scheduler},
            files={"image": ("image.png", BASE_IMAGES[1])},
        )
        assert response.status_code == 422, response.text
        assert response.json()["field"].startswith("scheduler"), response.text


def test_deeply_nested_scheduler_json_is_refused(
    fuzz_env: tuple[TestClient, fakeredis.FakeRedis],
) -> None:
    """Regression: json.loads raised RecursionError, not JSONDecodeError (500)."""
    client, redis = fuzz_env
    _reset(redis, with_worker=True)
    response = client.post(
        "/v1/inversions",
        data={"prompt": "a cat", "scheduler": "[" * 50_000},
        files={"image": ("image.png", BASE_IMAGES[1])},
    )
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "scheduler"


@pytest.mark.parametrize("resolution", ["64000x64000", "6400000x64", "99999999999999999999"])
def test_a_resolution_past_the_pixel_limit_is_refused(
    fuzz_env: tuple[TestClient, fakeredis.FakeRedis], resolution: str
) -> None:
    """Regression: an unbounded resolution made the gateway allocate the resized image (500)."""
    client, redis = fuzz_env
    _reset(redis, with_worker=False)
    response = client.post(
        "/v1/inversions",
        data={"prompt": "a cat", "resolution": resolution},
        files={"image": ("image.png", BASE_IMAGES[1])},
    )
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "resolution"
