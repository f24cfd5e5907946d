"""`Prefer: wait` and event streams sleep on one job-events listener: no thread, no poll.

Real Redis throughout (pub/sub is the point); the route-level tests serve the app with an
in-process uvicorn, so that streams stay open while the test looks at the gateway.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import anyio.to_thread
import httpx
import redis
import redis.asyncio
import uvicorn
from PIL import Image
from rq.job import Job

from ddim_inversion.keys import JOB_EVENTS_CHANNEL, ended_key, publish_job_event
from service import auth
from service.app import create_app
from service.listener import JobListener, Watch
from service.protocol import wait_until_ended
from service.settings import GatewaySettings
from tests.conftest import EVENT_GUARD_S, STOP_GUARD_S, free_port, wait_for

JOB = "6f1c2a53-3f7e-4f4e-9d7c-6b0c1f2b9a11"
NEVER_S = 3600.0
"""A re-read period no test outlives: only a published event can wake a waiter."""


async def _wait(url: str, job_id: str, wait_s: float, reread_s: float = NEVER_S) -> bool:
    client = redis.asyncio.Redis.from_url(url)
    listener = JobListener(client, reread_s=reread_s)
    try:
        return await wait_until_ended(listener, job_id, wait_s)
    finally:
        await listener.close()
        await client.aclose()


def _end_later(url: str, job_id: str, publish: bool, after_s: float = 0.3) -> threading.Timer:
    """What a worker does at a job's end: write the status, then announce it (or not)."""

    def end() -> None:
        connection = redis.Redis.from_url(url)
        connection.hset(Job.key_for(job_id), "status", "finished")
        if publish:
            publish_job_event(connection, job_id)
        connection.close()

    timer = threading.Timer(after_s, end)
    timer.start()
    return timer


def test_a_published_event_ends_the_wait(redis_url, redis_client):
    redis_client.hset(Job.key_for(JOB), "status", "started")
    _end_later(redis_url, JOB, publish=True)
    # Without the message nothing would wake the waiter before the wait runs out.
    assert asyncio.run(_wait(redis_url, JOB, EVENT_GUARD_S)) is True


def test_a_job_that_ends_without_a_message_ends_the_wait_at_a_re_read(redis_url, redis_client):
    # A job lost with its worker is failed by RQ's cleanup, which publishes nothing.
    redis_client.hset(Job.key_for(JOB), "status", "started")
    _end_later(redis_url, JOB, publish=False)
    assert asyncio.run(_wait(redis_url, JOB, EVENT_GUARD_S, reread_s=0.2)) is True


def test_the_wait_runs_out_or_ends_at_once(redis_url, redis_client):
    redis_client.hset(Job.key_for(JOB), "status", "started")
    assert asyncio.run(_wait(redis_url, JOB, 0.3)) is False
    redis_client.rpush(ended_key(JOB), "succeeded")  # the signal, status not yet
    assert asyncio.run(_wait(redis_url, JOB, EVENT_GUARD_S)) is True
    assert asyncio.run(_wait(redis_url, "no-such-job", EVENT_GUARD_S)) is True


def test_one_read_serves_every_waiter_of_a_job():
    reads = []

    async def read() -> int:
        reads.append(1)
        await asyncio.sleep(0.05)
        return len(reads)

    async def main() -> list[int]:
        watch = Watch(read, reread_s=NEVER_S)
        first = await asyncio.gather(*(watch.current() for _ in range(50)))
        watch.notify()
        second = await asyncio.gather(*(watch.current() for _ in range(50)))
        return first + second

    assert asyncio.run(main()) == [1] * 50 + [2] * 50


