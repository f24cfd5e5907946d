"""Bound the request bodies in progress: per API key, and in bytes per gateway process.

A body being received holds a connection and, for a multipart upload, a temporary file
(memory for a JSON one). Without a bound, one key opening many slow uploads, or many keys
at once, fill the disk and the connection limit. So each request whose body does not
arrive at once, when its route starts reading it:

- counts against its key's uploads in progress (`INVERSION_MAX_UPLOADS_PER_KEY`; 429
  above; none for the anonymous owner, like every per-key limit);
- reserves its declared Content-Length in the process's budget
  (`INVERSION_MAX_UPLOAD_BYTES_IN_PROGRESS`; 503 with Retry-After when it does not fit);
  a chunked body reserves as its bytes come, and is stopped with 503 when they do not fit.

Both are given back once the body has arrived (or the request is answered, or the client
is gone, whichever comes first): a `Prefer: wait` submission holds neither while it waits.
The connection of a refused request is closed by the HTTP protocol (service/http_protocol),
its body unread.
"""

from __future__ import annotations

from collections import Counter

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ddim_inversion.errors import ErrorCode
from service import auth
from service.auth_middleware import owner_of
from service.errors import RETRY_AFTER_S, ProblemError

_BUSY = "this gateway is taking in all the uploads it can; try again shortly"


class UploadBudget:
    """The bodies one gateway process is receiving: per owner, and their bytes."""

    def __init__(self, max_per_key: int, max_bytes: int) -> None:
        self.max_per_key = max_per_key
        self.max_bytes = max_bytes
        self.uploads: Counter[str] = Counter()
        self.reserved = 0

    def admit(self, owner: str | None, declared: int) -> None:
        """Count one upload of `owner` and reserve `declared` bytes, or raise 429/503."""
        if (
            owner is not None
            and owner != auth.ANONYMOUS
            and self.uploads[owner] >= self.max_per_key
        ):
            raise ProblemError(
                429,
                ErrorCode.RATE_LIMITED,
                f"this API key is already sending {self.max_per_key} request bodies at "
                "once (INVERSION_MAX_UPLOADS_PER_KEY); wait for one to be answered",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.grow(declared)
        if owner is not None:
            self.uploads[owner] += 1

    def grow(self, size: int) -> None:
        """Reserve `size` more bytes, or raise 503 when the process's budget is spent."""
        if self.reserved + size > self.max_bytes:
            raise ProblemError(
                503,
                ErrorCode.SERVICE_UNAVAILABLE,
                _BUSY,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.reserved += size

    def leave(self, owner: str | None, reserved: int) -> None:
        self.reserved -= reserved
        if owner is not None:
            self.uploads[owner] -= 1
            if self.uploads[owner] <= 0:
                del self.uploads[owner]


def declared_body(headers: Headers) -> int | None:
    """The body's declared length; 0 for a chunked one (it reserves as it comes); None
    when the request has no body."""
    length = headers.get("content-length", "")
    if length.isdigit():
        return int(length) or None
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return 0
    return None


class UploadBudgetMiddleware:
    """Inside the API key check (the owner is known) and the body's size limit (a
    declared length is within it). A request is admitted at the first part of its body
    its route reads, unless that part is the whole body: one answered without reading
    it (404, 405, ...), or whose body arrived at once (uvicorn takes at most 64 KiB before
    the app reads), holds nothing."""

    def __init__(self, app: ASGIApp, budget: UploadBudget) -> None:
        self.app = app
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = declared_body(Headers(scope=scope)) if scope["type"] == "http" else None
        if declared is None:
            await self.app(scope, receive, send)
            return
        owner = owner_of(scope)
        admitted, ended = False, False
        reserved, received = declared or 0, 0

        def end() -> None:
            nonlocal ended
            if admitted and not ended:
                self.budget.leave(owner, reserved)
            ended = True

        def refuse(exc: ProblemError) -> HTTPException:
            end()
            # An HTTPException passes through the body parsing to the handler.
            return HTTPException(exc.status, exc.detail, exc.headers)

        async def counting_receive() -> Message:
            nonlocal admitted, reserved, received
            message = await receive()
            if ended:
                return message
            if message["type"] != "http.request":
                end()  # the client is gone
                return message
            more = message.get("more_body", False)
            if not admitted:
                if not more:
                    end()  # the whole body came at once: nothing is held for it
                    return message
                try:
                    self.budget.admit(owner, reserved)
                except ProblemError as exc:
                    raise refuse(exc) from None
                admitted = True
            received += len(message.get("body", b""))
            if received > reserved:
                try:
                    self.budget.grow(received - reserved)
                except ProblemError as exc:
                    raise refuse(exc) from None
                reserved = received
            if not more:
                end()
            return message

        try:
            await self.app(scope, counting_receive, send)
        finally:
            end()
