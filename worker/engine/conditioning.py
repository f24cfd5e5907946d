"""The text conditioning a UNet is called with, one row per latent row, whatever the family.

Stable Diffusion 1.x/2.x cross-attend to one CLIP encoder's token embeddings. SDXL
cross-attends to two encoders' penultimate hidden states side by side, and adds to its
time embedding the pooled embedding of the second encoder and six "time ids" (original
size, crop top-left, target size). The methods handle all three as one opaque value: they
select its rows, concatenate the unconditional and conditional ones, and hand it to the
UNet; only the encoder (encoding.encode_prompts) and this file know what is inside.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch


@dataclass(frozen=True)
class TextConditioning:
    """Per row: `embeds` (B, tokens, hidden) for cross-attention and, for SDXL, `pooled`
    (B, pooled) and `time_ids` (B, 6) for the `text_time` added embedding."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def shape(self) -> torch.Size:
        """The embeddings' shape (what a tensor-minded caller asks of it)."""
        return self.embeds.shape

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    def _parts(self) -> list[torch.Tensor | None]:
        return [self.embeds, self.pooled, self.time_ids]

    def index_select(self, dim: int, index: torch.Tensor) -> TextConditioning:
        """The rows `index` (dim 0 only: every part has its rows along dim 0)."""
        if dim != 0:
            raise ValueError("a TextConditioning has its rows along dim 0 only")
        embeds, pooled, time_ids = (
            None if part is None else part.index_select(0, index.to(part.device))
            for part in self._parts()
        )
        assert embeds is not None
        return TextConditioning(embeds, pooled, time_ids)

    def select(self, rows: Sequence[int]) -> TextConditioning:
        """The rows at positions `rows`, in that order."""
        return self.index_select(0, torch.tensor(list(rows), dtype=torch.long))

    def __getitem__(self, rows: slice) -> TextConditioning:
        embeds, pooled, time_ids = (None if p is None else p[rows] for p in self._parts())
        assert embeds is not None
        return TextConditioning(embeds, pooled, time_ids)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> TextConditioning:
        """Moved and cast (`to(dtype)` casts, as a tensor's does); time ids are sizes and
        keep their values exactly in any float."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        embeds, pooled, time_ids = (
            None if p is None else p.to(device=device, dtype=dtype) for p in self._parts()
        )
        assert embeds is not None
        return TextConditioning(embeds, pooled, time_ids)

    def clone(self) -> TextConditioning:
        embeds, pooled, time_ids = (None if p is None else p.clone() for p in self._parts())
        assert embeds is not None
        return TextConditioning(embeds, pooled, time_ids)

    def with_embeds(
        self, embeds: torch.Tensor, pooled: torch.Tensor | None = None
    ) -> TextConditioning:
        """The same rows' time ids with other embeddings (null-text's optimised ones)."""
        return replace(self, embeds=embeds, pooled=self.pooled if pooled is None else pooled)

    def chunk(self, chunks: int) -> tuple[TextConditioning, ...]:
        """Split into `chunks` equal runs of rows (as the unconditional and conditional
        halves of a guided batch)."""
        if len(self) % chunks:
            raise ValueError(f"{len(self)} rows do not split into {chunks} equal chunks")
        size = len(self) // chunks
        return tuple(self[i * size : (i + 1) * size] for i in range(chunks))

    @staticmethod
    def cat(parts: Sequence[TextConditioning]) -> TextConditioning:
        """Rows of `parts` one after the other (unconditional then conditional for guidance)."""
        if len({(p.pooled is None, p.time_ids is None) for p in parts}) != 1:
            raise ValueError("cannot concatenate SDXL and SD 1.x/2.x conditioning")
        first = parts[0]
        return TextConditioning(
            torch.cat([p.embeds for p in parts]),
            None if first.pooled is None else torch.cat([p.pooled for p in parts]),  # type: ignore[misc]
            None if first.time_ids is None else torch.cat([p.time_ids for p in parts]),  # type: ignore[misc]
        )

    def unet_kwargs(self, dtype: torch.dtype) -> dict[str, Any]:
        """The UNet's keyword arguments, cast to the UNet's dtype."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.embeds.to(dtype)}
        if self.pooled is not None:
            assert self.time_ids is not None
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.pooled.to(dtype),
                "time_ids": self.time_ids.to(dtype),
            }
        return kwargs
