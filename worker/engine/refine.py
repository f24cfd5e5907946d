"""Exact inversion: each DDIM inversion step refined until it is the sampler's inverse.

With the step's alpha-bars and its source z_t held fixed, the refined z_next is a fixed
point of ddim.py's equation (3), g(z) = sqrt(a_next) x0(z_t, e) + sqrt(1 - a_next) e with
e = unet(z, t_next). Plain iteration z <- g(z) oscillates for ever where g's Jacobian has
an eigenvalue below -1 (the tiny SDXL model's step from t=1 to t=101 stays at a relative
residual of 0.3-0.5), so the iterates are Anderson-accelerated (anderson.py, with a damped
restart), starting from the plain step's pair (z_t, g(z_t)), which costs no call.

The residual of an iterate z is ||g(z) - z|| / ||g(z)||; a row stops once it is below
`refine_tolerance` and leaves the UNet batch, so a converged row costs nothing more and a
row's result does not depend on its batch-mates. A row that runs out of iterations keeps
g(z) of its smallest residual, and the step is reported as unconverged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from worker.engine.anderson import Anderson
from worker.engine.guidance import predict_noise
from worker.engine.rows import Batch, still_running
from worker.engine.schedulers import inverse_scheduler
from worker.engine.types import CancelCheck, InversionRequest
from worker.methods.common import to_epsilon
from worker.models import LoadedModel


def relative_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per row, ||new - old|| / ||new||."""
    delta = (new - old).flatten(1).norm(dim=1)
    return delta / new.flatten(1).norm(dim=1).clamp_min(torch.finfo(new.dtype).tiny)


class _StepRows:
    """One step's refinement state, per row of the batch: the next iterate, the best g(z)
    so far and its residual, the iterations run, and the rows still iterating."""

    def __init__(self, source: torch.Tensor, first: torch.Tensor) -> None:
        rows = source.shape[0]
        self.anderson = Anderson(rows)
        # The plain step is g(z_t): its pair is the history's first entry, at no cost.
        self.guess = torch.stack(
            [self.anderson.next(row, source[row], first[row]) for row in range(rows)]
        )
        self.best = first.clone()
        self.residuals = [float("inf")] * rows
        self.counts = [0] * rows
        self.pending = list(range(rows))

    def keep(self, batch: Batch, rows: list[int]) -> None:
        """Keep only the rows at positions `rows` (the others were canceled)."""
        self.guess, self.best = batch.keep(rows, self.guess, self.best)
        self.anderson.keep(rows)
        self.residuals = [self.residuals[row] for row in rows]
        self.counts = [self.counts[row] for row in rows]
        self.pending = [rows.index(row) for row in self.pending if row in rows]

    def update(self, guess: torch.Tensor, value: torch.Tensor, tolerance: float) -> None:
        """Take g(guess) = value of the pending rows: record, stop the converged ones, and
        propose the next iterate of the others."""
        change = relative_change(value, guess).tolist()
        still = []
        for position, (row, residual) in enumerate(zip(self.pending, change, strict=True)):
            self.counts[row] += 1
            if residual < self.residuals[row]:
                self.residuals[row] = float(residual)
                self.best[row] = value[position]
            if not residual < tolerance:
                still.append(row)
                self.guess[row] = self.anderson.next(row, guess[position], value[position])
        self.pending = still


class Refinement:
    """Equation (3), step by step, and per request what it took: for each step the
    iterations run, the final residual, and the steps that did not converge."""

    def __init__(
        self, requests: Sequence[InversionRequest], config: dict[str, Any], steps: int
    ) -> None:
        first = requests[0].params
        self.iterations = first.refine_iterations
        self.tolerance = first.refine_tolerance
        # Equation (3) needs e = eps(z_next). A v (or x0) prediction made at z_next converts to
        # eps with z_next; the scheduler's step would convert it with its source z_t, so the
        # refinement steps an epsilon-configured twin with the converted eps.
        self.prediction_type = str(config.get("prediction_type", "epsilon"))
        self.epsilon_scheduler = (
            inverse_scheduler({**config, "prediction_type": "epsilon"}, steps)[0]
            if self.prediction_type != "epsilon"
            else None
        )
        self.counts: list[list[int]] = [[] for _ in requests]
        self.residuals: list[list[float]] = [[] for _ in requests]
        self.unconverged: list[list[int]] = [[] for _ in requests]
        self.steps_done = 0

    def step(
        self,
        model: LoadedModel,
        scheduler: Any,
        batch: Batch,
        z_next: torch.Tensor,
        t: int,
        check_canceled: CancelCheck | None,
    ) -> torch.Tensor | None:
        """z_next refined; None when every row was canceled.

        The sampler's step from z_next labelled t evaluates the UNet at (z_next, t) and
        lands on t - T/steps, this step's source `batch.z`: at the fixed point it gives z
        back.
        """
        state = _StepRows(batch.z, z_next)
        for _ in range(self.iterations):
            keep = still_running(check_canceled, batch.active)
            if keep is not None:
                if not keep:
                    return None
                state.keep(batch, keep)
            if not state.pending:
                break
            rows = torch.tensor(state.pending, device=model.device)
            guess = state.guess.index_select(0, rows)
            value = self._map(model, scheduler, batch, rows, guess, t)
            state.update(guess, value, self.tolerance)
        for row, index in enumerate(batch.active):
            self.counts[index].append(state.counts[row])
            self.residuals[index].append(state.residuals[row])
            if not state.residuals[row] < self.tolerance:
                self.unconverged[index].append(self.steps_done)
        self.steps_done += 1
        return state.best

    def _map(
        self,
        model: LoadedModel,
        scheduler: Any,
        batch: Batch,
        rows: torch.Tensor,
        guess: torch.Tensor,
        t: int,
    ) -> torch.Tensor:
        """g(guess) for the batch rows `rows`: one (guided) UNet call and the inverse step
        from their source."""
        source = batch.z.index_select(0, rows)
        text = [x.index_select(0, rows) for x in batch.text]
        output = predict_noise(model, guess, t, *text)
        stepper = scheduler
        if self.epsilon_scheduler is not None:
            alpha_bar = float(scheduler.alphas_cumprod[t])
            output = to_epsilon(output, guess, alpha_bar, self.prediction_type)
            stepper = self.epsilon_scheduler
        return stepper.step(output, t, source).prev_sample
