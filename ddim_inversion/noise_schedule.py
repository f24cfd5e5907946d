"""The noise schedule a scheduler config yields, built with NumPy as diffusers builds it
with torch (float32 betas, their cumulative product), and checked before any compute.

A config whose every parameter is in range can still yield a schedule no step survives:
betas near 1 make the cumulative alphas underflow to 0 within a few steps (0.9999999
reaches 0 at the 7th), and DDIM divides by their square root; a `lambda_min_clipped`
above every log-SNR leaves DPM-Solver no timestep. Such a job would store NaN latents, or
fail deep in the scheduler. `check_schedule` refuses it at submit, naming `scheduler`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ddim_inversion.errors import InvalidParameter

FIELD = "scheduler"

_F32 = np.float32


def _cosine_betas(n_train: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' betas_for_alpha_bar (squaredcos_cap_v2): computed in float64, then float32
    (vectorised: NumPy's cosine may differ from math.cos in the last of 53 bits, far below
    float32's 24)."""
    t = np.arange(n_train + 1, dtype=np.float64) / n_train
    alpha_bar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta).astype(_F32)


def _rescaled_zero_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' rescale_zero_terminal_snr: the last cumulative alpha becomes exactly 0."""
    root = np.sqrt(np.cumprod(1.0 - betas, dtype=_F32))
    first, last = root[0].copy(), root[-1].copy()
    root = (root - last) * (first / (first - last))
    alphas_bar = root**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1.0 - alphas).astype(_F32)


def betas_of(config: dict[str, Any]) -> np.ndarray:
    """The float32 betas of a resolved config, as the scheduler's constructor makes them."""
    n_train = config["num_train_timesteps"]
    schedule = config["beta_schedule"]
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=_F32)
    elif schedule == "linear":
        betas = np.linspace(config["beta_start"], config["beta_end"], n_train, dtype=_F32)
    elif schedule == "scaled_linear":
        start, end = config["beta_start"] ** 0.5, config["beta_end"] ** 0.5
        betas = np.linspace(start, end, n_train, dtype=_F32) ** 2
    else:
        betas = _cosine_betas(n_train)
    if config.get("rescale_betas_zero_snr"):
        with np.errstate(divide="ignore", invalid="ignore"):
            betas = _rescaled_zero_snr(betas)
    return betas


def alphas_cumprod(config: dict[str, Any]) -> np.ndarray:
    """The cumulative alphas (alpha-bar) of a resolved config, float32."""
    return np.cumprod(_F32(1.0) - betas_of(config), dtype=_F32)


def ddim_timesteps(config: dict[str, Any], steps: int) -> np.ndarray:
    """DDIMInverseScheduler.set_timesteps's timesteps, ascending."""
    n_train = config["num_train_timesteps"]
    if config["timestep_spacing"] == "leading":
        return np.arange(steps, dtype=np.int64) * (n_train // steps) + config["steps_offset"]
    return np.round(np.arange(n_train, 0, -n_train / steps)[::-1]).astype(np.int64) - 1


def _refuse(message: str) -> InvalidParameter:
    return InvalidParameter(FIELD, message)


def _check_alphas(alphas: np.ndarray, zero_terminal: bool) -> None:
    """Finite, in (0, 1], strictly decreasing; the last exactly 0 only for a zero-SNR
    schedule, which is built to end there."""
    body = alphas[:-1] if zero_terminal else alphas
    if not np.isfinite(alphas).all():
        raise _refuse("the schedule's cumulative alphas are not all finite")
    if zero_terminal and alphas[-1] != 0.0:
        raise _refuse("rescale_betas_zero_snr did not end the schedule at alpha-bar 0")
    if not ((body > 0.0) & (body <= 1.0)).all():
        first = int(np.argmax(body <= 0.0))
        raise _refuse(
            f"the schedule's cumulative alpha reaches 0 at timestep {first} (betas too close "
            "to 1 for num_train_timesteps): DDIM divides by it. Lower beta_start/beta_end "
            "or num_train_timesteps"
        )
    if not (np.diff(alphas) < 0.0).all():
        first = int(np.argmax(np.diff(alphas) >= 0.0))
        raise _refuse(
            f"the schedule's cumulative alpha does not decrease at timestep {first + 1} "
            "(in float32, a beta below about 6e-8 leaves it unchanged, and a product "
            "below about 1e-38 loses precision)"
        )


def _check_ddim_method(
    config: dict[str, Any], alphas: np.ndarray, steps: int, method: str, verify: bool
) -> None:
    """What each method divides by: EDICT's a_t = sqrt(ab_prev / ab_t) at every step, and a
    sampler's x0 estimate (DDIM's, DDPM's, null-text's, verify's) by sqrt(ab_t) unless the
    model predicts v. A zero-SNR schedule's last alpha-bar is 0: refused where divided by."""
    timesteps = ddim_timesteps(config, steps)
    if float(alphas[timesteps].min()) > 0.0:
        return
    samples = verify or method in ("ddpm", "null_text")
    if method == "edict" or (samples and config["prediction_type"] != "v_prediction"):
        user = f"method {method}" if method == "edict" or not verify else "verify"
        raise _refuse(
            f"rescale_betas_zero_snr ends at alpha-bar 0 at timestep {int(timesteps[-1])}, "
            f"which {user} divides by; use timestep_spacing leading, or "
            "prediction_type v_prediction (not with edict)"
        )


def _check_dpmsolver(config: dict[str, Any], alphas: np.ndarray, steps: int) -> None:
    """DPM-Solver's log-SNR must be finite, and `lambda_min_clipped` must leave at least
    `steps` timesteps below the clip (set_timesteps spaces them over 0..noisiest)."""
    if not (alphas < 1.0).all():
        raise _refuse("a cumulative alpha of 1 has no log-SNR: every beta must exceed about 6e-8")
    with np.errstate(divide="ignore"):
        lambdas = np.log(np.sqrt(alphas)) - np.log(np.sqrt(_F32(1.0) - alphas))
    clip = config.get("lambda_min_clipped", -math.inf)
    # As torch compares it: in float32, where 1e308 is infinite.
    bound = _F32(min(max(clip, -3.4e38), 3.4e38)) if math.isfinite(clip) else _F32(clip)
    clipped = int(np.searchsorted(lambdas[::-1], bound, side="left"))
    noisiest = config["num_train_timesteps"] - 1 - clipped
    if noisiest < steps:
        raise InvalidParameter(
            "scheduler.lambda_min_clipped",
            f"{clip} leaves timesteps 0..{noisiest}, fewer than the {steps} steps asked for; "
            f"the schedule's log-SNR spans {float(lambdas[-1]):.3g}..{float(lambdas[0]):.3g}",
        )


def check_schedule(
    config: dict[str, Any],
    steps: int,
    inverse_scheduler: str = "ddim",
    method: str = "ddim",
    verify: bool = False,
) -> None:
    """Refuse (InvalidParameter) the resolved `config` if the schedule it yields is not one a
    job of `method` (and its verify sampler) can run `steps` steps of."""
    zero_terminal = inverse_scheduler == "ddim" and bool(config.get("rescale_betas_zero_snr"))
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        alphas = alphas_cumprod(config)
    _check_alphas(alphas, zero_terminal)
    if inverse_scheduler == "dpmsolver":
        _check_dpmsolver(config, alphas, steps)
    else:
        _check_ddim_method(config, alphas, steps, method, verify)
