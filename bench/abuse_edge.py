"""The attacks of `bench/abuse.py` on the gateway's edge (issue 21, points 1 and 7): held
and dripped request bodies, a head that arrives whole, and what a caller without a key
reads. Raw sockets against the `main` gateway, the one key B submits to meanwhile.

Each returns (key A's answers, what came of it) and calls `ctx.b.start()` while the attack
holds what it holds. Nothing is asserted: they report what happens.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from bench.abuse_attacks import Ctx
from bench.abuse_stack import BODY_TIMEOUT_S, KEY_A, codes

READ_S = 4 * BODY_TIMEOUT_S
"""A socket read blocks at most this long: far beyond the main gateway's body deadline."""


def _address(base: str) -> tuple[str, int]:
    return "127.0.0.1", int(base.rsplit(":", 1)[1])


def _status(raw: bytes) -> int | str:
    try:
        return int(raw.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return "none"


def _drain(sock: socket.socket) -> tuple[bytes, bool]:
    """What the gateway sends until it closes (True) or READ_S passes (False)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        return b"".join(chunks), False
    except OSError:
        pass
    return b"".join(chunks), True


def _open(base: str, head: bytes) -> socket.socket:
    sock = socket.create_connection(_address(base))
    sock.settimeout(READ_S)
    # Refused and closed before all of it was sent: _drain reads the answer.
    with contextlib.suppress(OSError):
        sock.sendall(head)
    return sock


def _upload_head(path: str, key: str, length: int) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Length: {length}\r\n"
    head += f"X-API-Key: {key}\r\n" if key else ""
    head += "Content-Type: multipart/form-data; boundary=xyz\r\n\r\n"
    part = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    return head.encode() + part


def held_bodies(ctx: Ctx) -> tuple[str, str]:
    """Point 1: 40 keyless POSTs to /healthz declaring 1 MB and sending 10 bytes; then 20
    uploads of key A (over its bound of 16) sending 2 MB of a declared 4 MB, then silence."""
    main = ctx.stack.main
    keyless = [_open(main, _upload_head("/healthz", "", 1_000_000) + b"x" * 10) for _ in range(40)]
    uploads = [
        _open(main, _upload_head("/v1/inversions", KEY_A, 4_000_000) + b"\x89" * 2_000_000)
        for _ in range(20)
    ]
    assert ctx.b is not None
    ctx.b.start()  # while A's uploads are held (until the body deadline)
    started = time.monotonic()
    with ThreadPoolExecutor(len(keyless) + len(uploads)) as pool:
        answers = list(pool.map(_drain, keyless + uploads))
    waited = time.monotonic() - started
    for sock in keyless + uploads:
        sock.close()
    keyless_answers, upload_answers = answers[: len(keyless)], answers[len(keyless) :]
    closed = sum(done for _, done in keyless_answers)
    cut = sum(done for _, done in upload_answers)
    summary = (
        f"keyless {codes(_status(raw) for raw, _ in keyless_answers)}; "
        f"A's uploads {codes(_status(raw) for raw, _ in upload_answers)}"
    )
    outcome = (
        f"keyless closed by the gateway: {closed} of {len(keyless)}; A's uploads ended: "
        f"{cut} of {len(uploads)} within {waited:.1f} s (body deadline {BODY_TIMEOUT_S:g} s)"
    )
    return summary, outcome


def whole_head(ctx: Ctx) -> tuple[str, str]:
    """Point 7: a 40 KB Authorization header and the head's end in one write, 20 times."""
    head = b"GET /v1/capacity HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer "
    head += b"k" * 40_000 + b"\r\n\r\n"
    assert ctx.b is not None
    ctx.b.start()
    answers = []
    for _ in range(20):
        with _open(ctx.stack.main, head) as sock:
            answers.append(_status(_drain(sock)[0]))
    return codes(answers), "a whole head over the limit"


def without_a_key(ctx: Ctx) -> tuple[str, str]:
    """Point 7: what /metrics, /readyz and a trailing-slash redirect tell a caller
    without a key (with forged Host and X-Forwarded-Proto)."""
    main = ctx.stack.main
    assert ctx.b is not None
    ctx.b.start()
    metrics = httpx.get(main + "/metrics", timeout=30)
    ready = httpx.get(main + "/readyz", timeout=30)
    forged = {"Host": "evil.example", "X-Forwarded-Proto": "https", "X-API-Key": KEY_A}
    redirect = httpx.get(main + "/v1/capacity/", headers=forged, timeout=30)
    answers = f"/metrics {metrics.status_code}; /readyz {ready.status_code}; "
    answers += f"/v1/capacity/ {redirect.status_code}"
    shown = "queue depth shown" if "inversion_queue_depth" in metrics.text else "no metrics"
    outcome = f"{shown}; /readyz {ready.text[:60]}; Location {redirect.headers.get('location')}"
    return answers, outcome


EDGE_ATTACKS: list[tuple[str, Callable[[Ctx], tuple[str, str]]]] = [
    ("21.1: held and dripped bodies", held_bodies),
    ("21.7: 40 KB Authorization, whole", whole_head),
    ("21.7: /metrics, /readyz, redirect without a key", without_a_key),
]
