"""DPM-Solver++ inversion: the inverse scheduler's loop against DPM-Solver++(2M) written
here from its equations, and its reconstruction against DDIM's on a model whose exact
noise prediction is known (Gaussian data), where the solver's order shows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from ddim_inversion.errors import InvalidParameter
from ddim_inversion.scheduler_config import resolve_scheduler_config
from tests.rounding import EPS32
from worker.methods.dpmsolver import dpmsolver_invert, dpmsolver_sample
from worker.tiny_model import SD15_SCHEDULER_CONFIG


def reference_inversion(noise, x0: torch.Tensor, steps: int, alpha_bars: torch.Tensor):
    """DPM-Solver++(2M), midpoint (Lu et al. 2022), from sigma(0) up to sigma(999) on the
    linspace grid: sigma = sqrt((1 - ab) / ab), alpha = 1 / sqrt(1 + sigma^2), s = sigma
    alpha, lambda = -log sigma; D = (x - s eps) / alpha at the step's start; first order
    x = (s_1 / s_0) x - alpha_1 (e^-h - 1) D, second order adds -0.5 alpha_1 (e^-h - 1)
    (D - D_prev) h / h_prev; the first step, and the last below 15 steps, first order."""
    grid = [int(t) for t in np.linspace(0, 999, steps + 1).round()[:-1]] + [999]
    sigma = [float(((1 - alpha_bars[t]) / alpha_bars[t]).sqrt()) for t in grid]
    x, data, lam_prev = x0, None, None
    for i in range(steps):
        a0, a1 = (1 / math.sqrt(1 + s**2) for s in (sigma[i], sigma[i + 1]))
        s0, s1 = sigma[i] * a0, sigma[i + 1] * a1
        lam0, lam1 = -math.log(sigma[i]), -math.log(sigma[i + 1])
        h = lam1 - lam0
        d = (x - s0 * noise(x, grid[i], i)) / a0
        step = (s1 / s0) * x - a1 * (math.exp(-h) - 1) * d
        if i > 0 and not (i == steps - 1 and steps < 15):
            step = step - 0.5 * a1 * (math.exp(-h) - 1) * (d - data) * h / (lam0 - lam_prev)
        x, data, lam_prev = step, d, lam0
    return x


def gaussian_noise(mean: torch.Tensor, std: float, alpha_bars: torch.Tensor):
    """The exact noise prediction for data x0 ~ N(mean, std^2 I): E[eps | x_t]."""

    def noise(z: torch.Tensor, t: int, step_index: int) -> torch.Tensor:
        ab = alpha_bars[t]
        return (1 - ab).sqrt() * (z - ab.sqrt() * mean) / (ab * std**2 + 1 - ab)

    return noise


def ddim_reconstruction(noise, x0: torch.Tensor, steps: int) -> torch.Tensor:
    config = resolve_scheduler_config(SD15_SCHEDULER_CONFIG, {}, steps)
    inverse, sampler = DDIMInverseScheduler.from_config(config), DDIMScheduler.from_config(config)
    inverse.set_timesteps(steps)
    sampler.set_timesteps(steps)
    z = x0
    for scheduler in (inverse, sampler):
        for i, t in enumerate(int(t) for t in scheduler.timesteps):
            z = scheduler.step(noise(z, t, i), t, z).prev_sample
    return z


@pytest.mark.parametrize(("steps", "model"), [(4, "unet"), (16, "gaussian")])
def test_the_inversion_is_dpm_solver_pp_2m(tiny64, clean64, unet_noise, helpers, steps, model):
    # 16 steps: second order up to the last step; the exact Gaussian noise keeps it fast.
    if model == "unet":
        noise = unet_noise(tiny64, ["an astronaut", "a cat"])
    else:
        noise = gaussian_noise(clean64.mean(0, keepdim=True), 0.5, helpers.alpha_bars())
    config = resolve_scheduler_config(SD15_SCHEDULER_CONFIG, {}, steps, "dpmsolver")
    result = dpmsolver_invert(noise, clean64, config, steps, keep_trajectory=True)
    expected = reference_inversion(noise, clean64, steps, helpers.alpha_bars())
    # diffusers keeps its sigmas, alphas and lambdas in float32 (each off by up to eps32 / 2
    # from the reference's float64 ones) and h = lambda_1 - lambda_0 loses more to
    # cancellation: measured 1.5e-6 after 4 steps (3 eps32 a step), 2.5e-7 after 16.
    # 100 eps32 a step leaves 30x at 4 steps.
    assert helpers.relative(result.latents, expected) < 100 * steps * EPS32
    assert result.trajectory is not None and result.trajectory.shape[1] == steps + 1


@pytest.mark.parametrize(("steps", "factor"), [(10, 1.0), (20, 2.0)])
def test_it_reconstructs_closer_than_ddim_where_its_order_counts(helpers, steps, factor):
    torch.manual_seed(0)
    mean = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    x0 = mean + 0.5 * torch.randn(2, 4, 8, 8, dtype=torch.float64)
    noise = gaussian_noise(mean, 0.5, helpers.alpha_bars())
    config = resolve_scheduler_config(SD15_SCHEDULER_CONFIG, {}, steps, "dpmsolver")
    inverted = dpmsolver_invert(noise, x0, config, steps)
    back = dpmsolver_sample(noise, inverted.latents, config, steps)
    dpm_error = helpers.relative(back.latents, x0)
    ddim_error = helpers.relative(ddim_reconstruction(noise, x0, steps), x0)
    assert dpm_error * factor < ddim_error, (dpm_error, ddim_error)


def test_rows_dropped_leave_the_solvers_history_too(tiny64, clean64, unet_noise, helpers):
    config = resolve_scheduler_config(SD15_SCHEDULER_CONFIG, {}, 3, "dpmsolver")

    def noise(z, t, i):
        return unet_noise(tiny64, ["an astronaut", "a cat"][-z.shape[0] :])(z, t, i)

    dropped = dpmsolver_invert(
        noise, clean64, config, 4, between_steps=lambda d: [1] if d == 2 else None
    )
    solo = dpmsolver_invert(unet_noise(tiny64, ["a cat"]), clean64[1:], config, 4)
    assert dropped.rows == [1]
    # float64: the batch of two for two steps changes only the summation order (measured
    # 1.1e-14, the float64 drift of 4 steps being 9e-14); 1e-12 leaves 90x.
    assert helpers.relative(dropped.latents, solo.latents) < 1e-12


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"timestep_spacing": "trailing"}, "scheduler.timestep_spacing"),
        ({"solver_order": 4}, "scheduler.solver_order"),
        ({"solver_type": "bh2"}, "scheduler.solver_type"),
    ],
)
def test_dpmsolver_overrides_are_checked_naming_the_valid_ones(overrides, field):
    with pytest.raises(InvalidParameter) as refused:
        resolve_scheduler_config(SD15_SCHEDULER_CONFIG, overrides, 10, "dpmsolver")
    assert refused.value.field == field
    if "timestep_spacing" in overrides:
        assert "solver_order" in refused.value.message  # the valid ones are named
    config = resolve_scheduler_config(SD15_SCHEDULER_CONFIG, {"solver_order": 3}, 10, "dpmsolver")
    assert config["solver_order"] == 3 and config["beta_schedule"] == "scaled_linear"
    assert config["timestep_spacing"] == "linspace"
