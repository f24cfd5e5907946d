"""Plain DDIM inversion of a batch of compatible requests, with optional exact refinement.

DDIM inversion runs the deterministic DDIM sampler backwards. With alpha-bar a_t the
cumulative product of (1 - beta) and eps = unet(z_t, t_next, text), one step is

    (1)  x0     = (z_t - sqrt(1 - a_t) * eps) / sqrt(a_t)        predicted clean latent
    (2)  z_next = sqrt(a_next) * x0 + sqrt(1 - a_next) * eps     re-noised one step further

and diffusers' `DDIMInverseScheduler.step` computes exactly that (with its prediction
types and clipping). The noise is predicted at z_t but labelled with t_next: the same
convention as the diffusers pipelines and the null-text inversion reference code.

That step is only approximately the inverse of DDIM sampling: the sampler going from
z_next back to z_t evaluates eps = unet(z_next, t_next), not unet(z_t, t_next). With
`refine_iterations` > 0 each step is made exact by solving for the fixed point (AIDI, Pan et
al. 2023; refine.py): with the step's a_t, a_next and z_t held fixed,

    (3)  z_next = sqrt(a_next) * x0(z_t, e) + sqrt(1 - a_next) * e,   e = unet(z_next, t_next)

until the residual of (3) relative to z_next is below refine_tolerance. At the fixed
point, diffusers' `DDIMScheduler.step(unet(z_next, t_next), t_next, z_next)` (same config,
eta 0) gives z_t back exactly: the sampler's step from t_next goes to t_next - T/steps, the
inverse step's source, with the same alphas and the same eps. Exact without clipping or
thresholding; a v_prediction (or sample) model's output at z_next is converted to the eps
it implies at z_next (z = sqrt(a) x0 + sqrt(1 - a) eps) before equation (3).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from worker.engine.encoding import (
    encode_image,
    encode_request_prompts,
    image_array,
)
from worker.engine.guidance import predict_noise
from worker.engine.metadata import result_metadata
from worker.engine.refine import Refinement
from worker.engine.rows import Batch, still_running, take
from worker.engine.schedulers import inverse_scheduler
from worker.engine.types import (
    CancelCheck,
    InversionRequest,
    InversionResult,
    ProgressCallback,
    batch_key,
    resolution_of,
    result_dtype,
    scheduler_config_for,
)
from worker.models import LoadedModel


@torch.inference_mode()
def invert_batch(
    model: LoadedModel,
    requests: Sequence[InversionRequest],
    *,
    progress: ProgressCallback | None = None,
    check_canceled: CancelCheck | None = None,
) -> list[InversionResult | None]:
    """Invert compatible requests with one UNet call per step (two rows each under guidance).

    A row stopped by a cancel check (before each VAE call, each step and each refinement
    iteration) gives None; the other rows are untouched by it.
    """
    if not requests:
        return []
    first = requests[0].params
    key = batch_key(first, model)
    if any(batch_key(r.params, model) != key for r in requests[1:]):
        raise ValueError("invert_batch needs compatible requests; use invert() to group them")
    started = time.perf_counter()
    steps = first.num_inference_steps
    config = scheduler_config_for(first, model)

    # 1. Images: decoded, oriented, RGB, resized, scaled to [-1, 1].
    arrays = [image_array(r, resolution_of(first, model)) for r in requests]
    # 2. VAE encode: z_0 = (E(x) - shift) * scaling_factor, one image per call.
    active, clean = encode_images(model, requests, arrays, check_canceled)
    if not active:
        return [None] * len(requests)
    z = torch.cat([clean[index] for index in active])
    encoded = time.perf_counter()
    # 3. Prompts: the conditional embeddings, and under guidance the unconditional ones and
    # the scales.
    text, prompts = encode_text(model, requests, z.dtype)
    want_trajectory = any(r.params.return_trajectory for r in requests)
    batch = Batch(active, z, take(text, active), [z.clone()] if want_trajectory else [])
    # 4. Scheduler: the model's config with the job's overrides.
    scheduler, timesteps = inverse_scheduler(config, steps)
    refined = Refinement(requests, config, steps) if first.refine_iterations else None

    # 5. The loop, for ascending t. `DDIMInverseScheduler.step(eps, t, z)` computes x0 by
    # equation (1) and z_next by equation (2).
    for step_index, t in enumerate(timesteps):
        if not _drop_canceled(batch, check_canceled):
            return [None] * len(requests)
        eps = predict_noise(model, batch.z, t, *batch.text)
        z_next = scheduler.step(eps, t, batch.z).prev_sample
        # 6. Exact inversion, equation (3): z_next <- step(unet(z_next, t), t, z).
        if refined is not None:
            z_next = refined.step(model, scheduler, batch, z_next, t, check_canceled)
            if z_next is None:
                return [None] * len(requests)
        batch.z = z_next
        if batch.trajectory:
            batch.trajectory.append(z_next.clone())
        if progress is not None:
            progress(step_index + 1, steps)
    done = time.perf_counter()

    # 7. Results, on the CPU, each with its own metadata.
    timings = {"encode_s": encoded - started, "loop_s": done - encoded}
    return _results(
        model, requests, batch, clean, timesteps, config, prompts, refined, timings, started
    )


@dataclass
class _Prompts:
    """Per request: its prompt's token count and whether it was truncated."""

    token_counts: list[int]
    truncated: list[bool]


