"""Request bodies at the gateway's edge, against real `ddim-invert gateway` processes and raw
sockets: a body that stalls is cut at its deadline or its minimum rate (408, the connection
closed, the upload's temporary file gone), an answer before the body's end closes the
connection, and the bodies in progress are bounded per key and in bytes per process.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import auth
from tests.conftest import Processes, RedisServer, subprocess_env, wait_for

pytestmark = pytest.mark.e2e

KEYS = ("bodies-key-a", "bodies-key-b", "bodies-key-c")
COMMON = {
    "INVERSION_AUTH_DISABLED": "false",
    "INVERSION_API_KEY_HASHES": ",".join(auth.key_hash(k) for k in KEYS),
}
BODY_TIMEOUT_S = 3.0
GRACE_S = 1.0
MIN_RATE = 1000
CUT = {
    "INVERSION_HTTP_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    "INVERSION_HTTP_BODY_RATE_GRACE_S": str(GRACE_S),
    "INVERSION_HTTP_BODY_MIN_RATE": str(MIN_RATE),
}
"""The gateway whose bodies are cut: short deadlines, so the tests wait for them."""
MAX_UPLOAD = 100_000
BUDGET = {
    "INVERSION_MAX_UPLOADS_PER_KEY": "2",
    "INVERSION_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
    "INVERSION_MAX_UPLOAD_BYTES_IN_PROGRESS": str(2 * MAX_UPLOAD + MAX_UPLOAD // 2),
}
"""The gateway whose bounds on bodies in progress are tested: two uploads per key, and
room for two bodies of MAX_UPLOAD bytes but not three. Its deadlines are the defaults
(60 s, far beyond these tests): the uploads it holds stay until the test closes them."""
READ_S = 10 * BODY_TIMEOUT_S
"""How long a socket read may block: far beyond every deadline under test, so a read
that runs into it means the gateway never answered."""


@pytest.fixture(scope="module")
def procs(
    redis_server: RedisServer, model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Processes]:
    started = Processes(
        subprocess_env(redis_server.url, model_cache_dir), tmp_path_factory.mktemp("bodies")
    )
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture(scope="module")
def spool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cutting gateway's temporary directory, where multipart uploads spool."""
    return tmp_path_factory.mktemp("spool")


@pytest.fixture(scope="module")
def cutting(procs: Processes, spool: Path) -> tuple[tuple[str, int], int]:
    """(address, pid) of the gateway with short body deadlines."""
    url = procs.gateway(**COMMON, **CUT, TMPDIR=str(spool))
    return address(url), procs.started[-1].pid


@pytest.fixture(scope="module")
def spooling(procs: Processes, tmp_path_factory: pytest.TempPathFactory) -> tuple[tuple, int, Path]:
    """(address, pid, temporary directory) of a gateway with the default deadlines (60 s):
    what it spools stays on disk until the connection ends, whatever the machine's speed."""
    directory = tmp_path_factory.mktemp("spool-default")
    url = procs.gateway(**COMMON, TMPDIR=str(directory))
    return address(url), procs.started[-1].pid, directory


@pytest.fixture(scope="module")
def bounded(procs: Processes) -> tuple[str, int]:
    return address(procs.gateway(**COMMON, **BUDGET))


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


def read_answer(sock: socket.socket) -> bytes:
    """One answer with a Content-Length, and nothing after it."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536)
    length = int(answer_of(raw)[1]["content-length"])
    while len(raw.partition(b"\r\n\r\n")[2]) < length:
        raw += sock.recv(65536)
    return raw


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


def spooled(pid: int, spool: Path) -> list[str]:
    """The gateway's open files in its temporary directory (uploads spooled to disk)."""
    fds = Path(f"/proc/{pid}/fd")
    found = []
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith(str(spool)):
            found.append(target)
    return found


# -- deadlines --------------------------------------------------------------------------


def test_an_upload_that_stalls_is_cut_at_the_body_deadline_and_its_file_removed(cutting, spool):
    gateway, pid = cutting
    # 2 MB arrive at once (over Starlette's 1 MB spool: a file on disk, as the next test
    # shows on a gateway with the default deadline), enough for the minimum rate for
    # 2000 s: only the whole-body deadline can end this upload.
    with connect(gateway) as sock:
        sock.sendall(upload_head(KEYS[0], 4_000_000) + part(2_000_000))
        code, headers, body = answer_of(read_all(sock))
    assert code == 408 and headers["connection"] == "close"
    assert json.loads(body)["detail"] == f"the request body took over {BODY_TIMEOUT_S:g} s"
    wait_for(lambda: not spooled(pid, spool), READ_S, "the upload's file to be removed")


