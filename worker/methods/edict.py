"""EDICT: exact inversion by coupled transformations (Wallace et al. 2022).

Two latent sequences x and y, both starting at the encoded latent, are updated in turn,
each with the noise predicted at the other, then mixed with coefficient p. With the DDIM
step written affinely, x_{t-1} = a_t x_t + b_t eps(x_t, t), where (alpha-bar at the
step's two ends, ab_prev at the lower)

    (1)  a_t = sqrt(ab_prev / ab_t),   b_t = sqrt(1 - ab_prev) - sqrt(ab_prev (1 - ab_t) / ab_t)

one sampling step from t is

    (2)  x' = a_t x_t + b_t eps(y_t, t)        y' = a_t y_t + b_t eps(x', t)
    (3)  x_{t-1} = p x' + (1 - p) y'           y_{t-1} = p y' + (1 - p) x_{t-1}

and the inversion step runs (3) then (2) backwards, each line solved for what it updated:

    (4)  y' = (y_{t-1} - (1 - p) x_{t-1}) / p  x' = (x_{t-1} - (1 - p) y') / p
    (5)  y_t = (y' - b_t eps(x', t)) / a_t     x_t = (x' - b_t eps(y_t, t)) / a_t

Every eps is evaluated at the same point in both directions, so sampling back undoes the
inversion to rounding, whatever the model (and its guidance). The steps, alpha-bars and
labels are DDIM inversion's (`ddim_schedule`: DDIMInverseScheduler's timestep_spacing,
steps_offset and set_alpha_to_one). v and x0 predictions are converted to eps at the
point they were predicted at, which keeps the exactness; clip_sample does not apply.
Two UNet calls per step, one after the other (the second needs the first's result).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from worker.methods.common import (
    BetweenSteps,
    DdimSchedule,
    PredictNoise,
    ddim_schedule,
    narrow,
    per_row,
    to_epsilon,
)

EDICT_MIXING = 0.93
"""The paper's mixing coefficient p."""


@dataclass
class EdictResult:
    """The pair of coupled latents of the rows that finished."""

    latents: torch.Tensor
    """x_T (B, C, h, w) after inversion, x_0 after sampling."""
    latents_pair: torch.Tensor
    """y_T (B, C, h, w), its partner: sampling needs both."""
    timesteps: list[int]
    """The inversion's timesteps, ascending."""
    rows: list[int]
    """The original positions of the rows in the tensors (all unless some were dropped)."""
    trajectory: torch.Tensor | None = None
    """x after each step (B, steps + 1, C, h, w), index 0 the start, when asked for."""


def edict_coefficients(schedule: DdimSchedule) -> list[tuple[float, float]]:
    """(a_t, b_t) of equation (1) for each step of the schedule, in float64."""
    pairs = []
    for ab_t, ab_prev in zip(schedule.alpha_bar, schedule.alpha_bar_prev, strict=True):
        a = math.sqrt(ab_prev / ab_t)
        b = math.sqrt(1 - ab_prev) - math.sqrt(ab_prev * (1 - ab_t) / ab_t)
        pairs.append((a, b))
    return pairs


def _mixing(mixing: float | Sequence[float], latents: torch.Tensor) -> torch.Tensor:
    p = per_row(mixing, latents.shape[0], latents, "mixing")
    if not bool(((p > 0) & (p <= 1)).all()):
        raise ValueError("mixing: each p must lie in (0, 1]")
    return p


def edict_invert(
    predict_noise: PredictNoise,
    latents: torch.Tensor,
    config: dict[str, Any],
    steps: int,
    *,
    mixing: float | Sequence[float] = EDICT_MIXING,
    between_steps: BetweenSteps | None = None,
    keep_trajectory: bool = False,
) -> EdictResult:
    """EDICT inversion of the encoded latents (B, C, h, w), equations (4-5) per step.

    `mixing`: p, one for all rows or one per row, in (0, 1]. `config`: the DDIM inversion's
    scheduler config. Returns x_T and y_T; sampling them back with `edict_sample` (same
    model, config, steps and p) gives the latents back.
    """
    schedule = ddim_schedule(config, steps)
    p = _mixing(mixing, latents)
    x, y = latents, latents.clone()
    rows = list(range(latents.shape[0]))
    path = [x] if keep_trajectory else []
    coefficients = edict_coefficients(schedule)
    for i in range(steps):
        t, (a, b) = schedule.timesteps[i], coefficients[i]
        ab_t, kind = schedule.alpha_bar[i], schedule.prediction_type
        y_inter = (y - (1 - p) * x) / p
        x_inter = (x - (1 - p) * y_inter) / p
        y = (y_inter - b * to_epsilon(predict_noise(x_inter, t, i), x_inter, ab_t, kind)) / a
        x = (x_inter - b * to_epsilon(predict_noise(y, t, i), y, ab_t, kind)) / a
        rows, (x, y, p, *path) = narrow(between_steps, i + 1, rows, [x, y, p, *path])
        if keep_trajectory:
            path.append(x)
        if not rows:
            break
    trajectory = torch.stack(path, dim=1) if keep_trajectory else None
    return EdictResult(x, y, schedule.timesteps, rows, trajectory)


def edict_sample(
    predict_noise: PredictNoise,
    latents: torch.Tensor,
    latents_pair: torch.Tensor,
    config: dict[str, Any],
    steps: int,
    *,
    mixing: float | Sequence[float] = EDICT_MIXING,
    between_steps: BetweenSteps | None = None,
) -> EdictResult:
    """EDICT sampling from the pair (x_T, y_T), equations (2-3) per step, highest t first;
    `step_index` 0 is the first sampling step. Returns x_0 and y_0."""
    schedule = ddim_schedule(config, steps)
    p = _mixing(mixing, latents)
    coefficients = edict_coefficients(schedule)
    x, y = latents, latents_pair
    rows = list(range(latents.shape[0]))
    for j in range(steps):
        i = steps - 1 - j
        t, (a, b) = schedule.timesteps[i], coefficients[i]
        ab_t, kind = schedule.alpha_bar[i], schedule.prediction_type
        x_inter = a * x + b * to_epsilon(predict_noise(y, t, j), y, ab_t, kind)
        y_inter = a * y + b * to_epsilon(predict_noise(x_inter, t, j), x_inter, ab_t, kind)
        x = p * x_inter + (1 - p) * y_inter
        y = p * y_inter + (1 - p) * x
        rows, (x, y, p) = narrow(between_steps, j + 1, rows, [x, y, p])
        if not rows:
            break
    return EdictResult(x, y, schedule.timesteps, rows)
