"""`ddim-invert gateway`: serve `create_app` with uvicorn."""

from __future__ import annotations

import uvicorn

from service.settings import get_settings


def run(host: str | None = None, port: int | None = None) -> int:
    """Serve until interrupted; host and port default to INVERSION_HOST / INVERSION_PORT."""
    settings = get_settings()
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        proxy_headers=True,
        workers=settings.http_workers,
        log_level="warning",
    )
    return 0