def test_the_listener_subscribes_again_after_losing_its_connection(redis_url, redis_client):
    redis_client.hset(Job.key_for(JOB), "status", "started")

    def subscribers() -> int:
        return dict(redis_client.pubsub_numsub(JOB_EVENTS_CHANNEL))[JOB_EVENTS_CHANNEL.encode()]

    def cut_and_end() -> None:
        wait_for(lambda: subscribers() == 1, EVENT_GUARD_S, "the listener to subscribe")
        redis_client.client_kill_filter(_type="pubsub")
        wait_for(lambda: subscribers() == 1, EVENT_GUARD_S, "the listener to subscribe again")
        redis_client.hset(Job.key_for(JOB), "status", "finished")
        publish_job_event(redis_client, JOB)

    cutter = threading.Thread(target=cut_and_end)
    cutter.start()
    assert asyncio.run(_wait(redis_url, JOB, EVENT_GUARD_S)) is True
    cutter.join()


def test_closing_ends_the_listener_even_when_its_cancellation_is_swallowed(redis_url):
    # redis-py can swallow a cancellation that lands while a subscription connects; the
    # listener then went on listening and the gateway's shutdown waited on it for good.
    swallowed = []
    connecting = asyncio.Event()

    class SwallowingPubSub(redis.asyncio.client.PubSub):
        async def subscribe(self, *args: Any, **kwargs: Any) -> None:
            connecting.set()
            try:
                await asyncio.Event().wait()  # "connecting" until the cancellation lands
            except asyncio.CancelledError:
                swallowed.append(True)
            await super().subscribe(*args, **kwargs)

    async def open_and_close() -> bool:
        client = redis.asyncio.Redis.from_url(redis_url)
        client.pubsub = lambda **kwargs: SwallowingPubSub(client.connection_pool, **kwargs)
        listener = JobListener(client)
        async with listener.watch(JOB, "ended", lambda: asyncio.sleep(0)):
            await asyncio.wait_for(connecting.wait(), EVENT_GUARD_S)
        closing = asyncio.ensure_future(listener.close())
        # A listener left listening: never done (the guard ends the test's wait).
        await asyncio.wait({closing}, timeout=EVENT_GUARD_S)
        closed = closing.done()
        closing.cancel()
        await client.aclose()
        return closed

    assert asyncio.run(open_and_close()) is True
    assert swallowed == [True]


# -- through the routes, on a real server ------------------------------------------------

KEY_A, KEY_B = "key-a", "key-b"
METRICS_TOKEN = "scraper"


LONG_WAIT_S = 3600
"""A `Prefer: wait` (and the gateway's cap) that no test outlasts: such a wait ends by the
event under test, or with the test, never by running out on a slow machine."""


def _settings(redis_url: str, **overrides: Any) -> GatewaySettings:
    fields: dict[str, Any] = {
        "redis_url": redis_url,
        "api_key_hashes": (auth.key_hash(KEY_A), auth.key_hash(KEY_B)),
        "metrics_token_hash": auth.key_hash(METRICS_TOKEN),
        "default_model": "tiny",  # no worker announces one: the jobs queue for it
    }
    return GatewaySettings(**(fields | overrides))


@contextmanager
def serve(settings: GatewaySettings, reread_s: float | None = None) -> Iterator[str]:
    """The app on an in-process uvicorn; `/_threads` says how many threadpool threads are
    busy and how many waits the listener holds (read on the server's own event loop)."""
    app = create_app(settings)

    @app.get("/_threads")
    async def threads(limit: int | None = None) -> dict[str, int]:
        limiter = anyio.to_thread.current_default_thread_limiter()
        if limit is not None:
            limiter.total_tokens = limit
        if reread_s is not None:
            app.state.listener.reread_s = reread_s
        return {"busy": limiter.borrowed_tokens, "open": app.state.listener.open_waits}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, EVENT_GUARD_S, "the in-process gateway")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(STOP_GUARD_S)
        assert not thread.is_alive(), "the in-process gateway did not stop"


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


def _submit(base: str, key: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        base + "/v1/inversions",
        data={"prompt": "a cat", "num_inference_steps": "3"},
        files={"image": ("small.png", PNG, "image/png")},
        headers={"X-API-Key": key, **(headers or {})},
        timeout=EVENT_GUARD_S,
    )


