"""Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2023).

Instead of following the model, the noisy latents are drawn independently from the clean
latent x_0, one per timestep t_1 < .. < t_S (alpha-bar ab_t = alphas_cumprod[t]):

    (1)  x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) n_t,       n_t ~ N(0, I) from the row's seed

Then each step's noise map is what a stochastic DDIM sampler (eta > 0) must add to land on
the drawn x_{t-1} (x_0 after the last step):

    (2)  z_t = (x_{t-1} - mu_t(x_t)) / sigma_t

where mu_t is diffusers' `DDIMScheduler.step(output, t, x_t, eta=eta)` without its noise
and sigma_t = eta sqrt((1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev)) its noise scale.
Sampling from x_{t_S} with `DDIMScheduler.step(..., eta=eta, variance_noise=z_t)` then
reproduces every x_t and x_0 to rounding: each step evaluates the model at the same point
and adds back what (2) took away. At eta 1 this is the paper's DDPM sampler. Where
sigma_t is 0 (the last step with set_alpha_to_one=true) the step is deterministic and
z_t = 0: x_0 is then the sampler's prediction, not the input.

The noise n_t of a row comes from `torch.Generator("cpu").manual_seed(seed)`, drawn as
one float32 (steps, C, h, w) tensor in ascending t: a seed gives the same noisy latents
in any batch, on any device and (to float32 precision) in any dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from worker.methods.common import BetweenSteps, PredictNoise, narrow

DDPM_ETA = 1.0
"""The sampler's noise weight: 1 is DDPM sampling, the paper's choice."""


@dataclass
class DdpmResult:
    """The edit-friendly inversion of the rows that finished."""

    latents: torch.Tensor
    """x at the highest timestep (B, C, h, w): where sampling starts."""
    noise_maps: torch.Tensor
    """z (B, steps, C, h, w) in sampling order: [:, j] is added by the j-th sampling step
    (the highest t first), as null_text's null_embeddings are ordered."""
    noisy_latents: torch.Tensor
    """(B, steps + 1, C, h, w): index 0 the clean latent, index i + 1 the x drawn at the
    i-th timestep (ascending), as a trajectory is laid out."""
    timesteps: list[int]
    """Ascending."""
    rows: list[int]
    """The original positions of the rows in the tensors."""


def sampling_scheduler(config: dict[str, Any], steps: int) -> Any:
    """diffusers' DDIMScheduler from `config`, set to `steps` steps (descending timesteps)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    return scheduler


def noise_scale(scheduler: Any, t: int, eta: float) -> torch.Tensor:
    """sigma_t of `scheduler.step(..., eta=eta)` from t, with the scheduler's own operations
    in their order (float32), so that sigma_t z_t adds back exactly what (2) divided by."""
    steps = scheduler.num_inference_steps
    prev = t - scheduler.config.num_train_timesteps // steps
    ab_t = scheduler.alphas_cumprod[t]
    ab_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    variance = ((1 - ab_prev) / (1 - ab_t)) * (1 - ab_t / ab_prev)
    return eta * variance ** (0.5)


def draw_noisy_latents(
    latents: torch.Tensor, alpha_bars: Sequence[float], seeds: Sequence[int]
) -> torch.Tensor:
    """Equation (1) for every timestep: (B, steps + 1, C, h, w), index 0 `latents` itself."""
    if len(seeds) != latents.shape[0]:
        raise ValueError(f"seeds: {len(seeds)} for {latents.shape[0]} rows")
    shape = (len(alpha_bars), *latents.shape[1:])
    noise = torch.stack(
        [
            torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)))
            for seed in seeds
        ]
    ).to(latents.device, latents.dtype)
    ab = torch.tensor(alpha_bars, dtype=torch.float64).view(1, -1, 1, 1, 1)
    scale_x0 = ab.sqrt().to(latents.device, latents.dtype)
    scale_noise = (1 - ab).sqrt().to(latents.device, latents.dtype)
    noisy = scale_x0 * latents.unsqueeze(1) + scale_noise * noise
    return torch.cat([latents.unsqueeze(1), noisy], dim=1)


def ddpm_invert(
    predict_noise: PredictNoise,
    latents: torch.Tensor,
    config: dict[str, Any],
    steps: int,
    *,
    seeds: Sequence[int],
    eta: float = DDPM_ETA,
    between_steps: BetweenSteps | None = None,
) -> DdpmResult:
    """Edit-friendly DDPM inversion of the clean latents (B, C, h, w): equations (1-2).

    `seeds`: one per row. `eta` (> 0): one for the batch, the sampler's noise weight (the
    sampler must use the same). `config`: the DDIM scheduler config (its timesteps, alphas,
    prediction_type and clipping are the sampler's). Steps run lowest t first.
    """
    if not eta > 0:
        raise ValueError("eta must be positive: with eta 0 the noise maps cannot carry x_0")
    scheduler = sampling_scheduler(config, steps)
    timesteps = [int(t) for t in reversed(scheduler.timesteps)]
    cumprod = scheduler.alphas_cumprod
    noisy = draw_noisy_latents(latents, [float(cumprod[t]) for t in timesteps], seeds)
    maps = torch.zeros_like(noisy[:, 1:])
    rows = list(range(latents.shape[0]))
    for i, t in enumerate(timesteps):
        x_t, x_prev = noisy[:, i + 1], noisy[:, i]
        output = predict_noise(x_t, t, i)
        mu = scheduler.step(
            output, t, x_t, eta=eta, variance_noise=torch.zeros_like(x_t)
        ).prev_sample
        sigma = noise_scale(scheduler, t, eta)
        z = (x_prev - mu) / sigma if float(sigma) > 0 else torch.zeros_like(x_t)
        maps[:, steps - 1 - i] = z
        rows, (noisy, maps) = narrow(between_steps, i + 1, rows, [noisy, maps])
        if not rows:
            break
    return DdpmResult(noisy[:, -1], maps, noisy, timesteps, rows)


def ddpm_sample(
    predict_noise: PredictNoise,
    latents: torch.Tensor,
    noise_maps: torch.Tensor,
    config: dict[str, Any],
    steps: int,
    *,
    eta: float = DDPM_ETA,
    between_steps: BetweenSteps | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Sample back from x_T (B, C, h, w) with the noise maps (B, steps, C, h, w), highest
    t first, by `DDIMScheduler.step(output, t, x, eta=eta, variance_noise=noise_maps[:, j])`.
    Returns x_0 and the original positions of the rows that finished."""
    scheduler = sampling_scheduler(config, steps)
    x = latents
    rows = list(range(latents.shape[0]))
    for j, t in enumerate(int(t) for t in scheduler.timesteps):
        output = predict_noise(x, t, j)
        z = noise_maps[:, j].to(x.device, x.dtype)
        x = scheduler.step(output, t, x, eta=eta, variance_noise=z).prev_sample
        rows, (x, noise_maps) = narrow(between_steps, j + 1, rows, [x, noise_maps])
        if not rows:
            break
    return x, rows
