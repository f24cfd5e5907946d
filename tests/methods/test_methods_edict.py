"""EDICT: the inversion against the paper's equations written here, and exactness: in
float64 sampling back gives the encoded latent to rounding, whatever the guidance."""

from __future__ import annotations

import pytest
import torch

from worker.methods.edict import edict_invert, edict_sample
from worker.tiny_model import SD15_SCHEDULER_CONFIG

STEPS = 10


def reference_edict(noise, x0: torch.Tensor, p: float, alpha_bars: torch.Tensor):
    """Wallace et al. 2022, inversion: for t = 1 .. T (leading spacing, steps_offset 1, the
    alpha-bar before the first step alphas_cumprod[0]),
    y' = (y - (1-p) x) / p; x' = (x - (1-p) y') / p; y = (y' - b eps(x')) / a;
    x = (x' - b eps(y)) / a, with a = sqrt(ab_prev / ab) and
    b = sqrt(1-ab_prev) - sqrt(ab_prev (1-ab) / ab)."""
    ratio = 1000 // STEPS
    x, y = x0, x0.clone()
    for i in range(STEPS):
        t = i * ratio + 1
        ab = alpha_bars[t]
        ab_prev = alpha_bars[t - ratio] if t - ratio >= 0 else alpha_bars[0]
        a = (ab_prev / ab).sqrt()
        b = (1 - ab_prev).sqrt() - (ab_prev * (1 - ab) / ab).sqrt()
        y_inter = (y - (1 - p) * x) / p
        x_inter = (x - (1 - p) * y_inter) / p
        y = (y_inter - b * noise(x_inter, t, i)) / a
        x = (x_inter - b * noise(y, t, i)) / a
    return x, y


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_edict_matches_the_papers_equations_and_samples_back_exactly(
    tiny64, clean64, unet_noise, helpers, guidance
):
    noise = unet_noise(tiny64, ["an astronaut", "a cat"], guidance)
    result = edict_invert(noise, clean64, SD15_SCHEDULER_CONFIG, STEPS, mixing=0.93)
    x, y = reference_edict(noise, clean64, 0.93, helpers.alpha_bars())
    assert result.timesteps == [i * 100 + 1 for i in range(STEPS)]
    # float64, the same operations in another arrangement: measured 4e-15. 1e-10 leaves
    # 2e4 and is 1e3 below what float32 rounding anywhere (1e-7 and more) would leave.
    assert helpers.relative(result.latents, x) < 1e-10
    assert helpers.relative(result.latents_pair, y) < 1e-10
    # The latents moved far from the clean ones: the check below is not trivially met.
    assert helpers.relative(result.latents, clean64) > 0.5

    back = edict_sample(
        noise, result.latents, result.latents_pair, SD15_SCHEDULER_CONFIG, STEPS, mixing=0.93
    )
    # Float64 rounding, amplified by the divisions by p and a over 10 steps, to 1.1e-11 at
    # most (measured; float32 would be near 1e-6): 1e-9 leaves 90x.
    assert helpers.relative(back.latents, clean64) < 1e-9
    assert helpers.relative(back.latents_pair, clean64) < 1e-9


def test_each_row_has_its_own_mixing_and_does_not_depend_on_its_batch_mates(
    tiny64, clean64, unet_noise
):
    noise = unet_noise(tiny64, ["an astronaut", "a cat"])
    both = edict_invert(noise, clean64, SD15_SCHEDULER_CONFIG, 4, mixing=[0.93, 0.5])
    solo = edict_invert(
        unet_noise(tiny64, ["a cat"]), clean64[1:], SD15_SCHEDULER_CONFIG, 4, mixing=0.5
    )
    # float64: batch-mates change only the UNet kernels' summation order, float64 rounding
    # (measured 4e-14 after 4 steps); 1e-10 leaves 2000x and is far below float32's (1e-6).
    assert float((both.latents[1:] - solo.latents).abs().max()) <= 1e-10
    other = edict_invert(noise, clean64, SD15_SCHEDULER_CONFIG, 4, mixing=0.93)
    assert not torch.allclose(both.latents[1:], other.latents[1:])
    with pytest.raises(ValueError, match="mixing"):
        edict_invert(noise, clean64, SD15_SCHEDULER_CONFIG, 4, mixing=[0.5, 0.0])


def test_between_steps_reports_progress_drops_rows_and_cancels(tiny64, clean64, unet_noise):
    seen: list[int] = []

    def drop_the_astronaut_after_two(done: int) -> list[int] | None:
        seen.append(done)
        return [1] if done == 2 else None

    def prompts_still_running(z, t, i):
        # The caller narrows its conditioning when it drops a row: emulated here.
        return unet_noise(tiny64, ["an astronaut", "a cat"][-z.shape[0] :])(z, t, i)

    result = edict_invert(
        prompts_still_running,
        clean64,
        SD15_SCHEDULER_CONFIG,
        4,
        between_steps=drop_the_astronaut_after_two,
        keep_trajectory=True,
    )
    assert seen == [1, 2, 3, 4]
    assert result.rows == [1] and result.latents.shape[0] == 1
    assert result.trajectory is not None and result.trajectory.shape == (1, 5, 4, 8, 8)
    solo = edict_invert(unet_noise(tiny64, ["a cat"]), clean64[1:], SD15_SCHEDULER_CONFIG, 4)
    # float64 rounding only, as in the test above.
    assert float((result.latents - solo.latents).abs().max()) <= 1e-10
    assert torch.equal(result.trajectory[:, -1], result.latents)

    class Canceled(Exception):
        pass

    def cancel(done: int) -> None:
        raise Canceled

    with pytest.raises(Canceled):
        edict_invert(
            unet_noise(tiny64, ["a", "b"]), clean64, SD15_SCHEDULER_CONFIG, 4, between_steps=cancel
        )