def test_waits_and_streams_hold_no_thread(redis_url):
    """80 waits and streams on a queued job, a threadpool of 4: while they are all open,
    none of the 4 threads is busy, and another request answers."""
    # 40 uploads of one key at once: over its bound of bodies in progress, lifted here, and
    # waiting for a decoder rather than getting 429: waits are under test.
    settings = _settings(
        redis_url,
        max_waiters_per_key=500,
        max_uploads_per_key=500,
        max_decodes_per_key=40,
        max_prefer_wait_s=LONG_WAIT_S,
    )
    with serve(settings, reread_s=NEVER_S) as base:
        httpx.get(base + "/_threads", params={"limit": 4})
        job = _submit(base, KEY_A).json()["id"]  # no worker: it stays queued
        seen: dict[str, int] = {}

        async def attack() -> None:
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(
                base_url=base, timeout=EVENT_GUARD_S, limits=limits
            ) as http:
                headers = {"X-API-Key": KEY_A}

                async def stream() -> None:
                    url = f"/v1/inversions/{job}/events"
                    async with http.stream("GET", url, headers=headers) as answer:
                        assert answer.status_code == 200
                        async for _ in answer.aiter_lines():
                            pass

                async def wait() -> None:
                    await http.post(
                        "/v1/inversions",
                        data={"prompt": "a cat"},
                        files={"image": ("small.png", PNG, "image/png")},
                        headers={**headers, "Prefer": f"wait={LONG_WAIT_S}"},
                    )

                tasks = [asyncio.create_task(stream()) for _ in range(40)]
                tasks += [asyncio.create_task(wait()) for _ in range(40)]
                for _ in range(600):
                    state = (await http.get("/_threads")).json()
                    if state["open"] == 80:
                        break
                    await asyncio.sleep(0.05)
                # The streams' first reads may still be in the threadpool (a loaded
                # machine): wait for them to settle, then sample. A wait that held a
                # thread would keep all 4 busy for good.
                samples: list[dict[str, int]] = []
                for _ in range(600):
                    samples = [*samples[-4:], (await http.get("/_threads")).json()]
                    if len(samples) == 5 and all(s["busy"] == 0 for s in samples):
                        break
                    await asyncio.sleep(0.05)
                seen["open"] = min(s["open"] for s in samples)
                seen["busy"] = max(s["busy"] for s in samples)
                other = await http.get(f"/v1/inversions/{job}", headers={"X-API-Key": KEY_A})
                seen["other"] = other.status_code
                seen["done"] = sum(task.done() for task in tasks)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(attack())
    assert seen == {"open": 80, "busy": 0, "other": 200, "done": 0}


def _events(
    answer: httpx.Response, give_up_s: float = EVENT_GUARD_S
) -> list[tuple[str, dict[str, Any]]]:
    """The stream's events until it ends; a stream still open after `give_up_s` (far
    beyond any limit under test) fails the test instead of hanging it."""
    events, name = [], None
    give_up = time.monotonic() + give_up_s
    for line in answer.iter_lines():
        assert time.monotonic() < give_up, f"the stream did not end: {events}"
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: ") and name is not None:
            events.append((name, json.loads(line[6:])))
    return events


def test_a_stream_ends_at_its_lifetime_with_a_reconnect_event(redis_url):
    with serve(_settings(redis_url, max_stream_s=0.5)) as base:
        job = _submit(base, KEY_A).json()["id"]
        url = f"{base}/v1/inversions/{job}/events"
        with httpx.stream(
            "GET", url, headers={"X-API-Key": KEY_A}, timeout=EVENT_GUARD_S
        ) as answer:
            events = _events(answer)
    assert [name for name, _ in events] == ["status", "reconnect"]
    assert events[0][1]["status"] == "queued"
    assert events[1][1] == {"id": job, "after_s": 0.5}


