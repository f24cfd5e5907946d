"""uvicorn's httptools protocol, with the two bounds on a request's head that it lacks.

Measured with uvicorn 0.54 and httptools 0.9 (what `uvicorn[standard]` runs): a connection
that sends nothing, or drips a header line now and then, is held forever (uvicorn's one
timer is the keep-alive one, armed only after a response), and a request head is never
limited: one connection had 300 MB of header lines taken into memory. h11 limits the size
(16 KiB) but not the time. So, here:

- a connection must complete its first request's line and headers within
  `INVERSION_HTTP_HEADER_TIMEOUT_S` of opening, and each later request within that time of
  its first byte (uvicorn's keep-alive timeout covers the idle time between requests);
  else it gets 408 and is closed;
- a head still incomplete after `INVERSION_HTTP_MAX_HEADER_BYTES` gets 431 and is closed.

Only uvicorn's documented `http=` class option, asyncio's protocol methods and httptools'
parser callbacks (`on_message_begin`, `on_headers_complete`) are relied on.
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


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """One connection: uvicorn's, plus a deadline and a size limit on each request head.

    The limits are the gateway's settings, read in each process (uvicorn's worker
    processes import this class by name).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.header_timeout_s = settings.http_header_timeout_s
        self.max_header_bytes = settings.http_max_header_bytes
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._socket: asyncio.Transport | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._socket = transport
        self._start_head()

    def data_received(self, data: bytes) -> None:
        in_head = self._head_timer is not None
        super().data_received(data)
        # Still in the head after this data: all of it was head (a body only follows one).
        if in_head and self._head_timer is not None:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._refuse(
                    431,
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    f"the request line and headers exceed {self.max_header_bytes} bytes",
                )

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head()
        super().connection_lost(exc)

    # -- httptools parser callbacks -------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # a later request: its head starts now
            self._start_head()

    def on_headers_complete(self) -> None:
        self._stop_head()
        super().on_headers_complete()

    # -- the bounds -----------------------------------------------------------------------

    def _start_head(self) -> None:
        self._head_bytes = 0
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(self.header_timeout_s, self._head_expired)

    def _stop_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        self._refuse(
            408,
            ErrorCode.VALIDATION_ERROR,
            f"the request line and headers took over {self.header_timeout_s:g} s",
        )

    def _refuse(self, status: int, code: ErrorCode, detail: str) -> None:
        self._stop_head()
        if self._socket is not None and not self._socket.is_closing():
            self._socket.write(_refusal(status, code, detail))
            self._socket.close()
