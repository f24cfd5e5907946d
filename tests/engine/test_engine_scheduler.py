"""Scheduler overrides reach DDIMInverseScheduler; impossible ones fail before any UNet call."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from ddim_inversion.errors import InvalidParameter
from ddim_inversion.params import InversionParams
from tests.rounding import drift, size
from worker.engine.dispatch import invert
from worker.engine.types import InversionRequest

STEPS = 10
PROMPT = "a photo of a cat"

OVERRIDES = {
    "trailing": {"timestep_spacing": "trailing"},
    "steps_offset_0": {"steps_offset": 0},
    "alpha_to_one": {"set_alpha_to_one": True},
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "v_prediction": {"prediction_type": "v_prediction"},
    "clip": {"clip_sample": True, "clip_sample_range": 0.5},
    "zero_snr": {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    "trained_betas": {"trained_betas": np.linspace(0.0002, 0.015, 1000).tolist()},
    "train_500": {"num_train_timesteps": 500},
}


def _run(model, array, scheduler, steps=STEPS):
    params = InversionParams(prompt=PROMPT, num_inference_steps=steps, scheduler=scheduler)
    (result,) = invert(model, [InversionRequest(array, params)])
    return result


@pytest.fixture(scope="module")
def default_result(tiny, sample_arrays):
    return _run(tiny, sample_arrays["chelsea"], {})


def test_default_config_is_the_models(tiny, default_result):
    config = default_result.metadata.scheduler_config
    for key, value in tiny.scheduler_config.items():
        if key in config:
            assert config[key] == value, key
    # The bare constructor's defaults (linear betas, clip_sample) must not leak in.
    assert config["beta_schedule"] == "scaled_linear"
    assert config["clip_sample"] is False
    assert config["steps_offset"] == 1


@pytest.mark.parametrize("name", list(OVERRIDES))
def test_override(tiny, ref, sample_arrays, default_result, diff, name):
    overrides = OVERRIDES[name]
    array = sample_arrays["chelsea"]
    result = _run(tiny, array, overrides)
    config = result.metadata.scheduler_config
    for key, value in overrides.items():
        if isinstance(value, list):
            assert len(config[key]) == len(value)
            # float64 values through the config's JSON, exact; isclose's 1e-9 relative
            # forgives only a decimal round trip, not a float32 one (6e-8).
            assert all(math.isclose(a, b) for a, b in zip(config[key], value, strict=True))
        else:
            assert config[key] == value, key
    assert np.isfinite(result.latents.numpy()).all()
    # Each override moves the latents by 0.07 or more (measured), far above float32 rounding.
    assert diff(result.latents, default_result.latents) > 1e-2, "the override changed nothing"
    timesteps, expected = ref.diffusers_loop(array, PROMPT, STEPS, config)
    assert result.timesteps.tolist() == timesteps
    # The same float32 loop, kernels summing in their own orders: tests/rounding.py's drift,
    # 1.2e-4 for 10 unguided steps of |z| <= 1.
    assert diff(result.latents, expected) <= drift(STEPS, 1.0, size(expected))


def test_trailing_timesteps(tiny, sample_arrays):
    result = _run(tiny, sample_arrays["chelsea"], {"timestep_spacing": "trailing"})
    assert result.timesteps.tolist() == [99 + 100 * i for i in range(STEPS)]


@pytest.mark.parametrize(
    ("steps", "scheduler", "field"),
    [
        (20, {"num_train_timesteps": 10}, "num_inference_steps"),
        (10, {"trained_betas": [0.01] * 999}, "scheduler.trained_betas"),
        (10, {"prediction_type": "sample", "set_alpha_to_one": True}, "scheduler.prediction_type"),
        (10, {"steps_offset": 100}, "scheduler.steps_offset"),
        (10, {"no_such_parameter": 1}, "scheduler.no_such_parameter"),
        (10, {"beta_schedule": "cosine"}, "scheduler.beta_schedule"),
        (10, {"num_train_timesteps": 0}, "scheduler.num_train_timesteps"),
        (10, {"clip_sample_range": -1.0}, "scheduler.clip_sample_range"),
        # Schedules whose alpha-bar underflows to 0 (NaN latents), or stops decreasing.
        (10, {"beta_start": 0.9999999, "beta_end": 0.9999999}, "scheduler"),
        (10, {"beta_start": 1e-9, "beta_end": 1e-9}, "scheduler"),
    ],
)
def test_impossible_combinations(tiny, sample_arrays, unet_calls, steps, scheduler, field):
    array = sample_arrays["chelsea"]
    # Built without validation, as a caller that skipped the contract's checks would.
    bad = InversionParams.model_construct(
        **{
            **InversionParams(prompt=PROMPT).model_dump(),
            "num_inference_steps": steps,
            "scheduler": scheduler,
        }
    )
    good = InversionParams(prompt=PROMPT, num_inference_steps=STEPS)
    # A valid request first: the batch is still refused before any compute.
    requests = [InversionRequest(array, good), InversionRequest(array, bad)]
    with pytest.raises(InvalidParameter) as info:
        invert(tiny, requests)
    assert info.value.field == field
    assert field in str(info.value)
    assert unet_calls == []


@pytest.mark.parametrize(
    ("scheduler", "field"),
    [({"no_such_parameter": 1}, "no_such_parameter"), ({"beta_schedule": "cosine"}, "cosine")],
)
def test_params_refuse_unknown_overrides(scheduler, field):
    with pytest.raises(ValidationError) as info:
        InversionParams(prompt=PROMPT, scheduler=scheduler)
    assert "scheduler." in str(info.value)
    assert field in str(info.value) or "beta_schedule" in str(info.value)


NOISE_SCHEDULES = {
    **OVERRIDES,
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "cosine_10000": {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 10_000},
    "zero_snr_leading": {"rescale_betas_zero_snr": True},
}


@pytest.mark.parametrize("name", list(NOISE_SCHEDULES))
def test_the_submit_time_schedule_is_the_schedulers(tiny, name):
    """noise_schedule builds with NumPy (the gateway has no torch) the alpha-bars and
    timesteps DDIMInverseScheduler builds with torch."""
    from diffusers import DDIMInverseScheduler

    from ddim_inversion.noise_schedule import alphas_cumprod, ddim_timesteps
    from ddim_inversion.scheduler_config import resolve_scheduler_config

    config = resolve_scheduler_config(tiny.scheduler_config, NOISE_SCHEDULES[name], STEPS)
    scheduler = DDIMInverseScheduler.from_config(config)
    scheduler.set_timesteps(STEPS)
    theirs = scheduler.alphas_cumprod.numpy()
    ours = alphas_cumprod(config)
    # Both are float32 products of n_train factors, each rounded once: at most n_train
    # roundings of 2**-24 apart each, relative; 2x margin for the betas' own rounding.
    n_train = config["num_train_timesteps"]
    np.testing.assert_allclose(ours, theirs, rtol=2 * n_train * 2.0**-24, atol=1e-30)
    assert ddim_timesteps(config, STEPS).tolist() == scheduler.timesteps.tolist()


def test_dpmsolver_clip_refused_exactly_where_the_scheduler_fails(tiny):
    """The largest lambda_min_clipped accepted still gives STEPS distinct timesteps; past
    it diffusers returns fewer (duplicates dropped) or none (IndexError)."""
    from diffusers import DPMSolverMultistepInverseScheduler

    from ddim_inversion.noise_schedule import alphas_cumprod
    from ddim_inversion.scheduler_config import resolve_scheduler_config

    base = resolve_scheduler_config(tiny.scheduler_config, {}, STEPS, "dpmsolver")
    alphas = alphas_cumprod(base).astype(np.float64)
    lambdas = 0.5 * np.log(alphas) - 0.5 * np.log1p(-alphas)
    for clip in [*np.linspace(lambdas[-1] - 1, lambdas[0] + 1, 40).tolist(), 1e308]:
        try:
            config = resolve_scheduler_config(
                tiny.scheduler_config, {"lambda_min_clipped": clip}, STEPS, "dpmsolver"
            )
        except InvalidParameter as exc:
            assert exc.field == "scheduler.lambda_min_clipped"
            scheduler = DPMSolverMultistepInverseScheduler.from_config(
                base | {"lambda_min_clipped": clip}
            )
            try:
                scheduler.set_timesteps(STEPS)
            except IndexError:
                continue
            assert len(scheduler.timesteps) < STEPS, clip
            continue
        scheduler = DPMSolverMultistepInverseScheduler.from_config(config)
        scheduler.set_timesteps(STEPS)
        assert len(set(scheduler.timesteps.tolist())) == STEPS, clip