def encode_images(
    model: LoadedModel,
    requests: Sequence[InversionRequest],
    arrays: list[np.ndarray],
    check_canceled: CancelCheck | None,
) -> tuple[list[int], dict[int, torch.Tensor]]:
    """z_0 of each request still running: a cancel check before each VAE call (the first
    step's check comes after the last). Returns the request indices still running, in row
    order, and their clean latents."""
    active = list(range(len(requests)))
    clean: dict[int, torch.Tensor] = {}
    for index in range(len(requests)):
        keep = still_running(check_canceled, active)
        if keep is not None:
            active = [active[row] for row in keep]
        if index in active:
            clean[index] = encode_image(model, arrays[index], requests[index].params)
    return active, clean


def encode_text(
    model: LoadedModel, requests: Sequence[InversionRequest], dtype: torch.dtype
) -> tuple[list[Any], _Prompts]:
    """Per request: [cond] or [cond, uncond, scales], the unconditional conditioning (the
    negative prompts') encoded in the same batch as the conditional one."""
    guided = requests[0].params.uses_guidance
    size = resolution_of(requests[0].params, model)
    cond, uncond, token_counts, truncated = encode_request_prompts(
        model, requests, size, guided=guided
    )
    described = _Prompts(token_counts, truncated)
    if uncond is None:
        return [cond], described
    scales = torch.tensor(
        [r.params.guidance_scale for r in requests], device=model.device, dtype=dtype
    ).view(-1, 1, 1, 1)
    return [cond, uncond, scales], described


def _drop_canceled(batch: Batch, check_canceled: CancelCheck | None) -> bool:
    """Run a cancel check and drop the stopped rows; False when no row is left."""
    keep = still_running(check_canceled, batch.active)
    if keep is None:
        return True
    if not keep:
        return False
    batch.keep(keep)
    return True


def _results(
    model: LoadedModel,
    requests: Sequence[InversionRequest],
    batch: Batch,
    clean: dict[int, torch.Tensor],
    timesteps: list[int],
    config: dict[str, Any],
    prompts: _Prompts,
    refined: Refinement | None,
    timings: dict[str, float],
    started: float,
) -> list[InversionResult | None]:
    """Each finished row's result on the CPU with its metadata; None for the stopped ones.

    `timings` holds encode_s and loop_s; each result adds total_s (from the start of the
    batch at `started`) and the batch size.
    """
    finished = {index: batch.z[row] for row, index in enumerate(batch.active)}
    stacked = torch.stack(batch.trajectory).cpu() if batch.trajectory and finished else None
    timesteps_tensor = torch.tensor(timesteps, dtype=torch.int64)
    results: list[InversionResult | None] = []
    for index, request in enumerate(requests):
        if index not in finished:
            results.append(None)
            continue
        params = request.params
        out_dtype = result_dtype(params, model)
        latents = finished[index].unsqueeze(0).to("cpu", out_dtype)
        path = None
        if params.return_trajectory and stacked is not None:
            path = stacked[:, batch.active.index(index)].unsqueeze(1).to(out_dtype)
        metadata = result_metadata(
            model,
            params,
            latents=latents,
            trajectory=path,
            timesteps=timesteps,
            config=config,
            prompt=(prompts.token_counts[index], prompts.truncated[index]),
            refine_iterations=refined.counts[index] if refined is not None else None,
            refine_residuals=refined.residuals[index] if refined is not None else None,
            refine_unconverged_steps=refined.unconverged[index] if refined is not None else None,
        )
        results.append(
            InversionResult(
                latents=latents,
                timesteps=timesteps_tensor,
                metadata=metadata,
                trajectory=path,
                clean=clean[index].cpu(),
                timings={
                    **timings,
                    "total_s": time.perf_counter() - started,
                    "batch_size": float(len(requests)),
                },
            )
        )
    return results
