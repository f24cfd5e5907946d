"""Counting a prompt's tokens at the gateway, with the live model's own tokenizer.

Workers publish their tokenizer (the `tokenizers` JSON, no torch needed to read it)
under a content-addressed key; the gateway loads it once per model and counts tokens
before queueing, so that a prompt over the model's limit can be refused with a 422
(`INVERSION_PROMPT_OVERFLOW=reject`) instead of being truncated silently.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import redis


@lru_cache(maxsize=8)
def _tokenizer(key: str, text: str) -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(text)
    # The model's tokenizer pads and truncates to 77; counting needs the untruncated length.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def load_tokenizer(connection: redis.Redis, key: str | None) -> Any | None:
    """The published tokenizer, or None when no worker has published one."""
    if not key:
        return None
    text = connection.get(key)
    if text is None:
        return None
    return _tokenizer(key, text.decode() if isinstance(text, bytes) else text)


def token_count(tokenizer: Any, prompt: str) -> int:
    """Tokens the text encoder would see, start and end tokens included (as diffusers counts)."""
    return len(tokenizer.encode(prompt).ids)
