"""`ddim-invert gateway`: serve `create_app` with uvicorn, bounded by the gateway's settings."""

from __future__ import annotations

import uvicorn

from ddim_inversion.logs import log_config
from service.http_protocol import BoundedHttpToolsProtocol
from service.settings import get_settings


def run(host: str | None = None, port: int | None = None) -> int:
    """Serve until interrupted; host and port default to INVERSION_HOST / INVERSION_PORT.

    Keep-alive, concurrency and backlog are uvicorn's own options; the request-head
    deadline and size limit are `BoundedHttpToolsProtocol`'s.
    """
    settings = get_settings()
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        proxy_headers=True,
        workers=settings.http_workers,
        log_level="warning",
        # One JSON object per line: nothing a caller sends can forge a log line.
        log_config=log_config("WARNING"),
        http=BoundedHttpToolsProtocol,
        timeout_keep_alive=settings.http_keepalive_s,
        limit_concurrency=settings.http_max_concurrency,
        backlog=settings.http_backlog,
    )
    return 0
