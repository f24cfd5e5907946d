"""Verification of an inversion by sampling it back.

With `verify`, each result is sampled back (DDIMScheduler, same prompt and guidance, the
null embeddings for null_text) and decoded: the relative latent error, the PSNR against the
input and a PNG of the reconstruction are reported.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from worker.engine import (
    CancelCheck,
    InversionRequest,
    InversionResult,
    ProgressCallback,
    encode_prompts,
    image_array,
    state_dtype,
    still_running,
    take,
)
from worker.models import LoadedModel


def sampling_scheduler(config: dict[str, Any], timesteps: list[int]) -> Any:
    """diffusers' DDIMScheduler from the job's config, checked against the inversion's steps."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(len(timesteps))
    if [int(t) for t in scheduler.timesteps] != timesteps[::-1]:
        raise ValueError(
            "the sampling scheduler's timesteps are not the inversion's reversed; "
            f"{[int(t) for t in scheduler.timesteps]} vs {timesteps[::-1]}"
        )
    return scheduler


def decode_latents(model: LoadedModel, latents: torch.Tensor) -> np.ndarray:
    """Latents (B, C, h, w) -> images (B, H, W, 3) uint8: x = D(z / scaling_factor + shift)."""
    pixels = model.vae.decode(
        (latents / model.scaling_factor + model.shift_factor).to(model.dtype)
    ).sample
    images = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


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
    the step's optimised one. Rows share the UNet calls; each row is decoded alone. A row
    stopped by a cancel check (before each step and each decode, and after the last)
    becomes None in `results`.
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
    prompts = [requests[i].params.prompt for i in live]
    negatives = [requests[i].params.negative_prompt for i in live] if guided else []
    text = encode_prompts(model, negatives + prompts)[0]
    # Per row: the conditional text, the guidance scale, and the unconditional text (or for
    # null_text the per-step null embeddings, steps along dim 1).
    rows: list[torch.Tensor] = [
        text[len(negatives) :],
        torch.tensor(
            [requests[i].params.guidance_scale for i in live], dtype=dtype, device=model.device
        ).view(-1, 1, 1, 1),
    ]
    if params.method == "null_text":
        nulls = [results[i].null_embeddings for i in live]  # type: ignore[union-attr]
        rows.append(torch.stack(nulls).to(model.device, model.dtype))  # type: ignore[arg-type]
    elif guided:
        rows.append(text[: len(negatives)])
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
        cond, scales = rows[0], rows[1]
        if guided:
            step_uncond = rows[2][:, j] if params.method == "null_text" else rows[2]
            model_input = z.to(model.dtype)
            eps_u, eps_c = (
                model.unet(
                    torch.cat([model_input, model_input]),
                    t,
                    encoder_hidden_states=torch.cat([step_uncond, cond]),
                )
                .sample.to(dtype)
                .chunk(2)
            )
            eps = eps_u + scales * (eps_c - eps_u)
        else:
            eps = model.unet(z.to(model.dtype), t, encoder_hidden_states=cond).sample.to(dtype)
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
    size = (first.metadata.width, first.metadata.height)
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
