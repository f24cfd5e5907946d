"""Per-job bounds from a job's parameters, before anything is stored: 422 naming the field.

- SDXL-only parameters (prompt_2, size conditioning) for a model of another family;
- `resolution`: at most INVERSION_MAX_RESOLUTION_SCALE x the job's model's native size per
  side, and never above INVERSION_MAX_RESOLUTION_SIDE (also for a model no worker announced yet);
- the bytes the job may keep in Redis (its input plus its worst-case result,
  stored_bytes): at most INVERSION_MAX_JOB_BYTES;
- its GPU work (job_cost): at most INVERSION_MAX_JOB_COST;
- its run time, estimated as its cost over the fastest cost/s a live worker of its model
  measured (THROUGHPUT_KEY): times INVERSION_RUN_TIME_MARGIN, at most
  INVERSION_JOB_TIMEOUT_S (422 `run_time_exceeded`). The rate is measured on whole batches
  (jobs sharing each model call), so the estimate is the job's full cost at the pool's best
  pace. Before any worker of the model has measured, there is no estimate and this check
  is skipped.

The per-key budgets these figures count against are service/limits.py's.
"""

from __future__ import annotations

import math

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


DRIVERS = (
    "num_inference_steps, guidance_scale other than 1 (twice the calls), refine_iterations, "
    "method null_text (null_text_inner_steps) or edict, verify and resolution"
)
"""The parameters a job's cost and run time grow with, for a refusal to name."""


def estimate_gpu_ms(
    params: InversionParams,
    settings: GatewaySettings,
    size: tuple[int, int],
    cost: int,
    cost_rate: float | None,
) -> int:
    """The job's estimated run time in milliseconds at `cost_rate` (cost per second; 0
    without one), or 422 `run_time_exceeded` when, with the margin, it passes the timeout."""
    if cost_rate is None:
        return 0
    seconds = cost / cost_rate
    if seconds * settings.run_time_margin > settings.job_timeout_s:
        raise ProblemError(
            422,
            ErrorCode.RUN_TIME_EXCEEDED,
            f"the job would run about {seconds:.1f} s ({unet_calls(params)} UNet calls at "
            f"{size[0]}x{size[1]}, cost {cost}, at the {cost_rate:.6g} cost/s the fastest "
            f"worker of model {params.model!r} measured); with INVERSION_RUN_TIME_MARGIN "
            f"{settings.run_time_margin:g} that is over the job timeout of "
            f"{settings.job_timeout_s} s (INVERSION_JOB_TIMEOUT_S), so it could not finish: "
            f"the run time grows with {DRIVERS}",
            field="num_inference_steps",
        )
    return math.ceil(seconds * 1000)


def size_job(
    params: InversionParams,
    settings: GatewaySettings,
    model: ModelInfo | None,
    rgb: np.ndarray,
    cost_rate: float | None = None,
) -> JobSize:
    """The job's GPU cost, stored bytes (`rgb`: the input as it will be stored) and
    estimated run time at `cost_rate`, or 422 when one passes its per-job limit."""
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
            f"(INVERSION_MAX_JOB_COST): the cost grows with {DRIVERS}",
        )
    gpu_ms = estimate_gpu_ms(params, settings, size, cost, cost_rate)
    return JobSize(cost=cost, bytes=stored.total, gpu_ms=gpu_ms)
