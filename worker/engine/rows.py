"""The rows of a batch across cancel checks: which go on, and their rows of each tensor.

Every phase checks between its units of work (a step, a refine iteration, a null-text
iteration, a VAE call), so a cancel or a deadline stops a row within one unit; a stopped
row leaves every row tensor and the others are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker.engine.types import CancelCheck


def still_running(check_canceled: CancelCheck | None, active: list[int]) -> list[int] | None:
    """The row positions in `active` that go on after a cancel check; None if none stopped."""
    if check_canceled is None:
        return None
    canceled = set(check_canceled(list(active)))
    if not canceled & set(active):
        return None
    return [row for row, index in enumerate(active) if index not in canceled]


def take(tensors: list[Any], rows: list[int]) -> list[Any]:
    """Each tensor's (or TextConditioning's) rows `rows` (along dim 0), in that order."""
    index = torch.tensor(rows, dtype=torch.long)
    return [tensor.index_select(0, index.to(tensor.device)) for tensor in tensors]


@dataclass
class Batch:
    """The rows still running: their request indices in row order and every row tensor."""

    active: list[int]
    z: torch.Tensor
    text: list[Any]
    """[cond] or, under guidance, [cond, uncond, scales]: `predict_noise`'s arguments (two
    TextConditioning and a tensor)."""
    trajectory: list[torch.Tensor]

    def keep(self, rows: list[int], *also: torch.Tensor) -> list[torch.Tensor]:
        """Keep only the rows at positions `rows`, here and in `also` (returned)."""
        self.active = [self.active[row] for row in rows]
        self.z, *self.trajectory = take([self.z, *self.trajectory], rows)
        self.text = take(self.text, rows)
        return take(list(also), rows)
