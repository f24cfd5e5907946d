"""The inverse scheduler config a job runs with: the model's, then the job's overrides.

Two inverse schedulers (`inverse_scheduler`): DDIMInverseScheduler (`ddim`) and
DPMSolverMultistepInverseScheduler (`dpmsolver`). Every constructor parameter a job may
override is listed once here per scheduler, with the values it admits;
`resolve_scheduler_config` refuses, before any compute, every combination the scheduler
would reject or that would divide by zero in its first step.
"""

from __future__ import annotations

import math
from typing import Any

from ddim_inversion.errors import InvalidParameter
from ddim_inversion.noise_schedule import check_schedule

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


DPMSOLVER_OVERRIDES: dict[str, str] = {
    "num_train_timesteps": "int",
    "beta_start": "float",
    "beta_end": "float",
    "beta_schedule": "linear|scaled_linear|squaredcos_cap_v2",
    "trained_betas": "list[float]",
    "prediction_type": "epsilon|sample|v_prediction",
    "solver_order": "int",
    "solver_type": "midpoint|heun",
    "lower_order_final": "bool",
    "euler_at_final": "bool",
    "lambda_min_clipped": "float",
}
"""Every DPMSolverMultistepInverseScheduler parameter a job may override. Not offered:
algorithm_type (DPM-Solver++ only: the SDE variants add noise, which no inversion
undoes), timestep_spacing (linspace only: the other spacings' inverse noise levels do
not mirror the forward sampler's), the sigma schedules and thresholding."""


DPMSOLVER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
}
"""The scheduler's own defaults, used where a model's config is silent (the model's
betas and prediction type carry over; its solver settings rarely exist). Not
lambda_min_clipped: its default, minus infinity, has no JSON form; only an override
sets it."""


DPMSOLVER_FIXED: dict[str, Any] = {
    "algorithm_type": "dpmsolver++",
    "timestep_spacing": "linspace",
    "final_sigmas_type": "sigma_min",
}
"""What every dpmsolver config holds whatever the model's says (see DPMSOLVER_OVERRIDES).
final_sigmas_type is the forward sampler's: it ends at the lowest noise level of the
schedule, where the inversion starts, rather than at 0 (mirrored grids reconstruct
several times closer at 20 steps)."""


OVERRIDES: dict[str, dict[str, str]] = {
    "ddim": SCHEDULER_OVERRIDES,
    "dpmsolver": DPMSOLVER_OVERRIDES,
}
"""The overridable parameters of each `inverse_scheduler`."""


def _finite_number(value: Any) -> bool:
    """An int or float (not a bool) within the float range and not NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past the float range
        return False


def check_override(name: str, value: Any, inverse_scheduler: str = "ddim") -> Any:
    """One override's type and value, or InvalidParameter naming the valid choices."""
    field = f"scheduler.{name}"
    table = OVERRIDES[inverse_scheduler]
    kind = table.get(name)
    if kind is None:
        raise InvalidParameter(
            field,
            f"unknown scheduler parameter for inverse_scheduler {inverse_scheduler}; "
            f"valid: {', '.join(table)}",
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
    model_config: dict[str, Any],
    overrides: dict[str, Any],
    num_inference_steps: int,
    inverse_scheduler: str = "ddim",
    method: str = "ddim",
    verify: bool = False,
) -> dict[str, Any]:
    """The scheduler config a job runs with: the model's, then the job's overrides.

    Refuses, before any compute, every combination that the inverse scheduler would
    reject or that would divide by zero in its first step, and every schedule that
    `method` (and the verify sampler, with `verify`) cannot step through
    (noise_schedule.check_schedule).
    """
    defaults = DPMSOLVER_DEFAULTS if inverse_scheduler == "dpmsolver" else SCHEDULER_DEFAULTS
    config = {k: model_config.get(k, v) for k, v in defaults.items()}
    for name, value in overrides.items():
        config[name] = check_override(name, value, inverse_scheduler)
    _check_schedule(config, num_inference_steps)
    if inverse_scheduler == "dpmsolver":
        config = _check_dpmsolver(config | DPMSOLVER_FIXED, num_inference_steps)
    else:
        config = _check_ddim(config, num_inference_steps)
    check_schedule(config, num_inference_steps, inverse_scheduler, method, verify)
    return config


def _check_schedule(config: dict[str, Any], num_inference_steps: int) -> None:
    """What both schedulers need: a bounded number of training steps, at least as many as
    the inference steps, and betas in (0, 1)."""
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


def _check_ddim(config: dict[str, Any], num_inference_steps: int) -> dict[str, Any]:
    n_train = config["num_train_timesteps"]
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


def _check_dpmsolver(config: dict[str, Any], num_inference_steps: int) -> dict[str, Any]:
    if config["solver_order"] not in (1, 2, 3):
        raise InvalidParameter("scheduler.solver_order", "must be 1, 2 or 3")
    if config["prediction_type"] not in ("epsilon", "sample", "v_prediction"):
        # A model's own config may name a type (flow_prediction) no inversion here supports.
        raise InvalidParameter(
            "scheduler.prediction_type", "must be one of epsilon, sample, v_prediction"
        )
    n_train = config["num_train_timesteps"]
    if num_inference_steps >= n_train:
        # linspace over n_train - 1 rounds two steps onto one timestep: fewer steps run.
        raise InvalidParameter(
            "num_inference_steps",
            f"must be below num_train_timesteps ({n_train}) with inverse_scheduler dpmsolver",
        )
    return config
