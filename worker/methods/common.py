"""What every method shares: the model as a callable, the callback between steps, the rows
of a batch, and the DDIM schedule's alpha-bars.

Batches: dim 0 of every tensor is the row; rows are independent jobs. A row never reads
another row's values, so a row's result does not depend on its batch-mates (up to the
kernels' batch-size-dependent rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

PredictNoise = Callable[[torch.Tensor, int, int], torch.Tensor]
"""`predict_noise(latents, t, step_index) -> output`: the model's (guided) output for the
rows `latents` (B, C, h, w) at training timestep `t`, in the scheduler config's
`prediction_type` (epsilon, v_prediction or sample), same shape and dtype as `latents`.

`step_index` counts the steps of the loop that calls it, from 0: for an inversion the
first step is the lowest t, for a sampler the highest (so a sampler that takes per-step
unconditional embeddings in sampling order, as null_text's, uses `nulls[step_index]`).
After `BetweenSteps` drops rows, the callable is given only the rows still running, in
order: the caller that dropped them narrows its own conditioning too.
"""

BetweenSteps = Callable[[int], Sequence[int] | None]
"""`between_steps(done) -> keep`: called after each step with the number of steps done
(1 .. steps), for progress and cancellation. Returns None when every row goes on, else
the positions (into the rows still running, in order) that go on; the others leave every
tensor before the next step. Raising stops the whole batch: the exception propagates."""


def narrow(
    between_steps: BetweenSteps | None,
    done: int,
    rows: list[int],
    tensors: list[torch.Tensor],
    dim: int = 0,
) -> tuple[list[int], list[torch.Tensor]]:
    """Call the callback after step `done`; keep the rows it keeps in `rows` (the original
    positions of the rows still running) and in each tensor (rows along `dim`)."""
    if between_steps is None:
        return rows, tensors
    keep = between_steps(done)
    if keep is None:
        return rows, tensors
    keep = list(keep)
    index = torch.tensor(keep, dtype=torch.long)
    picked = [tensor.index_select(dim, index.to(tensor.device)) for tensor in tensors]
    return [rows[k] for k in keep], picked


def per_row(
    value: float | Sequence[float], batch: int, like: torch.Tensor, name: str
) -> torch.Tensor:
    """A scalar or one value per row as a (B, 1, 1, 1) tensor of `like`'s dtype and device."""
    values = [float(value)] * batch if isinstance(value, (int, float)) else list(value)
    if len(values) != batch:
        raise ValueError(f"{name}: {len(values)} values for {batch} rows")
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1, 1)


def to_epsilon(
    output: torch.Tensor, sample: torch.Tensor, alpha_bar: float, prediction_type: str
) -> torch.Tensor:
    """The noise eps implied by the model's output at `sample` (x_t = sqrt(a) x0 +
    sqrt(1 - a) eps): the output itself, or converted from v or x0. A function of `sample`
    and the output at it only, so methods that need eps keep their exactness."""
    if prediction_type == "epsilon":
        return output
    a = torch.tensor(alpha_bar, dtype=torch.float64)
    if prediction_type == "v_prediction":
        return float(a.sqrt()) * output + float((1 - a).sqrt()) * sample
    if prediction_type == "sample":
        return (sample - float(a.sqrt()) * output) / float((1 - a).sqrt())
    raise ValueError(f"prediction_type {prediction_type!r}: use epsilon, v_prediction or sample")


@dataclass(frozen=True)
class DdimSchedule:
    """The DDIM inversion's steps: step i goes from alpha-bar `alpha_bar_prev[i]` to
    `alpha_bar[i]`, its noise labelled `timesteps[i]` (ascending). The sampler's step from
    `timesteps[i]` is the exact reverse: same two alpha-bars, same label."""

    timesteps: list[int]
    alpha_bar: list[float]
    alpha_bar_prev: list[float]
    prediction_type: str


def ddim_schedule(config: dict[str, Any], steps: int) -> DdimSchedule:
    """The schedule of `DDIMInverseScheduler.from_config(config)` at `steps` steps: its
    timesteps (timestep_spacing, steps_offset) and alpha-bars, the one before the first
    timestep being 1 (set_alpha_to_one) or alphas_cumprod[0], as its `step` computes them."""
    from diffusers import DDIMInverseScheduler

    scheduler = DDIMInverseScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    n_train = scheduler.config.num_train_timesteps
    timesteps = [int(t) for t in scheduler.timesteps]
    cumprod = scheduler.alphas_cumprod
    initial = float(scheduler.initial_alpha_cumprod)
    previous = [min(t - n_train // steps, n_train - 1) for t in timesteps]
    return DdimSchedule(
        timesteps=timesteps,
        alpha_bar=[float(cumprod[t]) for t in timesteps],
        alpha_bar_prev=[float(cumprod[p]) if p >= 0 else initial for p in previous],
        prediction_type=scheduler.config.prediction_type,
    )
