"""Request bodies at the gateway's edge, against real `ddim-invert gateway` processes and raw
sockets: a body that stalls is cut at its deadline or its minimum rate (408, the connection
closed, the upload's temporary file gone), an answer before the body's end closes the
connection, and the bodies in progress are bounded per key and in bytes per process.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Processes, RedisServer, subprocess_env, wait_for
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

BODY_TIMEOUT_S = 3.0
GRACE_S = 1.0
MIN_RATE = 1000
CUT = {
    "INVERSION_HTTP_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    "INVERSION_HTTP_BODY_RATE_GRACE_S": str(GRACE_S),
    "INVERSION_HTTP_BODY_MIN_RATE": str(MIN_RATE),
}
"""The gateway whose bodies are cut: short deadlines, so the tests wait for them."""


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


def read_answer(sock: socket.socket) -> bytes:
    """One answer with a Content-Length, and nothing after it."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536)
    length = int(answer_of(raw)[1]["content-length"])
    while len(raw.partition(b"\r\n\r\n")[2]) < length:
        raw += sock.recv(65536)
    return raw


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
