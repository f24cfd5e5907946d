"""API keys: a caller presents a key, the gateway knows only the SHA-256 of each accepted one.

The key's hash is the caller's owner id: every job records it and only its owner sees it.
Keys come as `Authorization: Bearer <key>` or `X-API-Key: <key>`; the presented key's hash
is compared with every configured hash in constant time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac

from ddim_inversion.errors import ErrorCode
from service.errors import ProblemError

ANONYMOUS = ""
"""The owner of every job while auth is disabled."""


def key_hash(key: str) -> str:
    """The hex SHA-256 of a key, as `INVERSION_API_KEY_HASHES` lists them."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key of a `Bearer` Authorization header, else of X-API-Key; None when neither."""
    if authorization:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


def unauthorized(detail: str) -> ProblemError:
    return ProblemError(401, ErrorCode.UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def authenticate(key: str | None, accepted: tuple[str, ...]) -> str:
    """The owner id (the key's hash) of an accepted key; a 401 problem otherwise.

    Every configured hash is compared, match or not, so timing reveals nothing.
    """
    if key is None:
        raise unauthorized("an API key is required: `Authorization: Bearer <key>` or `X-API-Key`")
    presented = key_hash(key).encode("ascii")
    match = False
    for candidate in accepted:
        match |= hmac.compare_digest(presented, candidate.encode("ascii"))
    if not match:
        raise unauthorized("the API key is not valid")
    return presented.decode("ascii")


def check_metrics_token(authorization: str | None, token_hash: str) -> None:
    """A 401 problem unless `Authorization: Bearer <token>` presents the metrics token
    (`token_hash` empty: no token opens it)."""
    key = presented_key(authorization, None)
    if key is None or not token_hash:
        raise unauthorized("/metrics needs the metrics token: `Authorization: Bearer <token>`")
    if not hmac.compare_digest(key_hash(key).encode(), token_hash.lower().encode()):
        raise unauthorized("the metrics token is not valid")
