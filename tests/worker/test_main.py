"""The worker process's start: what runs on the model before the worker serves."""

from __future__ import annotations

from worker.main import prepare
from worker.settings import WorkerSettings


def test_warmup_runs_a_short_inversion_only_when_set(tiny_model):
    calls: list[int] = []
    handle = tiny_model.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        assert prepare(tiny_model, WorkerSettings(warmup=False, max_batch_size=3)) == 3
        assert calls == [], "INVERSION_WARMUP=false: the model is not run before serving"
        assert prepare(tiny_model, WorkerSettings(warmup=True, max_batch_size=3)) == 3
        assert len(calls) == 2, "the warm-up: a 2-step inversion"
    finally:
        handle.remove()
