"""Fixtures of the worker's tests: batching workers in-process, on a Redis the test picks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.jobs_helper import queue_for
from worker.batching import InversionWorker
from worker.settings import WorkerSettings


@pytest.fixture
def make_worker() -> Callable[..., InversionWorker]:
    """`make_worker(connection, model, max_batch_size, **settings)`: a batching worker that
    gathers without waiting and reads cancel flags at every step, unless told otherwise."""

    def make(connection: Any, model: Any, max_batch_size: int, **settings: Any) -> InversionWorker:
        settings.setdefault("cancel_check_interval_s", 0)
        settings.setdefault("max_batch_wait_ms", 0)
        return InversionWorker(
            [queue_for(connection)],
            connection=connection,
            model=model,
            settings=WorkerSettings(**settings),
            max_batch_size=max_batch_size,
        )

    return make
