"""Refuse a request without a valid API key from its headers, before its body is read.

FastAPI reads (and spools) a multipart body before it runs any dependency, so a key checked
by a dependency comes too late: a caller without a key could make the gateway take a whole
upload. This middleware authenticates every `/v1/` request from its headers alone and
answers the same 401 problem as `service.auth` at once, closing the connection (the unread
body is not waited for). The owner it found travels in the request's state, where the
route's dependency (`service.deps.get_owner`) takes it: the key is hashed once.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service import auth
from service.errors import ProblemError, problem_response

GUARDED_PREFIX = "/v1/"
"""Every job route lives under it; probes, metrics and the docs stay open."""

OWNER_STATE = "owner"
"""The request-state field that holds the authenticated owner id."""


def owner_of(scope: Any) -> str | None:
    """The owner the middleware found for this request; None when it did not run."""
    owner = scope.get("state", {}).get(OWNER_STATE)
    return owner if isinstance(owner, str) else None


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key_hashes: tuple[str, ...], disabled: bool) -> None:
        self.app = app
        self.api_key_hashes = api_key_hashes
        self.disabled = disabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(GUARDED_PREFIX):
            await self.app(scope, receive, send)
            return
        if self.disabled:
            owner = auth.ANONYMOUS
        else:
            headers = Headers(scope=scope)
            key = auth.presented_key(headers.get("authorization"), headers.get("x-api-key"))
            try:
                owner = auth.authenticate(key, self.api_key_hashes)
            except ProblemError as exc:
                response = problem_response(
                    Request(scope),
                    exc.status,
                    exc.code,
                    exc.detail,
                    headers={**exc.headers, "Connection": "close"},
                )
                await response(scope, receive, send)
                return
        scope.setdefault("state", {})[OWNER_STATE] = owner
        await self.app(scope, receive, send)
