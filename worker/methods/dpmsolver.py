"""DPM-Solver++ multistep inversion (`inverse_scheduler=dpmsolver`) and its sampler.

diffusers' `DPMSolverMultistepInverseScheduler` runs the multistep DPM-Solver++ from the
clean latent (at the schedule's lowest noise level) up to the highest, with the job's
config (`ddim_inversion.scheduler_config.resolve_dpmsolver_config`: the model's betas and
prediction type, linspace timesteps, the job's solver overrides). Each step uses the
model's output at the current point and the previous steps' (solver_order of them), so at
few steps it follows the ODE more closely than DDIM's first-order step. It is not exact:
sampling back with the forward `DPMSolverMultistepScheduler` (same config) retraces the
path only as far as the solver's error allows.

With linspace spacing and the sampler's final_sigmas_type sigma_min the two schedulers'
noise levels mirror each other: the inverse starts at the schedule's lowest level and ends
at the highest, the sampler runs the same levels back (other spacings do not mirror, so
the config fixes both). At very few steps (under about 10) the solver's lower-order
first and last steps make it no closer than DDIM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker.methods.common import BetweenSteps, PredictNoise, narrow


@dataclass
class DpmSolverResult:
    """The inverted (or sampled) latents of the rows that finished."""

    latents: torch.Tensor
    """(B, C, h, w)."""
    timesteps: list[int]
    """The loop's timesteps, in the order it ran them."""
    rows: list[int]
    """The original positions of the rows in the tensors."""
    trajectory: torch.Tensor | None = None
    """The latent after each step (B, steps + 1, C, h, w), index 0 the start, when asked."""


def _run(
    scheduler: Any,
    predict_noise: PredictNoise,
    latents: torch.Tensor,
    steps: int,
    between_steps: BetweenSteps | None,
    keep_trajectory: bool,
) -> DpmSolverResult:
    """The diffusers loop `z = scheduler.step(predict_noise(z, t, i), t, z)`; a dropped row
    leaves the solver's history of model outputs as well as the latents."""
    scheduler.set_timesteps(steps, device=latents.device)
    timesteps = [int(t) for t in scheduler.timesteps]
    z = latents
    rows = list(range(latents.shape[0]))
    path = [z] if keep_trajectory else []
    for i, t in enumerate(timesteps):
        z = scheduler.step(predict_noise(z, t, i), t, z).prev_sample
        history = [k for k, m in enumerate(scheduler.model_outputs) if m is not None]
        kept = [scheduler.model_outputs[k] for k in history]
        rows, (z, *rest) = narrow(between_steps, i + 1, rows, [z, *kept, *path])
        for k, m in zip(history, rest[: len(history)], strict=True):
            scheduler.model_outputs[k] = m
        path = rest[len(history) :]
        if keep_trajectory:
            path.append(z)
        if not rows:
            break
    trajectory = torch.stack(path, dim=1) if keep_trajectory else None
    return DpmSolverResult(z, timesteps, rows, trajectory)


def dpmsolver_invert(
    predict_noise: PredictNoise,
    latents: torch.Tensor,
    config: dict[str, Any],
    steps: int,
    *,
    between_steps: BetweenSteps | None = None,
    keep_trajectory: bool = False,
) -> DpmSolverResult:
    """DPM-Solver++ inversion of the clean latents (B, C, h, w) in `steps` steps, lowest t
    first, with `DPMSolverMultistepInverseScheduler.from_config(config)`."""
    from diffusers import DPMSolverMultistepInverseScheduler

    scheduler = DPMSolverMultistepInverseScheduler.from_config(config)
    return _run(scheduler, predict_noise, latents, steps, between_steps, keep_trajectory)


def dpmsolver_sample(
    predict_noise: PredictNoise,
    latents: torch.Tensor,
    config: dict[str, Any],
    steps: int,
    *,
    between_steps: BetweenSteps | None = None,
) -> DpmSolverResult:
    """Sampling back from inverted latents with the forward `DPMSolverMultistepScheduler`
    (same config; highest t first, ending at noise level 0)."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(config)
    return _run(scheduler, predict_noise, latents, steps, between_steps, False)
