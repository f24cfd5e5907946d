"""The gateway's edge against a real `ddim-invert gateway` process and raw sockets: a key
is checked from the headers before any body byte, a request head is bounded in time and
size, idle keep-alive connections are closed, and connections beyond the limit get 503.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import auth
from service.main import run
from service.settings import get_settings
from tests.conftest import EVENT_GUARD_S, Processes, RedisServer, subprocess_env, wait_for

pytestmark = pytest.mark.e2e

KEY = "edge-key"
EDGE = {
    "INVERSION_AUTH_DISABLED": "false",
    "INVERSION_API_KEY_HASHES": auth.key_hash(KEY),
    "INVERSION_HTTP_HEADER_TIMEOUT_S": "1",
    "INVERSION_HTTP_MAX_HEADER_BYTES": "8192",
    "INVERSION_HTTP_KEEPALIVE_S": "1",
    "INVERSION_HTTP_MAX_CONCURRENCY": "4",
}
READ_S = 30.0
"""How long a socket read may block: far beyond every limit under test, so a read that
runs into it means the gateway never answered."""


@pytest.fixture(scope="module")
def gateway(
    redis_server: RedisServer, model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int]]:
    procs = Processes(
        subprocess_env(redis_server.url, model_cache_dir), tmp_path_factory.mktemp("edge")
    )
    try:
        url = procs.gateway(**EDGE)
        yield "127.0.0.1", int(url.rsplit(":", 1)[1])
    finally:
        procs.stop_all()


def connect(gateway: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(gateway)
    sock.settimeout(READ_S)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def status_and_body(answer: bytes) -> tuple[int, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def upload_head(key_header: bytes = b"") -> bytes:
    return (
        b"POST /v1/inversions HTTP/1.1\r\nHost: gateway\r\n"
        b"Content-Type: multipart/form-data; boundary=xyz\r\n"
        b"Transfer-Encoding: chunked\r\n" + key_header + b"\r\n"
    )


@pytest.mark.parametrize("key_header", [b"", b"X-API-Key: not-a-key\r\n"])
def test_a_request_without_a_valid_key_is_refused_before_its_body(gateway, key_header):
    with connect(gateway) as sock:
        # Headers and the first chunk of an upload whose end never comes.
        sock.sendall(upload_head(key_header) + b"1000\r\n" + b"x" * 4096)
        code, body = status_and_body(read_all(sock))
    assert code == 401
    problem = json.loads(body)
    assert problem["code"] == "unauthorized" and problem["instance"] == "/v1/inversions"


def test_a_silent_or_dripping_request_head_is_cut_at_its_deadline(gateway):
    with connect(gateway) as silent, connect(gateway) as dripping:
        dripping.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")
        answer = b""
        for _ in range(int(READ_S / 0.2)):  # a header byte every 0.2 s, until refused
            try:
                dripping.sendall(b"X")
            except OSError:
                break
            dripping.settimeout(0.2)
            try:
                answer = dripping.recv(65536)
            except TimeoutError:
                continue
            break
        dripping.settimeout(READ_S)
        answer += read_all(dripping)
        assert status_and_body(answer)[0] == 408
        assert status_and_body(read_all(silent))[0] == 408


def test_an_oversized_request_head_is_refused(gateway):
    with connect(gateway) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Big: " + b"b" * 20_000)
        code, body = status_and_body(read_all(sock))
    assert code == 431 and json.loads(body)["code"] == "payload_too_large"
    with connect(gateway) as sock:  # a head within the limit is served
        head = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Ok: " + b"o" * 4000
        sock.sendall(head + b"\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


def test_an_oversized_head_arriving_whole_is_refused(gateway):
    # 40 KB of Authorization and the head's end in one write: the parser takes the whole
    # head in one read, so a bound that counts only incomplete heads never sees it.
    head = b"GET /v1/capacity HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer "
    with connect(gateway) as sock:
        sock.sendall(head + b"k" * 40_000 + b"\r\n\r\n")
        code, body = status_and_body(read_all(sock))
    assert code == 431 and json.loads(body)["code"] == "payload_too_large"


def test_a_trailing_slash_redirects_to_a_path_not_to_the_host_asked_for(gateway):
    # The gateway trusts X-Forwarded-Proto from loopback (uvicorn's proxy_headers), as
    # from a load balancer: an absolute Location would carry both forged values.
    with connect(gateway) as sock:
        sock.sendall(
            b"GET /v1/capacity/?x=1 HTTP/1.1\r\nHost: evil.example\r\n"
            b"X-Forwarded-Proto: https\r\nX-API-Key: " + KEY.encode() + b"\r\n"
            b"Connection: close\r\n\r\n"
        )
        head = read_all(sock).partition(b"\r\n\r\n")[0].decode().lower().split("\r\n")
    assert head[0].startswith("http/1.1 307 ")
    assert "location: /v1/capacity?x=1" in head


def test_an_idle_keep_alive_connection_is_closed_without_an_answer(gateway):
    with connect(gateway) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        answer = read_all(sock)  # until the keep-alive timeout closes the connection
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 ") == 1


def probe(gateway: tuple[str, int]) -> int:
    with connect(gateway) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
        return status_and_body(read_all(sock))[0]


def test_connections_beyond_the_limit_get_503(gateway):
    # Three uploads whose bodies never come hold three of the four places; the probe's
    # own connection is the fourth.
    held = [connect(gateway) for _ in range(3)]
    try:
        for sock in held:
            sock.sendall(upload_head(b"X-API-Key: " + KEY.encode() + b"\r\n") + b"10\r\n")
        wait_for(lambda: probe(gateway) == 503, EVENT_GUARD_S, "the gateway to reach its limit")
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: probe(gateway) == 200, EVENT_GUARD_S, "the places to be given back")


def test_the_gateway_command_hands_its_settings_to_uvicorn(monkeypatch):
    import uvicorn

    from service.http_protocol import BoundedHttpToolsProtocol

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: seen.update(options))
    for name, value in EDGE.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        run()
    finally:
        get_settings.cache_clear()
    assert seen["http"] is BoundedHttpToolsProtocol
    assert (seen["timeout_keep_alive"], seen["limit_concurrency"]) == (1, 4)
