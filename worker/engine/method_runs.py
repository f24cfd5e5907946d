"""The inversion methods beyond plain DDIM and null-text, run on a batch of compatible
requests: EDICT (`method="edict"`), edit-friendly DDPM (`method="ddpm"`), DPM-Solver++
inversion (`inverse_scheduler="dpmsolver"`) and negative-prompt inversion
(`method="negative_prompt"`).

The steps of each method are `worker.methods`' functions, written from their papers'
equations; this module feeds them the engine's way:

1. images encoded one per VAE call (a cancel check before each), prompts encoded;
2. the model as `predict_noise(z, t, step)`: `guidance.predict_noise` with the rows'
   conditioning, which is passed on as it comes from the encoder and narrowed by
   `rows.take` only;
3. between steps: progress, then a cancel check; a stopped row leaves every tensor;
4. results on the CPU at the job's dtype, with the timesteps and metadata of a DDIM result
   plus what the method adds (`latents_pair`; `noise_maps` and `noisy_latents`;
   `null_embeddings`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from worker.engine.ddim import encode_images, encode_text, invert_batch
from worker.engine.encoding import encode_request_prompts, image_array
from worker.engine.guidance import predict_noise
from worker.engine.metadata import result_metadata
from worker.engine.rows import still_running, take
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
from worker.methods.ddpm import ddpm_invert
from worker.methods.dpmsolver import dpmsolver_invert
from worker.methods.edict import edict_invert
from worker.methods.negative_prompt import negative_prompt_embeddings
from worker.models import LoadedModel

METHODS = ("edict", "ddpm", "negative_prompt")
"""The methods this module runs; with them, any method under inverse_scheduler dpmsolver."""


def runs_here(request: InversionRequest) -> bool:
    """Whether `method_batch` (not plain DDIM or null-text) runs this request."""
    params = request.params
    return params.method in METHODS or params.inverse_scheduler == "dpmsolver"


class Rows:
    """The rows still running across a method's steps: their request indices, in row
    order, and their conditioning (`predict_noise`'s text arguments), narrowed together.

    `predict` is the model as `worker.methods` take it; `between` is their `BetweenSteps`:
    progress after each step, and before every step but the first a cancel check (the
    first step's comes after the last VAE call, see `start`)."""

    def __init__(
        self,
        model: LoadedModel,
        active: list[int],
        text: list[Any],
        steps: int,
        progress: ProgressCallback | None,
        check_canceled: CancelCheck | None,
        per_step: torch.Tensor | None = None,
        per_step_pooled: torch.Tensor | None = None,
    ) -> None:
        self.model, self.active, self.text, self.steps = model, active, text, steps
        self.progress, self.check_canceled = progress, check_canceled
        self.per_step = per_step
        """Optional (B, steps, ...) unconditional embeddings, one per sampling step: the
        null embeddings a sampler uses in place of text[1]'s."""
        self.per_step_pooled = per_step_pooled
        """SDXL: the pooled ones beside them (B, steps, pooled); text[1]'s time ids stay."""

    def predict(self, z: torch.Tensor, t: int, step_index: int) -> torch.Tensor:
        text = list(self.text)
        if self.per_step is not None and len(text) == 3:
            device, dtype = self.model.device, self.model.dtype
            pooled = self.per_step_pooled
            text[1] = text[1].with_embeds(
                self.per_step[:, step_index].to(device, dtype),
                None if pooled is None else pooled[:, step_index].to(device, dtype),
            )
        return predict_noise(self.model, z, t, *text)

    def drop(self) -> list[int] | None:
        """A cancel check: the row positions that go on (None: all), narrowed here."""
        keep = still_running(self.check_canceled, self.active)
        if keep is not None:
            self.active = [self.active[row] for row in keep]
            self.text = take(self.text, keep)
            if self.per_step is not None:
                (self.per_step,) = take([self.per_step], keep)
            if self.per_step_pooled is not None:
                (self.per_step_pooled,) = take([self.per_step_pooled], keep)
        return keep

    def between(self, done: int) -> list[int] | None:
        if self.progress is not None:
            self.progress(done, self.steps)
        return self.drop() if done < self.steps else None


@dataclass
class _Encoded:
    """A batch's clean latents, the rows that reached the loop, and their prompts."""

    clean: dict[int, torch.Tensor]
    z: torch.Tensor
    rows: Rows
    prompts: Any
    """ddim's per-request token counts and truncation."""


def _encode(
    model: LoadedModel,
    requests: Sequence[InversionRequest],
    progress: ProgressCallback | None,
    check_canceled: CancelCheck | None,
) -> _Encoded | None:
    """Steps 1-2: images and prompts encoded, the first step's cancel check; None when no
    row is left."""
    first = requests[0].params
    arrays = [image_array(r, resolution_of(first, model)) for r in requests]
    active, clean = encode_images(model, requests, arrays, check_canceled)
    if not active:
        return None
    dtype = clean[active[0]].dtype
    text, prompts = encode_text(model, requests, dtype)
    rows = Rows(
        model,
        active,
        take(text, active),
        first.num_inference_steps,
        progress,
        check_canceled,
    )
    rows.drop()
    if not rows.active:
        return None
    z = torch.cat([clean[index] for index in rows.active])
    return _Encoded(clean, z, rows, prompts)


@torch.inference_mode()
def method_batch(
    model: LoadedModel,
    requests: Sequence[InversionRequest],
    *,
    progress: ProgressCallback | None = None,
    check_canceled: CancelCheck | None = None,
) -> list[InversionResult | None]:
    """Invert compatible requests (equal `batch_key`) with their method; a row stopped by a
    cancel check gives None, the others are untouched by it."""
    if not requests:
        return []
    first = requests[0].params
    key = batch_key(first, model)
    if any(batch_key(r.params, model) != key for r in requests[1:]):
        raise ValueError("method_batch needs compatible requests; use invert() to group them")
    if first.method == "negative_prompt":
        return _negative_prompt(model, requests, progress, check_canceled)
    started = time.perf_counter()
    encoded = _encode(model, requests, progress, check_canceled)
    if encoded is None:
        return [None] * len(requests)
    loop_started = time.perf_counter()
    rows = encoded.rows
    start_rows = list(rows.active)
    config = scheduler_config_for(first, model)
    steps = first.num_inference_steps
    trajectory = any(r.params.return_trajectory for r in requests)
    extra: dict[str, torch.Tensor] = {}
    update: dict[str, Any] = {"method": first.method, "inverse_scheduler": first.inverse_scheduler}
    # 3. The method's loop, lowest t first.
    if first.method == "edict":
        mixing = [requests[i].params.mixing for i in start_rows]
        edict = edict_invert(
            rows.predict,
            encoded.z,
            config,
            steps,
            mixing=mixing,
            between_steps=rows.between,
            keep_trajectory=trajectory,
        )
        latents, path, timesteps, kept = (
            edict.latents,
            edict.trajectory,
            edict.timesteps,
            edict.rows,
        )
        extra["latents_pair"] = edict.latents_pair
    elif first.method == "ddpm":
        seeds = [_ddpm_seed(requests[i]) for i in start_rows]
        ddpm = ddpm_invert(
            rows.predict,
            encoded.z,
            config,
            steps,
            seeds=seeds,
            eta=first.ddpm_eta,
            between_steps=rows.between,
        )
        latents, path, timesteps, kept = ddpm.latents, ddpm.noisy_latents, ddpm.timesteps, ddpm.rows
        extra["noise_maps"], extra["noisy_latents"] = ddpm.noise_maps, ddpm.noisy_latents
        update["eta"] = first.ddpm_eta
    else:  # method ddim, inverse_scheduler dpmsolver
        dpm = dpmsolver_invert(
            rows.predict,
            encoded.z,
            config,
            steps,
            between_steps=rows.between,
            keep_trajectory=trajectory,
        )
        latents, path, timesteps, kept = dpm.latents, dpm.trajectory, dpm.timesteps, dpm.rows
    finished = [start_rows[row] for row in kept]
    done = time.perf_counter()
    timings = {"encode_s": loop_started - started, "loop_s": done - loop_started}
    # 4. Results: per row, on the CPU at its dtype.
    results: list[InversionResult | None] = [None] * len(requests)
    for row, index in enumerate(finished):
        params = requests[index].params
        dtype = result_dtype(params, model)
        # Copies: a row's tensors are views of the batch's (ddpm's latents and trajectory
        # of its noisy latents), and a safetensors file holds no shared memory.
        tensors = {name: value[row].to("cpu", dtype, copy=True) for name, value in extra.items()}
        if "latents_pair" in tensors:
            tensors["latents_pair"] = tensors["latents_pair"].unsqueeze(0)
        for name in ("noise_maps", "noisy_latents"):
            if name in tensors:  # (steps [+ 1], 1, C, h, w): as a trajectory is laid out
                tensors[name] = tensors[name].unsqueeze(1)
        per_row = dict(update)
        if params.method == "edict":
            per_row["edict_mixing"] = params.mixing
        if params.method == "ddpm":
            per_row["seed"] = _ddpm_seed(requests[index])
        result = _result(
            model,
            requests[index],
            latents[row].unsqueeze(0),
            path[row].unsqueeze(1) if path is not None and params.return_trajectory else None,
            timesteps,
            config,
            (encoded.prompts.token_counts[index], encoded.prompts.truncated[index]),
            encoded.clean[index],
            **per_row,
        )
        result.latents_pair = tensors.get("latents_pair")
        result.noise_maps = tensors.get("noise_maps")
        result.noisy_latents = tensors.get("noisy_latents")
        result.timings = {
            **timings,
            "total_s": time.perf_counter() - started,
            "batch_size": float(len(requests)),
        }
        results[index] = result
    return results


def _ddpm_seed(request: InversionRequest) -> int:
    """ddpm's noise seed: the request's, 0 when absent (as the contract says)."""
    return int(request.params.seed or 0)


def _result(
    model: LoadedModel,
    request: InversionRequest,
    latents: torch.Tensor,
    path: torch.Tensor | None,
    timesteps: list[int],
    config: dict[str, Any],
    prompt: tuple[int, bool],
    clean: torch.Tensor,
    **method_fields: Any,
) -> InversionResult:
    """One row's result at its dtype, with the metadata every result carries and what its
    method adds (`method_fields`)."""
    params = request.params
    dtype = result_dtype(params, model)
    latents = latents.to("cpu", dtype, copy=True)
    path = path.to("cpu", dtype, copy=True) if path is not None else None
    metadata = result_metadata(
        model,
        params,
        latents=latents,
        trajectory=path,
        timesteps=timesteps,
        config=config,
        prompt=prompt,
        **method_fields,
    )
    return InversionResult(
        latents=latents,
        timesteps=torch.tensor(timesteps, dtype=torch.int64),
        metadata=metadata,
        trajectory=path,
        clean=clean.cpu(),
    )


def _negative_prompt(
    model: LoadedModel,
    requests: Sequence[InversionRequest],
    progress: ProgressCallback | None,
    check_canceled: CancelCheck | None,
) -> list[InversionResult | None]:
    """Negative-prompt inversion: the inversion at guidance 1 under the prompt (DDIM, refined
    where asked, or DPM-Solver++), then the prompt's embedding as every step's null
    embedding (`worker.methods.negative_prompt`)."""
    plain = [
        InversionRequest(
            r.image,
            r.params.model_copy(update={"method": "ddim", "guidance_scale": 1.0, "verify": False}),
        )
        for r in requests
    ]
    run = method_batch if plain[0].params.inverse_scheduler == "dpmsolver" else invert_batch
    results = run(model, plain, progress=progress, check_canceled=check_canceled)
    live = [i for i, result in enumerate(results) if result is not None]
    if not live:
        return results
    steps = requests[0].params.num_inference_steps
    # The source prompt's embedding is what null_embeddings store (steps, tokens, hidden);
    # for SDXL its pooled embedding too (steps, pooled).
    size = resolution_of(requests[0].params, model)
    source = encode_request_prompts(model, [requests[i] for i in live], size, guided=False)[0]
    nulls = negative_prompt_embeddings(source.embeds, steps)
    pooled = None
    if source.pooled is not None:
        pooled = source.pooled.unsqueeze(1).expand(-1, steps, -1).contiguous()
    for row, index in enumerate(live):
        result = results[index]
        assert result is not None
        params = requests[index].params
        result.null_embeddings = nulls[row].to("cpu", result_dtype(params, model))
        if pooled is not None:
            result.null_pooled_embeddings = pooled[row].to("cpu", result_dtype(params, model))
        result.metadata = result.metadata.model_copy(
            update={"method": "negative_prompt", "guidance_scale": params.guidance_scale}
        )
    return results
