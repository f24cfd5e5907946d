"""What every `/v1` route shares: the caller authenticated first, problems documented."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from service.deps import get_owner
from service.errors import PROBLEM_MEDIA_TYPE

PROBLEM: dict[str, Any] = {
    "description": "Problem details (RFC 9457)",
    "content": {PROBLEM_MEDIA_TYPE: {}},
}
"""The OpenAPI response of a problem+json answer."""

INVERSIONS_PREFIX = "/v1/inversions"


def v1_router(prefix: str, tag: str) -> APIRouter:
    """A router whose first dependency authenticates the caller: a caller without a valid
    key gets 401 before any 404 or 422 could tell it something."""
    return APIRouter(
        prefix=prefix,
        tags=[tag],
        dependencies=[Depends(get_owner)],
        # Every /v1 route reads Redis: 503 while it does not answer.
        responses={401: PROBLEM, 503: PROBLEM},
    )
