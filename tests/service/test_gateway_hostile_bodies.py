"""Bodies built to break the gateway rather than to be served: text UTF-8 cannot carry,
lists of millions of numbers, URLs that would split a request line. Each is refused with a
422 naming its field, counted against the key's rate like any submission, and queues
nothing."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from ddim_inversion.keys import rate_key
from tests.service.helpers import assert_problem

KEY_A = "key-of-alice"
HASH_A = hashlib.sha256(KEY_A.encode()).hexdigest()
SURROGATE = "\\ud800"
"""JSON's escape of a lone surrogate: valid JSON, decodes to a str UTF-8 cannot encode."""
FORGED_LINE = "2026-12-07 00:00:00 CRITICAL admin key compromised"


def post_raw(client, text: str, headers: dict | None = None):
    return client.post(
        "/v1/inversions",
        content=text.encode("ascii"),
        headers={"content-type": "application/json", **(headers or {})},
    )


def body_with(small_png: bytes, members: str) -> str:
    """A JSON body of the image, a prompt unless `members` has one, and `members` (raw JSON)."""
    image = base64.b64encode(small_png).decode()
    prompt = "" if '"prompt"' in members else '"prompt": "a cat", '
    return f'{{"image": "{image}", {prompt}{members}}}'


@pytest.mark.parametrize(
    ("members", "field"),
    [
        (f'"prompt": "a {SURROGATE} cat"', "prompt"),
        (f'"negative_prompt": "{SURROGATE}"', "negative_prompt"),
        (f'"scheduler": {{"{SURROGATE}": 1}}', "scheduler.\\ud800"),
        (f'"scheduler": {{"beta_schedule": ["{SURROGATE}"]}}', "scheduler.beta_schedule"),
        (f'"{SURROGATE}\\n{FORGED_LINE}": 1', f"\\ud800\n{FORGED_LINE}"),
        (f'"webhook_url": "https://hooks.example.com/{SURROGATE}"', "webhook_url"),
    ],
)
def test_text_utf8_cannot_encode_is_422_naming_its_field(
    make_client, small_png, queue, members, field
):
    client = make_client(webhook_allowed_hosts=("hooks.example.com",))
    answer = post_raw(client, body_with(small_png, members), {"Idempotency-Key": "k"})
    assert_problem(answer, 422, "validation_error", field)
    assert queue.count == 0


def test_a_surrogate_in_a_forms_scheduler_json_is_422(client, small_png, queue):
    answer = client.post(
        "/v1/inversions",
        data={"prompt": "a cat", "scheduler": f'{{"beta_start": "{SURROGATE}"}}'},
        files={"image": ("a.png", small_png)},
    )
    assert_problem(answer, 422, "validation_error", "scheduler.beta_start")
    assert queue.count == 0


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/a b",
        "https://hooks.example.com/a\r\nX-Injected: 1",
        "https://hooks.example.com/a\tb",
        "https://hooks.example.com/\x7f",
    ],
)
def test_a_webhook_url_with_a_space_or_control_character_is_422(
    make_client, submit, small_png, queue, url
):
    # urlsplit drops CR, LF and tab without a word: unchecked, the URL stored is not the
    # URL delivered to, and a worker retries it as a failed delivery.
    client = make_client(webhook_allowed_hosts=("hooks.example.com",))
    answer = submit(client, small_png, webhook_url=url)
    body = assert_problem(answer, 422, "validation_error", "webhook_url")
    assert "spaces or control characters" in body["detail"]
    assert queue.count == 0


def test_every_json_list_is_cut_off_at_the_bound_while_parsing(make_client, small_png, queue):
    client = make_client(max_train_timesteps=10)
    # Eleven members, then text that is not JSON: a parser that read the whole list would
    # report the broken JSON; the bounded one stops at the eleventh member.
    betas = ", ".join(["0.01"] * 11) + ", this is not JSON"
    answer = post_raw(client, body_with(small_png, f'"scheduler": {{"trained_betas": [{betas}]}}'))
    body = assert_problem(answer, 422, "validation_error")
    assert "more than 10 members" in body["detail"], body
    # An object's members count alike.
    wide = ", ".join(f'"k{i}": 0' for i in range(11))
    answer = post_raw(client, body_with(small_png, f'"scheduler": {{{wide}}}'))
    assert "more than 10 members" in assert_problem(answer, 422, "validation_error")["detail"]
    assert queue.count == 0


def test_num_train_timesteps_is_bounded_by_the_setting(make_client, small_png, submit, queue):
    client = make_client(max_train_timesteps=500)
    scheduler = json.dumps({"num_train_timesteps": 501})
    answer = submit(client, small_png, scheduler=scheduler)
    body = assert_problem(answer, 422, "validation_error", "scheduler.num_train_timesteps")
    assert "limit of 500" in body["detail"]
    assert submit(client, small_png, scheduler='{"num_train_timesteps": 500}').status_code == 202


def test_a_body_counts_against_the_rate_before_it_is_parsed(make_client, small_png, redis, queue):
    client = make_client(auth_disabled=False, api_key_hashes=(HASH_A,), rate_limit_per_minute=2)
    auth = {"Authorization": f"Bearer {KEY_A}"}
    refused = [post_raw(client, "{not json", auth) for _ in range(3)]
    assert [a.status_code for a in refused] == [422, 422, 429]
    assert_problem(refused[2], 429, "rate_limited")
    (counter,) = redis.keys(rate_key(HASH_A, "*"))
    assert int(redis.get(counter)) == 3
    assert queue.count == 0
