"""A job's calls over HTTP to a running gateway, as a client makes them: submit one
sample image, read its status, wait for one of some states."""

from __future__ import annotations

import httpx

from tests.conftest import EVENT_GUARD_S, SAMPLES, wait_for


def submit(base: str, image: str = "chelsea.png", **fields: object) -> dict:
    data = {"prompt": "a photo of a cat"} | {k: str(v) for k, v in fields.items()}
    with (SAMPLES / image).open("rb") as handle:
        answer = httpx.post(
            base + "/v1/inversions",
            data=data,
            files={"image": (image, handle, "image/png")},
            timeout=EVENT_GUARD_S,  # httpx's default (5 s) is a guess at the machine's speed
        )
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert answer.headers["location"] == f"/v1/inversions/{body['id']}"
    return body


def status(base: str, job_id: str) -> dict:
    answer = httpx.get(f"{base}/v1/inversions/{job_id}", timeout=EVENT_GUARD_S)
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_status(base: str, job_id: str, wanted: set[str], timeout: float = EVENT_GUARD_S) -> dict:
    return wait_for(  # type: ignore[return-value]
        lambda: (s := status(base, job_id))["status"] in wanted and s, timeout, f"{wanted}"
    )
