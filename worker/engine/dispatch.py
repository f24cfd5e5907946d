"""`invert`: the engine's entry point. Groups the requests that can share UNet calls and runs
each group through its method (plain DDIM, null-text, or one of `method_runs`': EDICT, DDPM,
negative-prompt, DPM-Solver++), then through verification where asked (DDIM sampling, or
the method's own sampler), with one progress count and one cancel check across the
phases."""

from __future__ import annotations

from collections.abc import Sequence

from worker.engine.ddim import invert_batch
from worker.engine.method_runs import method_batch, runs_here
from worker.engine.method_verify import needs_own_sampler, verify_method_batch
from worker.engine.null_text import null_text_batch
from worker.engine.types import (
    CancelCheck,
    InversionRequest,
    InversionResult,
    ProgressCallback,
    batch_key,
    progress_total,
)
from worker.engine.verify import verify_batch
from worker.models import LoadedModel


def invert(
    model: LoadedModel,
    requests: Sequence[InversionRequest],
    *,
    progress: ProgressCallback | None = None,
    check_canceled: CancelCheck | None = None,
) -> list[InversionResult | None]:
    """Invert every request; compatible ones share UNet calls. A canceled request gives None."""
    results: list[InversionResult | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(batch_key(request.params, model), []).append(index)
    for indices in groups.values():

        def group_cancel(active: list[int], indices: list[int] = indices) -> Sequence[int]:
            if check_canceled is None:
                return ()
            canceled = set(check_canceled([indices[i] for i in active]))
            return [i for i in active if indices[i] in canceled]

        group = [requests[i] for i in indices]
        total = progress_total(group[0].params)
        steps = group[0].params.num_inference_steps
        report = _offset_progress(progress, 0, total)
        if group[0].params.method == "null_text":
            group_results = null_text_batch(
                model, group, progress=report, check_canceled=group_cancel, total=total
            )
        elif runs_here(group[0]):
            group_results = method_batch(model, group, progress=report, check_canceled=group_cancel)
        else:
            group_results = invert_batch(model, group, progress=report, check_canceled=group_cancel)
        if group[0].params.verify:
            verifier = verify_method_batch if needs_own_sampler(group[0]) else verify_batch
            verifier(
                model,
                group,
                group_results,
                progress=_offset_progress(progress, total - steps, total),
                check_canceled=group_cancel,
            )
        for index, result in zip(indices, group_results, strict=True):
            results[index] = result
    return results


def _offset_progress(
    progress: ProgressCallback | None, offset: int, total: int
) -> ProgressCallback | None:
    """A phase's progress(done, phase total) as the whole job's progress(offset + done, total)."""
    if progress is None:
        return None
    return lambda done, _phase_total: progress(offset + done, total)
