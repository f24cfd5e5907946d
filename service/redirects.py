"""Trailing-slash redirects to a path, never to an absolute URL.

Starlette answers `/v1/inversions/` with a 307 to the same URL without the slash, built
from the request's `Host` and (behind `proxy_headers`) `X-Forwarded-Proto`: a reflected
absolute URL that a forged header points anywhere (cache poisoning, open redirect). Here
its Location becomes the path and query alone, which every client resolves against the
URL it asked for.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _relative(location: bytes, request_path: str) -> bytes | None:
    """The Location as a path, when it is the router's redirect of this request's path
    (the same path but for one trailing slash); None otherwise."""
    url = urlsplit(location.decode("latin-1"))
    if unquote(url.path).rstrip("/") != request_path.rstrip("/"):
        return None
    # One leading slash: `//host/...` would be a network-path reference to another host.
    path = "/" + url.path.lstrip("/")
    return (path + (f"?{url.query}" if url.query else "")).encode("latin-1")


class RelativeSlashRedirectMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def relative_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in (307, 308):
                headers = []
                for name, value in message.get("headers", []):
                    if name.lower() == b"location":
                        value = _relative(value, scope["path"]) or value
                    headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, relative_send)
