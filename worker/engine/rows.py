"""The rows of a batch across cancel checks: which go on, and their rows of each tensor.

Every phase checks between its units of work (a step, a refine iteration, a null-text
iteration, a VAE call), so a cancel or a deadline stops a row within one unit; a stopped
row leaves every row tensor and the others are untouched.
"""

from __future__ import annotations

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
