"""The page at `/` in a real browser, against a real gateway and worker."""

from __future__ import annotations

import base64
import math
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load, load_file, save

from service import protocol
from service.auth import key_hash
from tests.conftest import ROOT, SAMPLES
from tests.e2e.service_calls import status

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

SCREENSHOT = os.environ.get("BROWSER_SCREENSHOT")
"""Where the finished-job test saves a screenshot of the page (`make screenshot`)."""


def channel_grays(latents: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8: each channel scaled to its own min..max, as the page draws it."""
    planes = latents[0].astype(np.float64)
    low = planes.min(axis=(1, 2), keepdims=True)
    span = planes.max(axis=(1, 2), keepdims=True) - low
    return np.round(255 * (planes - low) / np.where(span == 0, 1, span)).astype(np.uint8)


def test_drop_submit_watch_see_and_download(shared_service, tab, tmp_path: Path):
    base, page = shared_service.url, tab.page
    page.goto(base + "/")
    # The gateway lists the pool's models (GET /v1/models): the model field offers them.
    page.wait_for_selector("#model", state="visible")
    offered = page.eval_on_selector_all("#models option", "os => os.map(o => o.value)")
    served = [m["name"] for m in httpx.get(f"{base}/v1/models").json()["models"]]
    assert offered == served and "tiny" in offered
    tab.drop("#drop-zone", SAMPLES / "chelsea.png")
    page.wait_for_selector("#input-preview:not([hidden])")
    page.fill("#prompt", "a photo of a cat")
    # Enough steps that the stream (polled each 0.1 s) reports some between start and end.
    page.fill("#num_inference_steps", "50")
    assert page.is_checked("#verify")
    page.click("#submit")
    page.wait_for_selector("#job[data-status=succeeded]")
    page.wait_for_selector("#result:not([hidden])")

    job_id = page.inner_text("#job-id")
    view = status(base, job_id)
    result = view["result"]
    assert view["params"]["verify"] is True and view["params"]["num_inference_steps"] == 50

    # The progress advanced through the stream, never backwards, to the last step.
    # With verify, the total counts the sampling steps back as well as the inversion's.
    recorded = page.evaluate("window.__progress")
    total = recorded[-1][1]
    assert total == 2 * 50
    seen = [step for step, of in recorded if of == total]
    assert seen == sorted(seen) and seen[-1] == total
    assert any(0 < step < total for step in seen), recorded

    # The reconstruction, at the job's resolution, and the figures of its metadata.
    size = page.eval_on_selector("#reconstruction", "i => [i.naturalWidth, i.naturalHeight]")
    assert size == [result["width"], result["height"]]
    assert page.is_visible("#reconstruction") and page.is_visible("#result-input")
    assert page.inner_text("#psnr") == f"{result['reconstruction_psnr']:.2f} dB"
    shown_error = float(page.inner_text("#latent-error"))
    # Shown with toExponential(3): four significant digits, within 5e-4 relative.
    assert math.isclose(shown_error, result["reconstruction_latent_error"], rel_tol=1e-3)

    # The channel previews are the served latents, channel by channel.
    served_bytes = httpx.get(f"{base}/v1/inversions/{job_id}/latents").content
    latents = load(served_bytes)["latents"]
    drawn = page.eval_on_selector_all(
        "#channels canvas",
        """cs => cs.map(c => Array.from(
            c.getContext("2d").getImageData(0, 0, c.width, c.height).data
        ).filter((_, i) => i % 4 === 0))""",
    )
    expected = channel_grays(latents)
    assert np.array_equal(np.array(drawn, dtype=np.uint8).reshape(expected.shape), expected)

    # The download is the result file: it loads, and equals what the API serves.
    with page.expect_download() as info:
        page.click("#download")
    saved = tmp_path / "download.safetensors"
    info.value.save_as(saved)
    assert info.value.suggested_filename == f"{job_id}.safetensors"
    assert saved.read_bytes() == served_bytes
    downloaded = load_file(saved)
    assert set(downloaded) == set(load(served_bytes))
    assert np.array_equal(downloaded["latents"], latents)

    tab.assert_clean(base)
    if SCREENSHOT:
        page.click("#result summary")  # the metadata, open
        page.screenshot(path=str(ROOT / SCREENSHOT), full_page=True)


def test_a_refused_parameter_shows_the_problem_by_its_field(shared_service, tab):
    base, page = shared_service.url, tab.page
    page.goto(base + "/")
    page.fill("#prompt", "a cup of coffee")
    page.click("#submit")  # no image yet: said by the image field, nothing sent
    assert page.inner_text('[data-error-for="image"]') == "pick or drop an image first"
    assert not [r for r in tab.requests if "/v1/inversions" in r.url]
    page.set_input_files("#image", str(SAMPLES / "coffee.png"))
    for field, value in (("num_inference_steps", "5000"), ("resolution", "100x100")):
        page.fill(f"#{field}", value)
        # The same submission straight to the API: the page shows its problem, by its field.
        with (SAMPLES / "coffee.png").open("rb") as image:
            answer = httpx.post(
                base + "/v1/inversions",
                data={"prompt": "a cup of coffee", field: value},
                files={"image": image},
            )
        assert answer.status_code == 422 and answer.json()["field"] == field
        page.click("#submit")
        message = page.wait_for_selector(f'[data-error-for="{field}"]:not([hidden])')
        assert message.inner_text() == answer.json()["detail"]
        assert page.get_attribute(f"#{field}", "aria-invalid") == "true"
        assert page.is_hidden("#form-error") and page.is_hidden("#job")
        page.fill(f"#{field}", "")
    tab.assert_clean(base)


def test_cancel_stops_the_running_job(shared_service, tab):
    base, page = shared_service.url, tab.page
    page.goto(base + "/")
    page.set_input_files("#image", str(SAMPLES / "coffee.png"))
    page.fill("#prompt", "a cup of coffee")
    page.fill("#num_inference_steps", "500")  # with verify: 1000 steps, seconds of work
    page.click("#submit")
    page.wait_for_selector("#progress-text:text-matches('^step [1-9]')")
    page.click("#cancel")
    page.wait_for_selector("#job[data-status=canceled]")
    view = status(base, page.inner_text("#job-id"))
    assert view["status"] == "canceled" and view["error"]["code"] == "canceled"
    assert page.inner_text("#job-detail") == f"canceled: {view['error']['message']}"
    step, total = page.eval_on_selector("#progress", "p => [p.value, p.max]")
    assert 0 < step < total == 1000  # stopped part way
    assert page.is_hidden("#result") and page.is_enabled("#submit")
    tab.assert_clean(base)


def test_with_auth_on_the_pasted_key_goes_in_a_header_only(shared_processes, tab):
    key = "page-test-key-7f3a"
    base = shared_processes.gateway(
        INVERSION_AUTH_DISABLED="false", INVERSION_API_KEY_HASHES=key_hash(key)
    )
    page = tab.page
    page.goto(base + "/")  # the page itself is public
    page.set_input_files("#image", str(SAMPLES / "chelsea.png"))
    page.fill("#prompt", "a photo of a cat")
    page.fill("#num_inference_steps", "8")

    page.click("#submit")  # no key yet: the gateway's 401, by the key field
    refused = page.wait_for_selector('[data-error-for="api_key"]:not([hidden])')
    assert refused.inner_text() == httpx.post(base + "/v1/inversions").json()["detail"]

    page.fill("#api_key", key)
    page.click("#submit")
    page.wait_for_selector("#job[data-status=succeeded]")
    page.wait_for_selector("#result:not([hidden])")
    job_id = page.inner_text("#job-id")
    headers = {"Authorization": f"Bearer {key}"}
    assert wait_status_with(base, job_id, headers)["status"] == "succeeded"

    api_calls = [r for r in tab.requests if "/v1/" in r.url]
    assert {r.method for r in api_calls} == {"GET", "POST"}
    authorized = [r for r in api_calls if r.headers.get("authorization") == f"Bearer {key}"]
    # Everything after the key was pasted: submit, events, status, latents, reconstruction.
    assert len(authorized) >= 5 and api_calls[-1] in authorized
    tab.assert_clean(base, key)

    # Kept for this tab's session only, and there again after a reload.
    assert page.evaluate("sessionStorage.getItem('inversion.apiKey')") == key
    assert page.evaluate("localStorage.length") == 0
    page.reload()
    assert page.input_value("#api_key") == key


def wait_status_with(base: str, job_id: str, headers: dict[str, str]) -> dict:
    answer = httpx.get(f"{base}/v1/inversions/{job_id}", headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_the_page_reads_float16_and_float32_safetensors(shared_service, tab):
    """The page's safetensors reader against the Python library's own files."""
    page = tab.page
    page.goto(shared_service.url + "/")
    rng = np.random.default_rng(7)
    values = rng.normal(size=(1, 4, 3, 5)).astype(np.float32)
    values[0, 0, 0, :4] = [0.0, -0.0, 65504.0, 6.1e-5]  # the largest half, a subnormal
    for dtype in (np.float32, np.float16):
        data = save(
            {"latents": values.astype(dtype), "timesteps": np.arange(3, dtype=np.int64)},
            metadata={"model": "tiny"},
        )
        parsed = page.evaluate(
            """async (bytes) => {
                const {parseSafetensors} = await import("/static/safetensors.js");
                const {tensors, metadata} = parseSafetensors(new Uint8Array(bytes).buffer);
                return {
                    latents: Array.from(tensors.latents.data),
                    shape: tensors.latents.shape,
                    timesteps: Array.from(tensors.timesteps.data, Number),
                    metadata,
                };
            }""",
            list(data),
        )
        assert parsed["shape"] == [1, 4, 3, 5]
        assert parsed["timesteps"] == [0, 1, 2] and parsed["metadata"] == {"model": "tiny"}
        expected = values.astype(dtype).astype(np.float32).ravel()
        assert np.array_equal(np.array(parsed["latents"], dtype=np.float32), expected)
    tab.assert_clean(shared_service.url)


def test_the_event_parser_reads_the_servers_events_cut_anywhere(shared_service, tab):
    """The client's SSE parser against the gateway's own encoder, in chunks cut at every
    offset, with LF and CRLF line ends and a keep-alive comment between events."""
    events = [("status", {"id": "j", "status": "running"}), ("progress", {"step": 3, "total": 9})]
    events.append(("end", {"id": "j", "status": "succeeded", "note": "a: b\u00e9"}))
    stream = (
        protocol.sse(*events[0])
        + b": keep-alive\n\n"
        + b"".join(protocol.sse(*e) for e in events[1:])
    )
    page = tab.page
    page.goto(shared_service.url + "/")
    for text in (stream.decode(), stream.decode().replace("\n", "\r\n")):
        parsed = page.evaluate(
            """async (text) => {
                const {SseParser} = await import("/static/inversion-client.js");
                const read = (chunks) => {
                    const parser = new SseParser();
                    return chunks.flatMap((c) => parser.push(c)).map(
                        (m) => [m.event, JSON.parse(m.data)]
                    );
                };
                const runs = [];
                for (let cut = 0; cut <= text.length; cut++) {
                    runs.push(read([text.slice(0, cut), text.slice(cut)]));
                }
                runs.push(read([...text]));  // one character at a time
                return runs;
            }""",
            text,
        )
        assert len(parsed) == len(text) + 2
        assert all(run == [[name, data] for name, data in events] for run in parsed)
    tab.assert_clean(shared_service.url)


def test_the_client_submits_json_as_it_submits_a_form(shared_service, tab):
    """`submit(..., {body: "json"})` (the image as base64) makes the job the form makes: the
    same parameters, and the same image bytes (an Idempotency-Key replays across them)."""
    base, page = shared_service.url, tab.page
    page.goto(base + "/")
    answers = page.evaluate(
        """async ({data}) => {
            const {InversionClient} = await import("/static/inversion-client.js");
            const client = new InversionClient();
            const image = new Blob([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))]);
            const params = {
                prompt: "a photo of a cat", num_inference_steps: 2, resolution: "64x128",
                scheduler: {timestep_spacing: "trailing"}, verify: false, seed: null,
            };
            const byJson = await client.submit(image, params, {body: "json"});
            const byForm = await client.submit(image, params, {body: "form"});
            const replay = await client.submit(image, params, {body: "form", idempotencyKey: "k"});
            const again = await client.submit(image, params, {body: "json", idempotencyKey: "k"});
            const views = [];
            for (const job of [byJson, byForm]) views.push(await client.status(job.id));
            return {views, replayed: [replay.id, again.id]};
        }""",
        {"data": base64.b64encode((SAMPLES / "chelsea.png").read_bytes()).decode()},
    )
    # A job that has already finished also shows what it resolved: compare what was sent.
    by_json, by_form = (
        {name: value for name, value in view["params"].items() if not name.startswith("resolved_")}
        for view in answers["views"]
    )
    assert answers["views"][0]["id"] != answers["views"][1]["id"]
    assert by_json == by_form
    assert by_json["resolution"] == [64, 128]
    assert by_json["scheduler"] == {"timestep_spacing": "trailing"}
    assert answers["replayed"][0] == answers["replayed"][1]
    tab.assert_clean(base)
