"""What the worker holds for each job of a batch, from its dequeue to its end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ddim_inversion.contract import JobPayload
from ddim_inversion.errors import ErrorCode
from worker.rq_adapter import Execution, Job


@dataclass
class Running:
    """One job of a batch. `meta` is the job's meta as the worker writes it; `error`, set
    before the start, fails the job at once; `stop_code` stops it alone mid-batch."""

    job: Job
    payload: JobPayload | None = None
    execution: Execution | None = None
    deadline: float = float("inf")
    stop_code: ErrorCode | None = None
    error: tuple[ErrorCode, str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    ran: float = 1.0
    """The part of its progress a row made before it stopped: its share of the batch's GPU
    time is in proportion."""


@dataclass
class Success:
    """One succeeded job's outputs, ready to be written."""

    result: bytes
    reconstruction_png: bytes | None
    metadata: dict[str, Any]

    def largest_value(self) -> int:
        """The largest value the success writes: its result, or its reconstruction."""
        return max(len(self.result), len(self.reconstruction_png or b""))
