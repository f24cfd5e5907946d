"""The inversion engine: DDIM inversion of a batch of images with a loaded model.

Plain functions over tensors: no Redis, no HTTP, no global state. The local CLI, the
worker and the benchmarks all call `invert`.

DDIM inversion runs the deterministic DDIM sampler backwards. With alpha-bar a_t the
cumulative product of (1 - beta) and eps = unet(z_t, t_next, text), one step is

    (1)  x0     = (z_t - sqrt(1 - a_t) * eps) / sqrt(a_t)        predicted clean latent
    (2)  z_next = sqrt(a_next) * x0 + sqrt(1 - a_next) * eps     re-noised one step further

and diffusers' `DDIMInverseScheduler.step` computes exactly that (with its prediction
types and clipping). The noise is predicted at z_t but labelled with t_next: the same
convention as the diffusers pipelines and the null-text inversion reference code.

That step is only approximately the inverse of DDIM sampling: the sampler going from
z_next back to z_t evaluates eps = unet(z_next, t_next), not unet(z_t, t_next). With
`refine_iterations` > 0 each step is made exact by fixed-point iteration (AIDI, Pan et al.
2023): with the step's a_t, a_next and z_t held fixed,

    (3)  z_next <- sqrt(a_next) * x0(z_t, e) + sqrt(1 - a_next) * e,   e = unet(z_next, t_next)

until ||dz_next|| / ||z_next|| < refine_tolerance. At the fixed point, diffusers'
`DDIMScheduler.step(unet(z_next, t_next), t_next, z_next)` (same config, eta 0) gives z_t
back exactly: the sampler's step from t_next goes to t_next - T/steps, the inverse step's
source, with the same alphas and the same eps. Exact for `prediction_type` epsilon without
clipping or thresholding.

Null-text inversion lives in `worker/null_text.py`, verification by sampling back in
`worker/reconstruction.py`; `invert` dispatches to them.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddim_inversion import imaging
from ddim_inversion.contract import ENGINE_VERSION, ResultMetadata
from ddim_inversion.params import InversionParams
from ddim_inversion.scheduler_config import resolve_scheduler_config
from worker.models import LoadedModel

ProgressCallback = Callable[[int, int], None]
"""Called after each unit of work with (units done, units in all); see `progress_total`."""

CancelCheck = Callable[[list[int]], Sequence[int]]
"""Given the indices (into the requests) still running, returns those canceled."""


@dataclass(frozen=True)
class InversionRequest:
    """One image and its parameters; the image is an RGB uint8 (H, W, 3) array or a PIL image."""

    image: np.ndarray | Image.Image
    params: InversionParams


@dataclass
class InversionResult:
    """The latents of one request, on the CPU, with what describes them."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    metadata: ResultMetadata
    trajectory: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    null_embeddings: torch.Tensor | None = None
    """null_text: (steps, 77, hidden), index 0 the first sampling step (highest t)."""
    reconstruction_png: bytes | None = None
    """verify: the decoded reconstruction, PNG at the job's resolution."""
    clean: torch.Tensor | None = field(default=None, repr=False)
    """The encoded clean latent z_0 (1, C, h, w); engine-internal, not written to files."""

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"latents": self.latents.contiguous(), "timesteps": self.timesteps.contiguous()}
        if self.trajectory is not None:
            out["trajectory"] = self.trajectory.contiguous()
        if self.null_embeddings is not None:
            out["null_embeddings"] = self.null_embeddings.contiguous()
        return out

    def to_safetensors(self) -> bytes:
        from safetensors.torch import save

        return save(self.tensors(), metadata=self.metadata.to_header())

    def to_npy(self) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, self.latents.numpy(), allow_pickle=False)
        return buffer.getvalue()


class InversionCanceled(Exception):
    """Raised by callers that turn a canceled request (a None result) into an error."""


# -- preparing inputs -------------------------------------------------------------------


def resolution_of(params: InversionParams, model: LoadedModel) -> tuple[int, int]:
    return params.resolution or model.native_resolution


def scheduler_config_for(params: InversionParams, model: LoadedModel) -> dict[str, Any]:
    """The full scheduler config the request runs with (the model's, then its overrides)."""
    return resolve_scheduler_config(
        model.scheduler_config, dict(params.scheduler), params.num_inference_steps
    )


def batch_key(params: InversionParams, model: LoadedModel) -> str:
    """Requests with equal keys can share UNet calls: same size, steps, schedule, guidance mode."""
    width, height = resolution_of(params, model)
    config = scheduler_config_for(params, model)
    return json.dumps(
        [
            width,
            height,
            params.num_inference_steps,
            params.uses_guidance,
            config,
            params.refine_iterations,
            params.refine_tolerance,
            params.method,
            params.verify,
            *(
                [
                    params.null_text_inner_steps,
                    params.null_text_learning_rate,
                    params.null_text_early_stop,
                ]
                if params.method == "null_text"
                else []
            ),
        ],
        sort_keys=True,
    )


