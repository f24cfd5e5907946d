"""Job functions for RQ's own worker in the contract tests (RQ imports them by name)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rq import get_current_job

DURING: list[Callable[[Any], None]] = []
"""Called with the running job from inside `observe`: what a test looks at mid-job."""


def observe(value: int) -> dict[str, int]:
    """Let the test look at Redis while RQ's own worker runs the job; return a result."""
    job = get_current_job()
    for action in DURING:
        action(job)
    return {"value": value}


def explode(value: int) -> None:
    raise RuntimeError(f"boom {value}")


CALLED: list[str] = []
"""Callbacks that ran, by name: a test asserts that none of a disarmed job's did."""


def on_failure(job: Any, connection: Any, *exc_info: Any) -> None:
    CALLED.append("on_failure")


def on_success(job: Any, connection: Any, result: Any) -> None:
    CALLED.append("on_success")


def on_stopped(job: Any, connection: Any) -> None:
    CALLED.append("on_stopped")
