"""Verification of the methods of `method_runs` by sampling back with each one's own sampler:

- edict: EDICT sampling from the pair (`latents`, `latents_pair`) with the row's mixing;
- ddpm: DDIMScheduler at the result's eta, adding the saved `noise_maps` at each step;
- inverse_scheduler dpmsolver: the forward DPMSolverMultistepScheduler, same config;
- negative_prompt under dpmsolver: the same, guided with its `null_embeddings`
  (under DDIM, `verify.verify_batch` samples it back as it does null-text).

Same prompt and guidance as the inversion; the sampled latent is decoded and the relative
latent error, the PSNR against the input and a PNG are reported, as `verify` does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from worker.engine.ddim import encode_text
from worker.engine.encoding import decode_latents, image_array, state_dtype
from worker.engine.method_runs import Rows
from worker.engine.types import CancelCheck, InversionRequest, InversionResult, ProgressCallback
from worker.engine.verify import png_bytes, psnr
from worker.methods.ddpm import ddpm_sample
from worker.methods.dpmsolver import dpmsolver_sample
from worker.methods.edict import edict_sample
from worker.models import LoadedModel


def needs_own_sampler(request: InversionRequest) -> bool:
    """Whether a result is sampled back here rather than by DDIM sampling (`verify`)."""
    params = request.params
    return params.method in ("edict", "ddpm") or params.inverse_scheduler == "dpmsolver"


@torch.inference_mode()
def verify_method_batch(
    model: LoadedModel,
    requests: Sequence[InversionRequest],
    results: list[InversionResult | None],
    *,
    progress: ProgressCallback | None = None,
    check_canceled: CancelCheck | None = None,
) -> None:
    """Sample each result back with its method's sampler and decode it; fills in the
    reconstruction fields in place. A row stopped by a cancel check (before each step but
    the first, and before each decode) becomes None in `results`."""
    live = [i for i, result in enumerate(results) if result is not None]
    if not live:
        return
    started = time.perf_counter()
    dtype = state_dtype(model)
    device = model.device
    first = results[live[0]]
    assert first is not None
    params = requests[live[0]].params
    config = first.metadata.scheduler_config
    steps = first.metadata.num_inference_steps

    # 1. The conditioning of the inversion (and the null embeddings where it has them),
    # then the first step's cancel check.
    text, _ = encode_text(model, [requests[i] for i in live], dtype)
    nulls = pooled = None
    if params.method == "negative_prompt" and params.uses_guidance:
        nulls = torch.stack([results[i].null_embeddings for i in live])  # type: ignore[union-attr,misc]
        if first.null_pooled_embeddings is not None:  # SDXL
            pooled = torch.stack([results[i].null_pooled_embeddings for i in live])  # type: ignore[union-attr,misc]
    rows = Rows(model, list(live), text, steps, progress, check_canceled, nulls, pooled)
    live = _dropped(rows, live, results)
    if not live:
        return

    def stacked(name: str) -> torch.Tensor:
        return torch.cat([getattr(results[i], name) for i in live]).to(device, dtype)

    z = stacked("latents")
    # 2. Sampling back, highest t first.
    if params.method == "edict":
        mixing = [results[i].metadata.edict_mixing for i in live]  # type: ignore[union-attr]
        back = edict_sample(
            rows.predict,
            z,
            stacked("latents_pair"),
            config,
            steps,
            mixing=mixing,  # type: ignore[arg-type]
            between_steps=rows.between,
        )
        sampled, kept = back.latents, back.rows
    elif params.method == "ddpm":
        # (B, steps, C, h, w): each row's maps, step j at [:, j].
        maps = torch.stack([results[i].noise_maps[:, 0] for i in live])  # type: ignore[union-attr,index]
        sampled, kept = ddpm_sample(
            rows.predict,
            z,
            maps.to(device, dtype),
            config,
            steps,
            eta=first.metadata.eta or 1.0,
            between_steps=rows.between,
        )
    else:
        dpm = dpmsolver_sample(rows.predict, z, config, steps, between_steps=rows.between)
        sampled, kept = dpm.latents, dpm.rows
    for row, gone in enumerate(live):
        if row not in kept:
            results[gone] = None
    live = [live[row] for row in kept]
    # 3. Decoded one row per VAE call, with a cancel check before each and after the last.
    images: dict[int, np.ndarray] = {}
    latent_of = dict(zip(live, sampled, strict=True))
    for index in [*live, None]:
        live = _dropped(rows, live, results)
        if index is not None and index in live:
            images[index] = decode_latents(model, latent_of[index].unsqueeze(0))[0]
    seconds = time.perf_counter() - started
    size = (first.metadata.width, first.metadata.height)
    for index in live:
        result = results[index]
        assert result is not None
        update = {"reconstruction_psnr": psnr(images[index], image_array(requests[index], size))}
        if result.clean is not None:
            clean = result.clean.to(device, dtype)
            error = (latent_of[index].unsqueeze(0) - clean).norm() / clean.norm().clamp_min(1e-12)
            update["reconstruction_latent_error"] = float(error)
        result.metadata = result.metadata.model_copy(update=update)
        result.reconstruction_png = png_bytes(images[index])
        result.timings["verify_s"] = seconds
        result.timings["total_s"] = result.timings.get("total_s", 0.0) + seconds


def _dropped(rows: Rows, live: list[int], results: list[InversionResult | None]) -> list[int]:
    """A cancel check: the rows still live; the stopped ones become None in `results`."""
    if rows.drop() is None:
        return live
    for gone in set(live) - set(rows.active):
        results[gone] = None
    return list(rows.active)
