"""The bounds on request bodies in progress, against a real `ddim-invert gateway` process
and raw sockets: uploads per key (429) and bytes per process (503), a chunked body counted
as it comes. A module of its own: its gateway and Redis serve these tests alone."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EVENT_GUARD_S, Processes, RedisServer, subprocess_env, wait_for
from tests.e2e.raw_http import (
    COMMON,
    KEYS,
    READ_S,
    address,
    answer_of,
    connect,
    part,
    read_all,
    upload_head,
)

pytestmark = pytest.mark.e2e

MAX_UPLOAD = 100_000
BUDGET = {
    "INVERSION_MAX_UPLOADS_PER_KEY": "2",
    "INVERSION_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
    "INVERSION_MAX_UPLOAD_BYTES_IN_PROGRESS": str(2 * MAX_UPLOAD + MAX_UPLOAD // 2),
}
"""The gateway whose bounds on bodies in progress are tested: two uploads per key, and
room for two bodies of MAX_UPLOAD bytes but not three. Its deadlines are the defaults
(60 s, far beyond these tests): the uploads it holds stay until the test closes them."""


@pytest.fixture(scope="module")
def budget_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("budget-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bounded(
    budget_redis: RedisServer, model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int]]:
    started = Processes(
        subprocess_env(budget_redis.url, model_cache_dir), tmp_path_factory.mktemp("budget")
    )
    try:
        yield address(started.gateway(**COMMON, **BUDGET))
    finally:
        started.stop_all()


class Held:
    """Uploads whose head and first bytes were sent, and whose rest never comes.

    A probe that reaches the gateway before a held upload was taken in can take that
    upload's place, and the held one gets the refusal: `renew` sends such a one again,
    so that, polled with the probes, the held uploads end up holding their places
    whatever the machine's speed."""

    def __init__(self, gateway: tuple[str, int], uploads: list[tuple[str, int]]) -> None:
        self.gateway = gateway
        self.uploads = uploads
        self.socks = [self._send(key, length) for key, length in uploads]

    def _send(self, key: str, length: int) -> socket.socket:
        sock = connect(self.gateway)
        sock.sendall(upload_head(key, length) + part(100))
        return sock

    def renew(self) -> None:
        for index, (key, length) in enumerate(self.uploads):
            sock = self.socks[index]
            sock.setblocking(False)
            try:
                answered = True  # an answer came, or the connection was closed
                sock.recv(1)
            except BlockingIOError:
                answered = False  # nothing to read: still being received
            sock.setblocking(True)
            if answered:
                sock.close()
                self.socks[index] = self._send(key, length)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def refusal(
    gateway: tuple[str, int], key: str, length: int = MAX_UPLOAD
) -> tuple[int, dict[str, str], bytes] | None:
    """A new upload's answer if it is refused at once; None if it is being received (no
    answer within PROBE_S: a refusal slower than that is seen by the next poll)."""
    with connect(gateway) as sock:
        sock.sendall(upload_head(key, length) + part(100))
        sock.settimeout(PROBE_S)
        try:
            raw = sock.recv(65536)
        except TimeoutError:
            return None
        sock.settimeout(READ_S)
        return answer_of(raw + read_all(sock))


PROBE_S = 0.5
"""How long a probe waits for a refusal before it counts as taken in. Not a bound: a
wait polls until the refusal it expects comes (EVENT_GUARD_S)."""


def refused_while_held(held: Held, key: str, length: int = MAX_UPLOAD):
    held.renew()
    return refusal(held.gateway, key, length)


SMALL = MAX_UPLOAD // 10
"""A body length of which the process's budget holds many: only the per-key bound acts."""


def test_uploads_in_progress_are_bounded_per_key(bounded):
    held = Held(bounded, [(KEYS[0], SMALL)] * 2)
    try:
        refused = wait_for(
            lambda: refused_while_held(held, KEYS[0], SMALL), EVENT_GUARD_S, "a third's 429"
        )
        code, headers, body = refused
        assert (code, json.loads(body)["code"]) == (429, "rate_limited")
        assert headers["connection"] == "close" and int(headers["retry-after"]) >= 1
        assert refusal(bounded, KEYS[1], SMALL) is None  # another key uploads meanwhile
    finally:
        held.close()
    wait_for(lambda: refusal(bounded, KEYS[0], SMALL) is None, EVENT_GUARD_S, "the places")


def test_upload_bytes_in_progress_are_bounded_per_process(bounded):
    held = Held(bounded, [(KEYS[0], MAX_UPLOAD), (KEYS[1], MAX_UPLOAD)])
    try:
        refused = wait_for(
            lambda: refused_while_held(held, KEYS[2]), EVENT_GUARD_S, "the process's 503"
        )
        code, headers, body = refused
        assert (code, json.loads(body)["code"]) == (503, "service_unavailable")
        assert int(headers["retry-after"]) >= 1
    finally:
        held.close()
    wait_for(lambda: refusal(bounded, KEYS[2]) is None, EVENT_GUARD_S, "the bytes given back")


def test_a_chunked_body_reserves_the_process_budget_as_it_comes(bounded):
    # Two declared uploads reserve 2 x MAX_UPLOAD of the budget, leaving MAX_UPLOAD / 2:
    # a chunked upload, which declares nothing, is stopped once its bytes pass that.
    held = Held(bounded, [(KEYS[0], MAX_UPLOAD), (KEYS[1], MAX_UPLOAD)])
    try:
        wait_for(lambda: refused_while_held(held, KEYS[2]), EVENT_GUARD_S, "the reservations")
        with connect(bounded) as sock:
            head = upload_head(KEYS[2], 0).replace(
                b"Content-Length: 0", b"Transfer-Encoding: chunked"
            )
            first = part(100)
            sock.sendall(head + b"%x\r\n" % len(first) + first + b"\r\n")
            chunk = b"\x89" * 10_000
            # Refused mid-body, the rest is still being sent: the gateway reads and drops
            # it for INVERSION_HTTP_LINGER_S, so the answer is read, not a reset.
            with contextlib.suppress(OSError):
                for _ in range(MAX_UPLOAD // len(chunk)):
                    sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            code, headers, body = answer_of(read_all(sock))
        assert (code, json.loads(body)["code"]) == (503, "service_unavailable")
        assert int(headers["retry-after"]) >= 1
    finally:
        held.close()