def progress_total(params: InversionParams) -> int:
    """The units `progress` counts up to: the inversion's steps, then for null_text each
    step's inner iterations, then for verify the sampling steps back."""
    steps = params.num_inference_steps
    total = steps
    if params.method == "null_text":
        total += steps * params.null_text_inner_steps
    if params.verify:
        total += steps
    return total


def image_array(request: InversionRequest, size: tuple[int, int]) -> np.ndarray:
    """The request's image as (H, W, 3) uint8 at `size`, normalised unless it already is."""
    image = request.image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError("image arrays must be uint8 (height, width, 3)")
        if (image.shape[1], image.shape[0]) == size:
            return image
        image = Image.fromarray(image)
    return imaging.normalize(image, size, request.params.resize_mode)


def encode_prompts(
    model: LoadedModel, prompts: list[str]
) -> tuple[torch.Tensor, list[int], list[bool]]:
    """Step 3: text embeddings (B, 77, hidden), with each prompt's token count and truncation."""
    tokenizer = model.tokenizer
    max_length = model.tokenizer_max_length
    full_lengths = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(model.device)
    embeddings = model.text_encoder(ids)[0]
    token_counts = [min(n, max_length) for n in full_lengths]
    return embeddings, token_counts, [n > max_length for n in full_lengths]


def encode_image(model: LoadedModel, array: np.ndarray, params: InversionParams) -> torch.Tensor:
    """Step 2: one clean latent z_0 = (E(x) - shift) * scaling_factor (1, C, h, w).

    One image per VAE call: a VAE encode is already a large GPU workload at 512x512, a row's
    latent then cannot depend on its batch-mates (batched == solo, bit for bit), and a
    canceled row is dropped between two calls.
    """
    pixels = torch.from_numpy(array.copy()).to(model.device).permute(2, 0, 1).unsqueeze(0)
    distribution = model.vae.encode(pixels.to(model.dtype) / 127.5 - 1.0).latent_dist
    latent = distribution.mean.to(state_dtype(model))
    if params.encode_mode == "sample":
        generator = torch.Generator(device="cpu").manual_seed(int(params.seed or 0))
        noise = torch.randn(latent.shape, generator=generator, dtype=latent.dtype)
        latent = latent + distribution.std.to(latent.dtype) * noise.to(model.device)
    return (latent - model.shift_factor) * model.scaling_factor


def state_dtype(model: LoadedModel) -> torch.dtype:
    """The latent state is float32 (float64 if the model is): fp16 only inside the UNet."""
    return torch.float64 if model.dtype == torch.float64 else torch.float32


# -- the inversion ----------------------------------------------------------------------


def still_running(check_canceled: CancelCheck | None, active: list[int]) -> list[int] | None:
    """The row positions in `active` that go on after a cancel check; None if none stopped.

    Every phase calls it between its units of work (a step, a refine iteration, a null-text
    iteration, a VAE call), so a cancel or a deadline stops a row within one unit.
    """
    if check_canceled is None:
        return None
    canceled = set(check_canceled(list(active)))
    if not canceled & set(active):
        return None
    return [row for row, index in enumerate(active) if index not in canceled]


def take(tensors: list[torch.Tensor], rows: list[int]) -> list[torch.Tensor]:
    """Each tensor's rows `rows` (along dim 0), in that order."""
    index = torch.tensor(rows, dtype=torch.long)
    return [tensor.index_select(0, index.to(tensor.device)) for tensor in tensors]


