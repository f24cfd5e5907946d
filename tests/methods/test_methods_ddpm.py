"""Edit-friendly DDPM inversion: the noisy latents and noise maps against the paper's
equations written here, exact reconstruction by diffusers' DDIMScheduler in float64, and
seeds that give each row the same noise in any batch."""

from __future__ import annotations

import pytest
import torch

from worker.methods.ddpm import ddpm_invert, ddpm_sample
from worker.tiny_model import SD15_SCHEDULER_CONFIG

STEPS = 6


def reference_ddpm(noise, x0: torch.Tensor, seeds: list[int], eta: float, alpha_bars):
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) n_t, n from each row's generator (float32,
    (steps, C, h, w), ascending t); then z_t = (x_{t-1} - mu_t) / sigma_t with
    x0_hat = (x_t - sqrt(1-ab_t) eps) / sqrt(ab_t), sigma_t^2 = eta^2 (1-ab_prev)/(1-ab_t)
    (1 - ab_t/ab_prev), mu_t = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma_t^2) eps."""
    ratio = 1000 // STEPS
    timesteps = [i * ratio + 1 for i in range(STEPS)]
    n = torch.stack(
        [
            torch.randn((STEPS, *x0.shape[1:]), generator=torch.Generator().manual_seed(s))
            for s in seeds
        ]
    ).to(x0.dtype)
    xs = [x0] + [
        alpha_bars[t].sqrt() * x0 + (1 - alpha_bars[t]).sqrt() * n[:, i]
        for i, t in enumerate(timesteps)
    ]
    maps = []
    for i, t in enumerate(timesteps):
        ab, ab_prev = alpha_bars[t], alpha_bars[t - ratio] if t >= ratio else alpha_bars[0]
        eps = noise(xs[i + 1], t, i)
        x0_hat = (xs[i + 1] - (1 - ab).sqrt() * eps) / ab.sqrt()
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        mu = ab_prev.sqrt() * x0_hat + (1 - ab_prev - sigma**2).sqrt() * eps
        maps.append((xs[i] - mu) / sigma)
    return torch.stack(xs, dim=1), torch.stack(maps[::-1], dim=1)


@pytest.mark.parametrize(("eta", "guidance"), [(1.0, 1.0), (0.6, 3.0)])
def test_ddpm_matches_the_equations_and_samples_back_exactly(
    tiny64, clean64, unet_noise, helpers, eta, guidance
):
    noise = unet_noise(tiny64, ["an astronaut", "a cat"], guidance)
    seeds = [7, 2**40 + 3]
    result = ddpm_invert(noise, clean64, SD15_SCHEDULER_CONFIG, STEPS, seeds=seeds, eta=eta)
    noisy, maps = reference_ddpm(noise, clean64, seeds, eta, helpers.alpha_bars())
    assert result.noisy_latents.shape == (2, STEPS + 1, 4, 8, 8)
    assert result.noise_maps.shape == (2, STEPS, 4, 8, 8)
    # (1): float64 square roots of the same float32 alpha-bars times the same float32 noise,
    # the same products in float64: measured 0; 1e-12 is 1e3 above float64's rounding of
    # these few operations and 1e4 below float32's.
    assert helpers.relative(result.noisy_latents, noisy) < 1e-12
    # (2): the engine takes sigma_t with diffusers' own float32 operations (so that sampling
    # adds back exactly what it divided by), the reference in float64: sigma_t is off by a
    # few eps32 (6e-8 each), which the division by it and the cancellation in x_{t-1} - mu_t
    # amplify ~15x (measured 9.4e-7 at eta 1 and 0.6); 1e-5 leaves 10x.
    assert helpers.relative(result.noise_maps, maps) < 1e-5
    assert torch.equal(result.latents, result.noisy_latents[:, -1])
    assert torch.equal(result.noisy_latents[:, 0], clean64)

    back, rows = ddpm_sample(
        noise, result.latents, result.noise_maps, SD15_SCHEDULER_CONFIG, STEPS, eta=eta
    )
    assert rows == [0, 1]
    # float64: sigma_t z_t adds back exactly the residual (2) divided by, so what remains is
    # float64 rounding over 6 steps, amplified by 1 / sigma_t (measured 1.7e-13; float32
    # would leave 1e-6): 1e-11 leaves 58x.
    assert helpers.relative(back, clean64) < 1e-11
    # Without its noise maps (or with another eta) the same sampler lands elsewhere.
    other, _ = ddpm_sample(
        noise, result.latents, torch.zeros_like(result.noise_maps), SD15_SCHEDULER_CONFIG, STEPS
    )
    assert helpers.relative(other, clean64) > 0.1


def test_a_seed_gives_a_row_the_same_noise_in_any_batch(tiny64, clean64, unet_noise):
    noise = unet_noise(tiny64, ["an astronaut", "a cat"])
    both = ddpm_invert(noise, clean64, SD15_SCHEDULER_CONFIG, 3, seeds=[5, 9])
    solo = ddpm_invert(
        unet_noise(tiny64, ["a cat"]), clean64[1:], SD15_SCHEDULER_CONFIG, 3, seeds=[9]
    )
    assert torch.equal(both.noisy_latents[1:], solo.noisy_latents)
    # float64: a batch of two and a row alone differ by float64 rounding only (the UNet's
    # kernels sum in another order), amplified by the division by sigma_t: measured 4e-14.
    # 1e-9 leaves 2e4 and is far below float32's rounding (1e-6 and more in a noise map).
    assert float((both.noise_maps[1:] - solo.noise_maps).abs().max()) <= 1e-9
    again = ddpm_invert(noise, clean64, SD15_SCHEDULER_CONFIG, 3, seeds=[5, 9])
    assert torch.equal(again.noise_maps, both.noise_maps)
    swapped = ddpm_invert(noise, clean64, SD15_SCHEDULER_CONFIG, 3, seeds=[9, 5])
    assert not torch.allclose(swapped.noisy_latents, both.noisy_latents)


def test_eta_must_be_positive_and_each_row_needs_a_seed(tiny64, clean64, unet_noise):
    noise = unet_noise(tiny64, ["a", "b"])
    with pytest.raises(ValueError, match="eta"):
        ddpm_invert(noise, clean64, SD15_SCHEDULER_CONFIG, 3, seeds=[1, 2], eta=0.0)
    with pytest.raises(ValueError, match="seeds"):
        ddpm_invert(noise, clean64, SD15_SCHEDULER_CONFIG, 3, seeds=[1])


def test_rows_dropped_between_steps_leave_every_tensor(tiny64, clean64, unet_noise):
    calls: list[int] = []

    def noise(z, t, i):
        calls.append(z.shape[0])
        return unet_noise(tiny64, ["an astronaut", "a cat"][: z.shape[0]])(z, t, i)

    result = ddpm_invert(
        noise,
        clean64,
        SD15_SCHEDULER_CONFIG,
        3,
        seeds=[1, 2],
        between_steps=lambda done: [0] if done == 1 else None,
    )
    assert calls == [2, 1, 1]
    assert result.rows == [0]
    assert result.noise_maps.shape[0] == result.noisy_latents.shape[0] == 1
