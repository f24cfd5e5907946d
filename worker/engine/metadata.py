"""What every result says about itself: the one place a result's `ResultMetadata` is
built from its request, whichever method produced it."""

from __future__ import annotations

from typing import Any

import torch

from ddim_inversion.contract import ENGINE_VERSION, ResultMetadata
from ddim_inversion.params import InversionParams
from worker.engine.encoding import sdxl_conditioning
from worker.engine.types import resolution_of
from worker.models import LoadedModel


def result_metadata(
    model: LoadedModel,
    params: InversionParams,
    *,
    latents: torch.Tensor,
    trajectory: torch.Tensor | None,
    timesteps: list[int],
    config: dict[str, Any],
    prompt: tuple[int, bool],
    **method_fields: Any,
) -> ResultMetadata:
    """The metadata of one result: its request, the model, the timesteps and scheduler
    config it ran with, its prompt's (token count, truncated), the shapes and dtype of
    its tensors as stored, and what its method adds or settles (`method_fields`, e.g.
    ddpm's seed when none was given)."""
    width, height = resolution_of(params, model)
    fields: dict[str, Any] = dict(
        model=model.name,
        width=width,
        height=height,
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        guidance_scale=params.guidance_scale,
        token_count=prompt[0],
        truncated=prompt[1],
        encode_mode=params.encode_mode,
        seed=params.seed,
        num_inference_steps=params.num_inference_steps,
        timesteps=timesteps,
        scheduler_config=config,
        latents_shape=list(latents.shape),
        trajectory_shape=list(trajectory.shape) if trajectory is not None else None,
        dtype=str(latents.dtype).removeprefix("torch."),
        engine_version=ENGINE_VERSION,
        sdxl_conditioning=(
            sdxl_conditioning(params, (width, height)) if model.family == "sdxl" else None
        ),
    )
    return ResultMetadata(**(fields | method_fields))