def invert(
    model: LoadedModel,
    requests: Sequence[InversionRequest],
    *,
    progress: ProgressCallback | None = None,
    check_canceled: CancelCheck | None = None,
) -> list[InversionResult | None]:
    """Invert every request; compatible ones share UNet calls. A canceled request gives None."""
    results: list[InversionResult | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(batch_key(request.params, model), []).append(index)
    for indices in groups.values():

        def group_cancel(active: list[int], indices: list[int] = indices) -> Sequence[int]:
            if check_canceled is None:
                return ()
            canceled = set(check_canceled([indices[i] for i in active]))
            return [i for i in active if indices[i] in canceled]

        group = [requests[i] for i in indices]
        total = progress_total(group[0].params)
        steps = group[0].params.num_inference_steps
        report = _offset_progress(progress, 0, total)
        if group[0].params.method == "null_text":
            from worker.null_text import null_text_batch

            group_results = null_text_batch(
                model, group, progress=report, check_canceled=group_cancel, total=total
            )
        else:
            group_results = invert_batch(model, group, progress=report, check_canceled=group_cancel)
        if group[0].params.verify:
            from worker.reconstruction import verify_batch

            verify_batch(
                model,
                group,
                group_results,
                progress=_offset_progress(progress, total - steps, total),
                check_canceled=group_cancel,
            )
        for index, result in zip(indices, group_results, strict=True):
            results[index] = result
    return results


def _offset_progress(
    progress: ProgressCallback | None, offset: int, total: int
) -> ProgressCallback | None:
    """A phase's progress(done, phase total) as the whole job's progress(offset + done, total)."""
    if progress is None:
        return None
    return lambda done, _phase_total: progress(offset + done, total)


@torch.inference_mode()
def invert_batch(
    model: LoadedModel,
    requests: Sequence[InversionRequest],
    *,
    progress: ProgressCallback | None = None,
    check_canceled: CancelCheck | None = None,
) -> list[InversionResult | None]:
    """Invert compatible requests with one UNet call per step (two rows each under guidance)."""
    from diffusers import DDIMInverseScheduler

    if not requests:
        return []
    first = requests[0].params
    key = batch_key(first, model)
    if any(batch_key(r.params, model) != key for r in requests[1:]):
        raise ValueError("invert_batch needs compatible requests; use invert() to group them")
    started = time.perf_counter()
    size = resolution_of(first, model)
    steps = first.num_inference_steps
    config = scheduler_config_for(first, model)

    # 1. Images: decoded, oriented, RGB, resized, scaled to [-1, 1].
    arrays = [image_array(r, size) for r in requests]
    # 2. VAE encode: z_0, one image per call, with a cancel check before each call (the
    # first step's check comes after the last). `active`: the request indices still
    # running, in row order.
    active = list(range(len(requests)))
    clean: dict[int, torch.Tensor] = {}
    for index in range(len(requests)):
        keep = still_running(check_canceled, active)
        if keep is not None:
            active = [active[row] for row in keep]
        if index in active:
            clean[index] = encode_image(model, arrays[index], requests[index].params)
    if not active:
        return [None] * len(requests)
    z = torch.cat([clean[index] for index in active])
    encoded = time.perf_counter()
    # 3. Prompts: conditional embeddings, and unconditional ones in the same batch under guidance.
    guided = first.uses_guidance
    prompts = [r.params.prompt for r in requests]
    negatives = [r.params.negative_prompt for r in requests] if guided else []
    text, token_counts, truncated = encode_prompts(model, negatives + prompts)
    token_counts, truncated = token_counts[len(negatives) :], truncated[len(negatives) :]
    # Per row of the state: the texts (unconditional, conditional) and the guidance scales.
    rows_text: list[torch.Tensor] = list(text.chunk(2)) if guided else [text]
    if guided:
        scales = torch.tensor(
            [r.params.guidance_scale for r in requests], device=model.device, dtype=z.dtype
        ).view(-1, 1, 1, 1)
        rows_text.append(scales)
    rows_text = take(rows_text, active)

    def predict_noise(
        state: torch.Tensor, t: int, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """eps = unet(state, t, text), guided as asked; `rows` picks the active rows' texts."""
        model_input = state.to(model.dtype)
        picked = rows_text if rows is None else [x.index_select(0, rows) for x in rows_text]
        if guided:
            row_uncond, row_cond, row_scales = picked
            eps_uncond, eps_cond = (
                model.unet(
                    torch.cat([model_input, model_input]),
                    t,
                    encoder_hidden_states=torch.cat([row_uncond, row_cond]),
                )
                .sample.to(state.dtype)
                .chunk(2)
            )
            return eps_uncond + row_scales * (eps_cond - eps_uncond)
        return model.unet(model_input, t, encoder_hidden_states=picked[0]).sample.to(state.dtype)

    def relative_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """Per row, ||new - old|| / ||new||."""
        delta = (new - old).flatten(1).norm(dim=1)
        return delta / new.flatten(1).norm(dim=1).clamp_min(torch.finfo(new.dtype).tiny)

    refine_iterations = first.refine_iterations
    refine_tolerance = first.refine_tolerance
    # Per request: for each step, the refinement iterations run and the final relative change.
    refine_counts: list[list[int]] = [[] for _ in requests]
    refine_residuals: list[list[float]] = [[] for _ in requests]
    # 4. Scheduler: the model's config with the job's overrides, never the bare constructor.
    scheduler = DDIMInverseScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    # Python ints: comparing a CUDA timestep tensor inside step() would synchronise the host.
    timesteps = [int(t) for t in scheduler.timesteps]

    want_trajectory = [r.params.return_trajectory for r in requests]
    trajectory: list[torch.Tensor] = [z.clone()] if any(want_trajectory) else []
    # 5. The loop: eps = unet(z, t, text); z = step(eps, t, z).prev_sample, for ascending t.
    # A row stopped by a cancel check leaves every row tensor; the others are untouched.
    for step_index, t in enumerate(timesteps):
        keep = still_running(check_canceled, active)
        if keep is not None:
            if not keep:
                return [None] * len(requests)
            active = [active[row] for row in keep]
            z, *trajectory = take([z, *trajectory], keep)
            rows_text = take(rows_text, keep)
        z_next = scheduler.step(predict_noise(z, t), t, z).prev_sample
        # 6. Exact inversion (3): z_next <- step(unet(z_next, t), t, z). The sampler's step
        # from z_next labelled t evaluates the UNet at (z_next, t) and lands on t - T/steps,
        # this step's source: at the fixed point it gives z back. Converged rows are frozen
        # (and leave the UNet batch), so a row's result does not depend on its batch-mates.
        if refine_iterations:
            counts = [0] * len(active)
            residuals = [0.0] * len(active)
            pending = list(range(len(active)))
            for _ in range(refine_iterations):
                keep = still_running(check_canceled, active)
                if keep is not None:
                    if not keep:
                        return [None] * len(requests)
                    active = [active[row] for row in keep]
                    z, z_next, *trajectory = take([z, z_next, *trajectory], keep)
                    rows_text = take(rows_text, keep)
                    counts = [counts[row] for row in keep]
                    residuals = [residuals[row] for row in keep]
                    pending = [keep.index(row) for row in pending if row in keep]
                    if not pending:
                        break
                rows = torch.tensor(pending, device=model.device)
                source = z.index_select(0, rows)
                guess = z_next.index_select(0, rows)
                refined = scheduler.step(predict_noise(guess, t, rows), t, source).prev_sample
                change = relative_change(refined, guess).tolist()
                z_next = z_next.index_copy(0, rows, refined)
                still = []
                for row, value in zip(pending, change, strict=True):
                    counts[row] += 1
                    residuals[row] = float(value)
                    if not value < refine_tolerance:
                        still.append(row)
                pending = still
                if not pending:
                    break
            for row, index in enumerate(active):
                refine_counts[index].append(counts[row])
                refine_residuals[index].append(residuals[row])
        z = z_next
        if trajectory:
            trajectory.append(z.clone())
        if progress is not None:
            progress(step_index + 1, steps)
    finished = {index: z[row] for row, index in enumerate(active)}
    done = time.perf_counter()

    # 7. Results, on the CPU, each with its own metadata.
    results: list[InversionResult | None] = []
    timesteps_tensor = torch.tensor(timesteps, dtype=torch.int64)
    width, height = size
    stacked = torch.stack(trajectory).cpu() if trajectory and finished else None
    for index, request in enumerate(requests):
        if index not in finished:
            results.append(None)
            continue
        params = request.params
        out_dtype = torch.float16 if params.result_dtype == "float16" else torch.float32
        if model.dtype == torch.float64 and params.result_dtype == "float32":
            out_dtype = torch.float64
        latents = finished[index].unsqueeze(0).to("cpu", out_dtype)
        path = None
        if want_trajectory[index] and stacked is not None:
            path = stacked[:, active.index(index)].unsqueeze(1).to(out_dtype)
        metadata = ResultMetadata(
            model=model.name,
            width=width,
            height=height,
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            guidance_scale=params.guidance_scale,
            token_count=token_counts[index],
            truncated=truncated[index],
            encode_mode=params.encode_mode,
            seed=params.seed,
            num_inference_steps=steps,
            timesteps=timesteps,
            scheduler_config=config,
            latents_shape=list(latents.shape),
            trajectory_shape=list(path.shape) if path is not None else None,
            dtype=str(out_dtype).removeprefix("torch."),
            engine_version=ENGINE_VERSION,
            refine_iterations=refine_counts[index] if refine_iterations else None,
            refine_residuals=refine_residuals[index] if refine_iterations else None,
        )
        results.append(
            InversionResult(
                latents=latents,
                timesteps=timesteps_tensor,
                metadata=metadata,
                trajectory=path,
                clean=clean[index].cpu(),
                timings={
                    "encode_s": encoded - started,
                    "loop_s": done - encoded,
                    "total_s": time.perf_counter() - started,
                    "batch_size": float(len(requests)),
                },
            )
        )
    return results


def load_result(data: bytes) -> tuple[dict[str, torch.Tensor], ResultMetadata]:
    """Read a safetensors result back: its tensors and its metadata."""
    from safetensors.torch import load

    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    return load(data), ResultMetadata.from_header(header.get("__metadata__", {}))
