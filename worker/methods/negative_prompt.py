"""Negative-prompt inversion (Miyake et al. 2023): null-text inversion's result without its
optimisation.

The latents are a plain DDIM inversion at guidance 1 under the source prompt c, so the
inversion's noise is eps(z, t, c) at every step. A guided sampler computes
eps_u + g (eps_c - eps_u); with the source prompt's embedding as the unconditional one
(u = c) that is eps_c for any g, the noise the inversion used, so guided sampling follows
the inversion path back as closely as unguided sampling does. An editor then changes the
conditional prompt and keeps u = c.

The result stores u for every step as `null_embeddings`, laid out as null_text's (steps,
tokens, hidden), index 0 the first sampling step, so that clients treat both alike.
"""

from __future__ import annotations

import torch


def negative_prompt_embeddings(source: torch.Tensor, steps: int) -> torch.Tensor:
    """The null embeddings of negative-prompt inversion for a batch: the source prompt's
    embedding (B, tokens, hidden) repeated for each step, (B, steps, tokens, hidden); a
    row's [i] is the unconditional embedding of the i-th sampling step (highest t first)."""
    if source.ndim != 3:
        shape = tuple(source.shape)
        raise ValueError(f"source embeddings must be (B, tokens, hidden), not {shape}")
    return source.unsqueeze(1).expand(-1, steps, -1, -1).contiguous()
