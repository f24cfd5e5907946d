"""Verification of an inversion by sampling it back.

With `verify`, each result is sampled back (DDIMScheduler, same prompt and guidance, the
null embeddings for null_text and negative_prompt) and decoded: the relative latent error,
the PSNR against the input and a PNG of the reconstruction are reported. The methods with
their own samplers are verified by `method_verify`.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from worker.engine.encoding import (
    decode_latents,
    encode_request_prompts,
    image_array,
    state_dtype,
)
from worker.engine.guidance import predict_noise
from worker.engine.rows import still_running, take
from worker.engine.schedulers import sampling_scheduler
from worker.engine.types import CancelCheck, InversionRequest, InversionResult, ProgressCallback
from worker.models import LoadedModel


def psnr(reconstruction: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (capped where they are equal)."""
    mse = float(np.mean((reconstruction.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float(10.0 * np.log10(255.0**2 / max(mse, 1e-10)))


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@torch.inference_mode()
def verify_batch(
    model: LoadedModel,
    requests: Sequence[InversionRequest],
    results: list[InversionResult | None],
    *,
    progress: ProgressCallback | None = None,
    check_canceled: CancelCheck | None = None,
) -> None:
    """Sample each result back and decode it; fills in the reconstruction fields in place.

    DDIMScheduler from the result's scheduler config, the request's prompt embedding and
    guidance scale; the unconditional embedding is the negative prompt's, or for null_text
    and negative_prompt the step's null embedding. Rows share the UNet calls; each row is
    decoded alone. A row stopped by a cancel check (before each step and each decode, and
    after the last) becomes None in `results`.
    """
    live = [i for i, result in enumerate(results) if result is not None]
    if not live:
        return
    started = time.perf_counter()
    dtype = state_dtype(model)
    first = results[live[0]]
    assert first is not None
    timesteps = [int(t) for t in first.timesteps]
    steps = len(timesteps)
    scheduler = sampling_scheduler(first.metadata.scheduler_config, timesteps)
    params = requests[live[0]].params
    guided = params.uses_guidance
    size = (first.metadata.width, first.metadata.height)
    cond, negative = encode_request_prompts(
        model, [requests[i] for i in live], size, guided=guided
    )[:2]
    # Per row: the conditional text, the guidance scale, and the unconditional text (for
    # null_text its time ids, then the per-step null embeddings and for SDXL the pooled
    # ones, steps along dim 1).
    rows: list[Any] = [
        cond,
        torch.tensor(
            [requests[i].params.guidance_scale for i in live], dtype=dtype, device=model.device
        ).view(-1, 1, 1, 1),
    ]
    per_step = params.method in ("null_text", "negative_prompt")
    if guided:
        rows.append(negative)
    if per_step:
        for name in ("null_embeddings", "null_pooled_embeddings"):
            nulls = [getattr(results[i], name) for i in live]
            if nulls[0] is not None:
                rows.append(torch.stack(nulls).to(model.device, model.dtype))
    z = torch.cat([results[i].latents for i in live]).to(model.device, dtype)  # type: ignore[union-attr]

    def stop(check_at: list[int]) -> list[int] | None:
        """Run the cancel check; drop the stopped rows from `live` and `results`."""
        nonlocal live
        keep = still_running(check_canceled, check_at)
        if keep is None:
            return None
        for index in set(check_at) - {check_at[row] for row in keep}:
            results[index] = None
        live = [i for i in live if results[i] is not None]
        return keep

    for j, t in enumerate(scheduler.timesteps):
        keep = stop(live)
        if keep is not None:
            if not live:
                return
            z, *rows = take([z, *rows], keep)
        t = int(t)
        uncond = rows[2] if guided else None
        if guided and per_step:
            # The step's own unconditional embedding (and SDXL pooled one); the time ids stay.
            uncond = rows[2].with_embeds(*(nulls[:, j] for nulls in rows[3:]))
        eps = predict_noise(model, z, t, rows[0], uncond, rows[1])
        z = scheduler.step(eps, t, z).prev_sample
        if progress is not None:
            progress(j + 1, steps)
    sampled = dict(zip(live, z, strict=True))
    images: dict[int, np.ndarray] = {}
    for index in [*live, None]:
        stop(live)
        if index is not None and index in live:
            images[index] = decode_latents(model, sampled[index].unsqueeze(0))[0]
    seconds = time.perf_counter() - started
    for i in live:
        result = results[i]
        assert result is not None
        update: dict[str, Any] = {}
        if result.clean is not None:
            clean = result.clean.to(model.device, dtype)
            error = (sampled[i].unsqueeze(0) - clean).norm() / clean.norm().clamp_min(1e-12)
            update["reconstruction_latent_error"] = float(error)
        update["reconstruction_psnr"] = psnr(images[i], image_array(requests[i], size))
        result.metadata = result.metadata.model_copy(update=update)
        result.reconstruction_png = png_bytes(images[i])
        result.timings["verify_s"] = seconds
        result.timings["total_s"] = result.timings.get("total_s", 0.0) + seconds
