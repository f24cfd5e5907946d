"""Per-job bounds from a job's parameters, before anything is stored: 422 naming the field.

- SDXL-only parameters (prompt_2, size conditioning) for a model of another family;
- `resolution`: at most INVERSION_MAX_RESOLUTION_SCALE x the job's model's native size per
  side, and never above INVERSION_MAX_RESOLUTION_SIDE (also for a model no worker announced yet);
- the bytes the job may keep in Redis (its input plus its worst-case result,
  stored_bytes): at most INVERSION_MAX_JOB_BYTES;
- its GPU work (job_cost): at most INVERSION_MAX_JOB_COST.

The per-key budgets these figures count against are service/limits.py's.
"""

from __future__ import annotations

import numpy as np

from ddim_inversion.contract import ModelInfo
from ddim_inversion.errors import ErrorCode
from ddim_inversion.estimates import job_cost, stored_bytes, unet_calls
from ddim_inversion.params import InversionParams
from service.errors import ProblemError
from service.limits import JobSize
from service.settings import GatewaySettings

SIZE_MULTIPLE = 64
"""`resolution` sizes are multiples of this (parse_resolution)."""


def _invalid(field: str, detail: str) -> ProblemError:
    return ProblemError(422, ErrorCode.VALIDATION_ERROR, detail, field=field)


def largest_side(settings: GatewaySettings, model: ModelInfo | None) -> tuple[int, str]:
    """The largest width or height a job may ask for, and which setting says so."""
    limit, why = settings.max_resolution_side, "INVERSION_MAX_RESOLUTION_SIDE"
    if model is not None:
        native = max(model.native_resolution)
        scaled = int(native * settings.max_resolution_scale) // SIZE_MULTIPLE * SIZE_MULTIPLE
        if scaled < limit:
            limit = scaled
            why = (
                f"INVERSION_MAX_RESOLUTION_SCALE {settings.max_resolution_scale:g} x the "
                f"model's native {native}"
            )
    return limit, why


def check_resolution(
    params: InversionParams, settings: GatewaySettings, model: ModelInfo | None
) -> None:
    """422 (`resolution`) for a side over `largest_side`."""
    if params.resolution is None:
        return
    width, height = params.resolution
    limit, why = largest_side(settings, model)
    if max(width, height) > limit:
        raise _invalid(
            "resolution", f"{width}x{height}: a side may be at most {limit} pixels ({why})"
        )


def check_model_parameters(params: InversionParams, model: ModelInfo | None) -> None:
    """422 naming the first SDXL-only parameter given for a model known not to be SDXL
    (it has no second text encoder and no size conditioning to take it)."""
    given = params.sdxl_parameters
    if given and model is not None and model.family != "sdxl":
        raise _invalid(
            given[0],
            f"{', '.join(given)} apply to SDXL models only; model {model.name!r} is of "
            f"family {model.family!r}",
        )


def result_size(
    params: InversionParams, settings: GatewaySettings, model: ModelInfo | None
) -> tuple[int, int]:
    """The size the worker will invert at: asked for, or the model's native one; without a
    model record the largest size allowed is assumed."""
    if params.resolution is not None:
        return params.resolution
    if model is not None:
        return model.native_resolution
    return settings.max_resolution_side, settings.max_resolution_side


def size_job(
    params: InversionParams,
    settings: GatewaySettings,
    model: ModelInfo | None,
    rgb: np.ndarray,
) -> JobSize:
    """The job's GPU cost and stored bytes (`rgb`: the input as it will be stored), or 422
    when either passes its per-job limit."""
    size = result_size(params, settings, model)
    stored = stored_bytes(params, model, (rgb.shape[1], rgb.shape[0]), size)
    if stored.total > settings.max_job_bytes:
        raise _invalid(
            stored.largest_field,
            f"the job would keep up to {stored.total} bytes in the job store (input "
            f"{stored.input}, latents {stored.latents}, trajectory {stored.trajectory}, null "
            f"embeddings {stored.null_embeddings}, method latents {stored.method_latents}, "
            f"reconstruction {stored.reconstruction}); "
            f"the limit is {settings.max_job_bytes} (INVERSION_MAX_JOB_BYTES): lower "
            "resolution or num_inference_steps, or drop return_trajectory",
        )
    cost = job_cost(params, model, size)
    if cost > settings.max_job_cost:
        raise _invalid(
            "num_inference_steps",
            f"the job would cost {cost} ({unet_calls(params)} UNet calls at "
            f"{size[0]}x{size[1]}); the limit is {settings.max_job_cost} "
            "(INVERSION_MAX_JOB_COST): the cost grows with num_inference_steps, "
            "guidance_scale other than 1 (twice the calls), refine_iterations, method "
            "null_text (null_text_inner_steps), verify and resolution",
        )
    return JobSize(cost=cost, bytes=stored.total)
