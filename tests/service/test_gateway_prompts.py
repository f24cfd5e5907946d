"""The prompt token limit at the gateway, with the tokenizer a worker publishes."""

from __future__ import annotations

import hashlib

import fakeredis

from ddim_inversion.keys import tokenizer_key
from service import prompts


def test_published_tokenizer_counts_like_the_model(tiny_model):
    # The worker publishes its tokenizer after using it with padding and truncation to 77:
    # the gateway must count the prompt's own tokens, unpadded and untruncated.
    tiny_model.tokenizer(["x"], padding="max_length", max_length=77, truncation=True)
    tokenizer_json = tiny_model.tokenizer.backend_tokenizer.to_str()
    connection = fakeredis.FakeRedis()
    key = tokenizer_key(hashlib.sha256(tokenizer_json.encode()).hexdigest())
    connection.set(key, tokenizer_json)
    tokenizer = prompts.load_tokenizer(connection, key)
    for prompt in ["", "a cat", "a photo of the thing " * 30]:  # the last over 77 tokens
        assert prompts.token_count(tokenizer, prompt) == len(tiny_model.tokenizer(prompt).input_ids)
    assert prompts.load_tokenizer(connection, None) is None
    assert prompts.load_tokenizer(connection, "inversion:tokenizer:missing") is None
