"""The web page at `/` and its files under `/static/`: public, same-origin, strict CSP.

The page is static content with no power of its own: every call it makes goes to the API
with the key the person pastes, under the API's own auth. It needs no CORS (same origin)
and loads nothing from elsewhere, which the Content-Security-Policy enforces.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ddim_inversion.errors import ErrorCode
from service.errors import ProblemError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
"""The page's files: HTML, CSS and ES modules, served as they are (no build step)."""

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
"""What may be served from STATIC_DIR, by suffix; any other file there stays private."""

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        # No inline script, no eval: only the gateway's own module files run.
        "script-src 'self'",
        "style-src 'self'",
        # The input, the reconstruction and the download are object URLs of fetched bytes.
        "img-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
"""Sent with every page response: nothing is loaded from, or sent to, another origin."""

PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Revalidated on each load (ETag), so that an upgraded gateway serves its new script.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _asset(name: str) -> Path | None:
    path = STATIC_DIR / name
    if "/" in name or name.startswith(".") or path.suffix not in MEDIA_TYPES:
        return None
    return path if path.is_file() else None


@router.get("/")
def page() -> FileResponse:
    """The page: submit an image, follow the job, see and download its latents."""
    return FileResponse(
        STATIC_DIR / "index.html", media_type=MEDIA_TYPES[".html"], headers=PAGE_HEADERS
    )


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    """One of the page's files; front ends may import `/static/inversion-client.js`."""
    path = _asset(name)
    if path is None:
        raise ProblemError(404, ErrorCode.NOT_FOUND, f"no static file {name!r}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=PAGE_HEADERS)