def test_a_stalled_upload_spools_to_disk_and_its_file_goes_with_the_connection(spooling):
    # The same upload on a gateway whose deadline (60 s) is far from anything this test
    # waits for: its file is seen on disk, then removed once the connection ends, which
    # is how the deadline's 408 ends it above.
    gateway, pid, directory = spooling
    with connect(gateway) as sock:
        sock.sendall(upload_head(KEYS[0], 4_000_000) + part(2_000_000))
        wait_for(lambda: spooled(pid, directory), READ_S, "the upload to spool to disk")
    wait_for(lambda: not spooled(pid, directory), READ_S, "the upload's file to be removed")


def test_a_body_slower_than_the_minimum_rate_is_cut(cutting):
    gateway, _ = cutting
    with connect(gateway) as sock:
        sock.sendall(upload_head(KEYS[0], 1_000_000) + part(10))
        code, _, body = answer_of(read_all(sock))
    assert code == 408
    assert json.loads(body)["detail"] == (
        f"the request body arrived slower than {MIN_RATE} bytes/s"
    )


def test_a_whole_body_answered_keeps_the_connection_alive(cutting):
    gateway, _ = cutting
    body = part(100) + b"\r\n--xyz--\r\n"
    with connect(gateway) as sock:
        sock.sendall(upload_head(KEYS[0], len(body)) + body)
        first = read_answer(sock)  # a 422 (no prompt), after the whole body was read
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
        second = read_all(sock)
    code, headers, _ = answer_of(first)
    assert code in (415, 422) and "connection" not in headers
    assert answer_of(second)[0] == 200


@pytest.mark.parametrize(
    ("path", "key", "length", "status"),
    [
        ("/healthz", "", 1_000_000, 405),
        ("/no-such-route", "", 1_000_000, 404),
        ("/v1/inversions", "not-a-key", 1_000_000, 401),
        ("/v1/inversions", KEYS[0], 100_000_000, 413),
    ],
)
def test_an_answer_before_the_body_ends_closes_the_connection(cutting, path, key, length, status):
    gateway, _ = cutting
    with connect(gateway) as sock:
        sock.sendall(upload_head(key, length, path) + part(100))
        code, headers, _ = answer_of(read_all(sock))
    # Kept alive, the connection would wait for the rest of the body (and take it).
    assert (code, headers.get("connection")) == (status, "close")


# -- bodies in progress -----------------------------------------------------------------


def hold(gateway: tuple[str, int], key: str, length: int = MAX_UPLOAD) -> socket.socket:
    """An upload whose head and first bytes were sent, and whose rest never comes."""
    sock = connect(gateway)
    sock.sendall(upload_head(key, length) + part(100))
    return sock


def refusal(
    gateway: tuple[str, int], key: str, length: int = MAX_UPLOAD
) -> tuple[int, dict[str, str], bytes] | None:
    """A new upload's answer if it is refused at once; None if it is being received."""
    with connect(gateway) as sock:
        sock.sendall(upload_head(key, length) + part(100))
        sock.settimeout(0.5)
        try:
            raw = sock.recv(65536)
        except TimeoutError:
            return None
        sock.settimeout(READ_S)
        return answer_of(raw + read_all(sock))


SMALL = MAX_UPLOAD // 10
"""A body length of which the process's budget holds many: only the per-key bound acts."""


def test_uploads_in_progress_are_bounded_per_key(bounded):
    held = [hold(bounded, KEYS[0], SMALL) for _ in range(2)]
    try:
        # The two held uploads are admitted in their own time: poll until the third is
        # refused (each poll is itself a third upload, refused or given up at once).
        refused = wait_for(lambda: refusal(bounded, KEYS[0], SMALL), READ_S, "a third upload's 429")
        code, headers, body = refused
        assert (code, json.loads(body)["code"]) == (429, "rate_limited")
        assert headers["connection"] == "close" and int(headers["retry-after"]) >= 1
        assert refusal(bounded, KEYS[1], SMALL) is None  # another key uploads meanwhile
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: refusal(bounded, KEYS[0], SMALL) is None, READ_S, "the key's places")


def test_upload_bytes_in_progress_are_bounded_per_process(bounded):
    held = [hold(bounded, KEYS[0]), hold(bounded, KEYS[1])]
    try:
        refused = wait_for(lambda: refusal(bounded, KEYS[2]), READ_S, "the process's 503")
        code, headers, body = refused
        assert (code, json.loads(body)["code"]) == (503, "service_unavailable")
        assert int(headers["retry-after"]) >= 1
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: refusal(bounded, KEYS[2]) is None, READ_S, "the bytes given back")


def test_a_chunked_body_reserves_the_process_budget_as_it_comes(bounded):
    # Two declared uploads reserve 2 x MAX_UPLOAD of the budget, leaving MAX_UPLOAD / 2:
    # a chunked upload, which declares nothing, is stopped once its bytes pass that.
    held = [hold(bounded, KEYS[0]), hold(bounded, KEYS[1])]
    try:
        wait_for(lambda: refusal(bounded, KEYS[2]), READ_S, "the two uploads' reservations")
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
        for sock in held:
            sock.close()