def test_each_key_holds_at_most_its_limit_of_waits_and_streams(redis_url):
    with serve(_settings(redis_url, max_waiters_per_key=2)) as base:
        job_a = _submit(base, KEY_A).json()["id"]
        job_b = _submit(base, KEY_B).json()["id"]

        def events(job: str, key: str) -> Any:
            url = f"{base}/v1/inversions/{job}/events"
            return httpx.stream("GET", url, headers={"X-API-Key": key}, timeout=EVENT_GUARD_S)

        # Refusals hold nothing: a missing job's 404 leaves both places free.
        for _ in range(3):
            with events(JOB, KEY_A) as missing:
                assert missing.status_code == 404
        with events(job_a, KEY_A) as first, events(job_a, KEY_A) as second:
            assert (first.status_code, second.status_code) == (200, 200)
            with events(job_a, KEY_A) as third:
                assert third.status_code == 429
                third.read()
                assert third.json()["code"] == "rate_limited"
                assert int(third.headers["retry-after"]) > 0
            # A wait over the limit is not applied: the job is queued, answered at once.
            waited = _submit(base, KEY_A, {"Prefer": "wait=60"})
            assert waited.status_code == 202 and "preference-applied" not in waited.headers
            view = httpx.get(base + waited.headers["location"], headers={"X-API-Key": KEY_A})
            assert view.json()["status"] == "queued"
            # Another key is not affected.
            with events(job_b, KEY_B) as other:
                assert other.status_code == 200
                scrape = {"Authorization": f"Bearer {METRICS_TOKEN}"}
                metrics = httpx.get(base + "/metrics", headers=scrape).text
                assert "\ninversion_open_waits 3.0\n" in metrics
        # Both places are given back when the streams close.
        wait_for(
            lambda: httpx.get(base + "/_threads").json()["open"] == 0, EVENT_GUARD_S, "the release"
        )
        with events(job_a, KEY_A) as again, events(job_a, KEY_A) as again2:
            assert (again.status_code, again2.status_code) == (200, 200)


def test_canceling_a_queued_job_ends_its_streams_and_waits(redis_url):
    # No re-read in the test's time: only the gateway's announcement of the cancel wakes them.
    with serve(_settings(redis_url, max_prefer_wait_s=LONG_WAIT_S), reread_s=NEVER_S) as base:
        httpx.get(base + "/_threads")  # sets the re-read period before any watch exists
        idem = {"Idempotency-Key": "one-job"}
        job = _submit(base, KEY_A, idem).json()["id"]
        url = f"{base}/v1/inversions/{job}/events"
        with (
            ThreadPoolExecutor(1) as pool,
            httpx.stream("GET", url, headers={"X-API-Key": KEY_A}, timeout=EVENT_GUARD_S) as stream,
        ):
            waited = pool.submit(_submit, base, KEY_A, idem | {"Prefer": f"wait={LONG_WAIT_S}"})
            wait_for(
                lambda: httpx.get(base + "/_threads").json()["open"] == 2, EVENT_GUARD_S, "both"
            )
            cancel = httpx.delete(f"{base}/v1/inversions/{job}", headers={"X-API-Key": KEY_A})
            assert cancel.status_code == 202
            events = _events(stream)
            answer = waited.result()
    assert [name for name, _ in events][-1] == "end"
    assert events[-1][1] == {"id": job, "status": "canceled"}
    assert answer.status_code == 200 and answer.json()["status"] == "canceled"


def test_the_anonymous_owner_has_no_limit_of_waits_and_streams(redis_url):
    # Auth disabled: every caller is one owner, and no per-key limit applies.
    settings = GatewaySettings(
        redis_url=redis_url, auth_disabled=True, max_waiters_per_key=1, default_model="tiny"
    )
    with serve(settings) as base:
        job = _submit(base, "").json()["id"]
        url = f"{base}/v1/inversions/{job}/events"
        with (
            httpx.stream("GET", url, timeout=EVENT_GUARD_S) as one,
            httpx.stream("GET", url) as two,
        ):
            assert (one.status_code, two.status_code) == (200, 200)


def test_a_wait_that_runs_out_answers_202_with_the_preference_applied(redis_url):
    with serve(_settings(redis_url)) as base:
        answer = _submit(base, KEY_A, {"Prefer": "wait=1"})
    assert answer.status_code == 202
    assert answer.headers["preference-applied"] == "wait=1"
    assert answer.json()["status"] == "queued"
