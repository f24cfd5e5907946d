"""Refuse an oversized request body while it streams in, before multipart parsing spools it.

Starlette's own RequestBodyLimitMiddleware answers text/plain; this one answers the same
problem+json as every other error. A declared Content-Length over the limit is refused
without reading a byte; a chunked body is counted and stopped as soon as it passes.

A JSON body carries the image as base64, 4 characters per 3 bytes: its limit is the
base64 length of the multipart limit, so that either body admits the same image.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ddim_inversion.errors import ErrorCode
from service.bodies import is_json
from service.errors import problem_response
from service.uploads import base64_length


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_json_body_bytes = base64_length(max_body_bytes)

    @staticmethod
    def _detail(limit: int) -> str:
        return f"the request body exceeds the limit of {limit} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        json_body = is_json(headers.get("content-type"))
        limit = self.max_json_body_bytes if json_body else self.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            response = problem_response(
                Request(scope), 413, ErrorCode.PAYLOAD_TOO_LARGE, self._detail(limit)
            )
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException passes through FastAPI's body parsing to the handler.
                    raise HTTPException(413, self._detail(limit))
            return message

        await self.app(scope, counting_receive, send)
