"""Raw HTTP/1.1 over sockets for the edge tests: heads, multipart parts, answers."""

from __future__ import annotations

import socket

from service import auth
from tests.conftest import EVENT_GUARD_S

KEYS = ("bodies-key-a", "bodies-key-b", "bodies-key-c")


COMMON = {
    "INVERSION_AUTH_DISABLED": "false",
    "INVERSION_API_KEY_HASHES": ",".join(auth.key_hash(k) for k in KEYS),
}


READ_S = EVENT_GUARD_S
"""How long a socket read may block: the last guard, far beyond every deadline under
test, so a read that runs into it means the gateway never answered."""


def address(url: str) -> tuple[str, int]:
    return "127.0.0.1", int(url.rsplit(":", 1)[1])


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


def answer_of(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ", 2)[1]), headers, body


def upload_head(key: str, length: int, path: str = "/v1/inversions") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: gateway\r\nX-API-Key: {key}\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def part(size: int) -> bytes:
    """The start of a multipart body: an image part with `size` bytes of it, no end."""
    head = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
    return head + b"Content-Type: image/png\r\n\r\n" + b"\x89" * size
