"""Refuse an oversized request body while it streams in, before multipart parsing spools it.

Starlette's own RequestBodyLimitMiddleware answers text/plain; this one answers the same
problem+json as every other error. A declared Content-Length over the limit is refused
without reading a byte; a chunked body is counted and stopped as soon as it passes.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ddim_inversion.errors import ErrorCode
from service.errors import problem_response


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _detail(self) -> str:
        return f"the request body exceeds the limit of {self.max_body_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            response = problem_response(
                Request(scope), 413, ErrorCode.PAYLOAD_TOO_LARGE, self._detail()
            )
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # An HTTPException passes through FastAPI's body parsing to the handler.
                    raise HTTPException(413, self._detail())
            return message

        await self.app(scope, counting_receive, send)
