"""The noise prediction every method steps with: eps = unet(z, t, text), classifier-free
guided where asked,

    (4)  eps = eps_u + g * (eps_c - eps_u),   eps_u = unet(z, t, uncond),  eps_c = unet(z, t, cond)

The UNet runs in the model's dtype (fp16 on a GPU); the latent state and eps stay in the
state's dtype (float32, or float64), so 50 steps do not accumulate fp16 rounding.
"""

from __future__ import annotations

from typing import Any

import torch

from worker.engine.conditioning import TextConditioning
from worker.models import LoadedModel


def unet_noise(
    model: LoadedModel, state: torch.Tensor, t: int, text: TextConditioning, unet: Any = None
) -> torch.Tensor:
    """eps = unet(state, t, text), in the state's dtype; `unet` replaces the model's (eager).
    The model's output is in its `prediction_type` (epsilon, v or x0), as the scheduler
    steps take it."""
    unet = model.unet if unet is None else unet
    sample = unet(state.to(model.dtype), t, **text.unet_kwargs(model.dtype)).sample
    return sample.to(state.dtype)


def guide(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Equation (4): the unconditional prediction moved g times towards the conditional one."""
    return eps_uncond + scales * (eps_cond - eps_uncond)


def predict_noise(
    model: LoadedModel,
    state: torch.Tensor,
    t: int,
    cond: TextConditioning,
    uncond: TextConditioning | None = None,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """eps for each row of `state`: unguided without `uncond`, else equation (4) with both
    predictions from one UNet call of twice the rows; `scales` (B, 1, 1, 1) per row."""
    if uncond is None:
        return unet_noise(model, state, t, cond)
    assert scales is not None
    eps_uncond, eps_cond = unet_noise(
        model, torch.cat([state, state]), t, TextConditioning.cat([uncond, cond])
    ).chunk(2)
    return guide(eps_uncond, eps_cond, scales)
