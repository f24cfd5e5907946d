"""Local webhook receivers for tests: a normal one (HTTP or HTTPS) and one that drips bytes."""

from __future__ import annotations

import socket
import socketserver
import ssl
import subprocess
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Receiver:
    """Answers `codes` in turn (then 200) and records each POST: (headers, body).

    `observe`, if given, is called at each POST and its value kept in `seen`: what was true
    elsewhere at the moment this delivery arrived.
    """

    def __init__(
        self,
        codes: list[int] | None = None,
        tls: ssl.SSLContext | None = None,
        observe: Callable[[], object] | None = None,
        address: str = "127.0.0.1",
    ) -> None:
        self.codes = list(codes or [])
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.seen: list[object] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if observe is not None:
                    receiver.seen.append(observe())
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.codes.pop(0) if receiver.codes else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((address, 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.url = f"{'https' if tls else 'http'}://{address}:{self.port}/hook"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class DripReceiver:
    """Reads each request, then sends a status line and one header byte every `every_s`
    for as long as the client stays: a receiver that never finishes its answer.

    Counts connections, those open now, and those the client cut (a send failed); `alive()`
    asks the kernel instead, which knows of a client's close at once.
    """

    def __init__(self, every_s: float = 0.2, address: str = "127.0.0.1") -> None:
        self.connections = 0
        self.open = 0
        self.cut = 0
        self.sockets: set[socket.socket] = set()
        self.stopped = threading.Event()
        receiver = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                with receiver_lock:
                    receiver.connections += 1
                    receiver.open += 1
                    receiver.sockets.add(self.connection)
                try:
                    length = 0
                    while (line := self.rfile.readline()) not in (b"\r\n", b""):
                        name, _, value = line.decode("latin-1").partition(":")
                        if name.strip().lower() == "content-length":
                            length = int(value)
                    self.rfile.read(length)
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
                    while not receiver.stopped.wait(every_s):
                        self.wfile.write(b"a")
                except OSError:
                    with receiver_lock:
                        receiver.cut += 1
                finally:
                    with receiver_lock:
                        receiver.open -= 1
                        receiver.sockets.discard(self.connection)

        receiver_lock = threading.Lock()
        self.server = socketserver.ThreadingTCPServer((address, 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://{address}:{self.port}/hook"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def alive(self) -> int:
        """Connections whose client has not closed or shut down its end (no FIN yet)."""
        count = 0
        for sock in list(self.sockets):
            try:
                count += sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
            except BlockingIOError:
                count += 1  # nothing to read, and no end either: still there
            except OSError:
                pass
        return count

    def close(self) -> None:
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for DNS name `name` and its key (openssl), valid for a day."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
            "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key
