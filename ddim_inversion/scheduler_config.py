"""The DDIMInverseScheduler config a job runs with: the model's, then the job's overrides.

Every constructor parameter a job may override is listed once here, with the values it
admits; `resolve_scheduler_config` refuses, before any compute, every combination the
scheduler would reject or that would divide by zero in its first step.
"""

from __future__ import annotations

import math
from typing import Any

from ddim_inversion.errors import InvalidParameter

MAX_TRAIN_TIMESTEPS = 10_000
"""Upper bound on `num_train_timesteps`: an override cannot allocate without limit."""


# Every DDIMInverseScheduler constructor parameter a job may override, with the values it admits.
SCHEDULER_OVERRIDES: dict[str, str] = {
    "num_train_timesteps": "int",
    "beta_start": "float",
    "beta_end": "float",
    "beta_schedule": "linear|scaled_linear|squaredcos_cap_v2",
    "trained_betas": "list[float]",
    "clip_sample": "bool",
    "clip_sample_range": "float",
    "set_alpha_to_one": "bool",
    "steps_offset": "int",
    "prediction_type": "epsilon|sample|v_prediction",
    "timestep_spacing": "leading|trailing",
    "rescale_betas_zero_snr": "bool",
}


SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}
"""DDIMInverseScheduler's own constructor defaults, used where a model's config is silent."""


def _finite_number(value: Any) -> bool:
    """An int or float (not a bool) within the float range and not NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past the float range
        return False


def check_override(name: str, value: Any) -> Any:
    """One override's type and value, or InvalidParameter naming the valid choices."""
    field = f"scheduler.{name}"
    kind = SCHEDULER_OVERRIDES.get(name)
    if kind is None:
        raise InvalidParameter(
            field, f"unknown scheduler parameter; valid: {', '.join(SCHEDULER_OVERRIDES)}"
        )
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidParameter(field, "must be true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidParameter(field, "must be an integer")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidParameter(field, "must be a number")
        if not _finite_number(value):
            raise InvalidParameter(field, "must be finite")
        return float(value)
    if kind == "list[float]":
        if value is None:
            return None
        if not isinstance(value, list) or not all(_finite_number(v) for v in value):
            raise InvalidParameter(field, "must be a list of finite numbers or null")
        return [float(v) for v in value]
    choices = kind.split("|")
    if value not in choices:
        raise InvalidParameter(field, f"must be one of {', '.join(choices)}")
    return value


def resolve_scheduler_config(
    model_config: dict[str, Any], overrides: dict[str, Any], num_inference_steps: int
) -> dict[str, Any]:
    """The scheduler config a job runs with: the model's, then the job's overrides.

    Refuses, before any compute, every combination that DDIMInverseScheduler would reject
    or that would divide by zero in its first step.
    """
    config = {k: model_config.get(k, v) for k, v in SCHEDULER_DEFAULTS.items()}
    for name, value in overrides.items():
        config[name] = check_override(name, value)

    n_train = config["num_train_timesteps"]
    if not 1 <= n_train <= MAX_TRAIN_TIMESTEPS:
        raise InvalidParameter(
            "scheduler.num_train_timesteps", f"must be between 1 and {MAX_TRAIN_TIMESTEPS}"
        )
    if num_inference_steps > n_train:
        raise InvalidParameter(
            "num_inference_steps",
            f"{num_inference_steps} exceeds the scheduler's num_train_timesteps ({n_train})",
        )
    betas = config["trained_betas"]
    if betas is not None:
        if len(betas) != n_train:
            raise InvalidParameter(
                "scheduler.trained_betas",
                f"has {len(betas)} values, num_train_timesteps is {n_train}",
            )
        if not all(0.0 < b < 1.0 for b in betas):
            raise InvalidParameter("scheduler.trained_betas", "every beta must lie in (0, 1)")
    else:
        start, end = config["beta_start"], config["beta_end"]
        if not (0.0 < start < 1.0 and 0.0 < end < 1.0):
            raise InvalidParameter(
                "scheduler.beta_start", "beta_start and beta_end must lie in (0, 1)"
            )
    if config["clip_sample_range"] <= 0:
        raise InvalidParameter("scheduler.clip_sample_range", "must be positive")
    if config["steps_offset"] < 0:
        raise InvalidParameter("scheduler.steps_offset", "must not be negative")
    if config["timestep_spacing"] == "leading":
        last = (num_inference_steps - 1) * (n_train // num_inference_steps) + config["steps_offset"]
        if last >= n_train:
            raise InvalidParameter(
                "scheduler.steps_offset",
                f"puts the last timestep at {last}, past num_train_timesteps - 1 ({n_train - 1})",
            )
    if config["prediction_type"] == "sample" and config["set_alpha_to_one"]:
        raise InvalidParameter(
            "scheduler.prediction_type",
            "'sample' with set_alpha_to_one=true divides by zero in the first step; "
            "set set_alpha_to_one to false",
        )
    return config
