"""uvicorn's httptools protocol, with the bounds on a request's head and body that it lacks.

Measured with uvicorn 0.54 and httptools 0.9 (what `uvicorn[standard]` runs): a connection
that sends nothing, or drips a header line now and then, is held forever (uvicorn's one
timer is the keep-alive one, armed only after a response), and a request head is never
limited: one connection had 300 MB of header lines taken into memory. h11 limits the size
(16 KiB) but not the time. A body is not bounded in time either, and a connection answered
before its body ended (401, 404, 405, 413...) is kept alive, waiting for that body's end.
So, here:

- a connection must complete its first request's line and headers within
  `INVERSION_HTTP_HEADER_TIMEOUT_S` of opening, and each later request within that time of
  its first byte (uvicorn's keep-alive timeout covers the idle time between requests);
  else it gets 408 and is closed;
- a head over `INVERSION_HTTP_MAX_HEADER_BYTES` gets 431 and is closed, whether it is
  still arriving or arrived whole in one read;
- a body must arrive within `INVERSION_HTTP_BODY_TIMEOUT_S` of its headers, and, after
  `INVERSION_HTTP_BODY_RATE_GRACE_S`, at `INVERSION_HTTP_BODY_MIN_RATE` bytes/s on average;
  else 408 and closed (the application sees the client gone: its upload is discarded);
- a response sent before its request's body ended says `Connection: close` and closes the
  connection: the rest of the body is never waited for (what the client still sends is
  read and dropped for `INVERSION_HTTP_LINGER_S` after the answer, so that it reads the
  answer rather than a reset).

Only uvicorn's documented `http=` class option, asyncio's protocol methods, httptools'
parser callbacks (`on_message_begin`, `on_url`, `on_header`, `on_headers_complete`,
`on_body`, `on_message_complete`) and the request cycle's `keep_alive`, `disconnected` and
`transport` attributes are relied on.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ddim_inversion.errors import ErrorCode
from service.errors import PROBLEM_MEDIA_TYPE, PROBLEM_TYPE_BASE
from service.settings import get_settings


def _refusal(status: int, code: ErrorCode, detail: str) -> bytes:
    """A whole problem+json response, written straight to the socket (no request exists)."""
    body = json.dumps(
        {
            "type": PROBLEM_TYPE_BASE + code.value,
            "title": HTTPStatus(status).phrase,
            "status": status,
            "detail": detail,
            "code": code.value,
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"content-type: {PROBLEM_MEDIA_TYPE}\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _ClosingAfterBody:
    """The transport as one request's cycle sees it: uvicorn closes it after an answer
    that is not kept alive, and here that close lingers while the body is unfinished."""

    def __init__(self, transport: asyncio.Transport, close: Any) -> None:
        self._transport = transport
        self._close = close

    def close(self) -> None:
        self._close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head over the limit."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """One connection: uvicorn's, plus deadlines and size limits on each request's head and
    body.

    The limits are the gateway's settings, read in each process (uvicorn's worker
    processes import this class by name).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.header_timeout_s = settings.http_header_timeout_s
        self.max_header_bytes = settings.http_max_header_bytes
        self.body_timeout_s = settings.http_body_timeout_s
        self.body_min_rate = settings.http_body_min_rate
        self.body_grace_s = settings.http_body_rate_grace_s
        self.linger_s = settings.http_linger_s
        self._lingering = False
        self._head_bytes = 0
        self._parsed_head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_started = 0.0
        self._body_bytes = 0
        self._keep_alive = False
        self._socket: asyncio.Transport | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._socket = transport
        self._start_head()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the rest of an answered request's body: read, and dropped
        in_head = self._head_timer is not None
        super().data_received(data)
        # Still in the head after this data: all of it was head (a body only follows one).
        if in_head and self._head_timer is not None:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._head_too_large()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head()
        self._stop_body()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        if self._parsed_head_bytes > self.max_header_bytes:
            self._head_too_large()  # the parser stopped on `_HeadTooLarge`
        elif self._socket is None or not self._socket.is_closing():
            super().send_400_response(msg)

    # -- httptools parser callbacks -------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._parsed_head_bytes = 0
        if self._head_timer is None:  # a later request: its head starts now
            self._start_head()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._stop_head()
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not before:  # a request cycle began (not an upgrade)
            self._start_body()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._stop_body()
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.keep_alive = self._keep_alive
        super().on_message_complete()

    # -- the head's bounds ----------------------------------------------------------------

    def _start_head(self) -> None:
        self._head_bytes = 0
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(self.header_timeout_s, self._head_expired)

    def _stop_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _count_head(self, size: int) -> None:
        self._parsed_head_bytes += size
        if self._parsed_head_bytes > self.max_header_bytes:
            raise _HeadTooLarge  # httptools stops; uvicorn calls send_400_response

    def _head_too_large(self) -> None:
        self._refuse(
            431,
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the request line and headers exceed {self.max_header_bytes} bytes",
        )

    def _head_expired(self) -> None:
        self._head_timer = None
        self._refuse(
            408,
            ErrorCode.VALIDATION_ERROR,
            f"the request line and headers took over {self.header_timeout_s:g} s",
        )

    # -- the body's bounds ----------------------------------------------------------------

    def _start_body(self) -> None:
        """Until the body ended, an answer closes the connection (uvicorn writes
        `Connection: close` for a cycle that is not kept alive), and the clock runs.

        A request without a body ends within the same parse, before its app runs.
        """
        self._keep_alive = self.cycle.keep_alive
        self.cycle.keep_alive = False
        self.cycle.transport = _ClosingAfterBody(self.transport, self._close_after_answer)  # type: ignore[assignment]
        self._body_bytes = 0
        self._body_started = asyncio.get_running_loop().time()
        self._check_body_at(min(self.body_timeout_s, self.body_grace_s))

    def _check_body_at(self, elapsed_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._body_timer = loop.call_at(self._body_started + elapsed_s, self._check_body)

    def _stop_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _check_body(self) -> None:
        """At the deadline, or when the bytes so far fall below the minimum rate: 408.
        Otherwise look again when they would, at the rate they came (none in between)."""
        self._body_timer = None
        elapsed = asyncio.get_running_loop().time() - self._body_started
        if elapsed >= self.body_timeout_s:
            self._body_expired(f"the request body took over {self.body_timeout_s:g} s")
        elif self._body_bytes < self.body_min_rate * (elapsed - self.body_grace_s):
            self._body_expired(f"the request body arrived slower than {self.body_min_rate} bytes/s")
        else:
            due = self.body_grace_s + self._body_bytes / self.body_min_rate
            self._check_body_at(min(self.body_timeout_s, max(due, elapsed + 0.01)))

    def _body_expired(self, detail: str) -> None:
        cycle = self.cycle
        answered = cycle is None or cycle.response_started
        if cycle is not None:
            # The app now sees the client gone (its upload is closed) and sends nothing.
            cycle.disconnected = True
            cycle.message_event.set()
        if answered:
            if self._socket is not None:
                self._socket.close()
        else:
            self._refuse(408, ErrorCode.VALIDATION_ERROR, detail)

    def _close_after_answer(self) -> None:
        """Close; but while the request's body is still coming, first end the answer
        (FIN), then read and drop what the client still sends for `linger_s`: a client
        still sending gets to read the answer instead of a reset (as nginx's lingering
        close). Bounded in time, like the body itself."""
        if self._body_timer is None or self._socket is None or self._socket.is_closing():
            self.transport.close()
            return
        self._stop_body()
        self._lingering = True
        if self._socket.can_write_eof():
            self._socket.write_eof()
        self.flow.resume_reading()
        asyncio.get_running_loop().call_later(self.linger_s, self._socket.close)

    def _refuse(self, status: int, code: ErrorCode, detail: str) -> None:
        self._stop_head()
        self._stop_body()
        if self._socket is not None and not self._socket.is_closing():
            self._socket.write(_refusal(status, code, detail))
            self._socket.close()
