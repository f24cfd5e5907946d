"""What goes into the engine and what comes out, and what a request's parameters decide:
its resolution, its scheduler config, which requests share UNet calls, how far progress
counts, and the dtype of its result."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddim_inversion.contract import ResultMetadata
from ddim_inversion.errors import InvalidParameter
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
    """null_text, negative_prompt: (steps, 77, hidden), index 0 the first sampling step
    (highest t)."""
    null_pooled_embeddings: torch.Tensor | None = None
    """null_text on SDXL: the pooled embeddings (steps, pooled), in the same order."""
    latents_pair: torch.Tensor | None = None
    """edict: y_T (1, C, h, w), the partner of `latents` that EDICT sampling needs."""
    noise_maps: torch.Tensor | None = None
    """ddpm: (steps, 1, C, h, w), index j the noise the j-th sampling step (highest t first)
    adds: `DDIMScheduler.step(..., eta=eta, variance_noise=noise_maps[j])`."""
    noisy_latents: torch.Tensor | None = None
    """ddpm: (steps + 1, 1, C, h, w), index 0 the clean latent, index i the latent drawn at
    the i-th timestep (ascending), laid out as a trajectory."""
    reconstruction_png: bytes | None = None
    """verify: the decoded reconstruction, PNG at the job's resolution."""
    clean: torch.Tensor | None = field(default=None, repr=False)
    """The encoded clean latent z_0 (1, C, h, w); engine-internal, not written to files."""

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"latents": self.latents.contiguous(), "timesteps": self.timesteps.contiguous()}
        if self.trajectory is not None:
            out["trajectory"] = self.trajectory.contiguous()
        extra = {
            "null_embeddings": self.null_embeddings,
            "null_pooled_embeddings": self.null_pooled_embeddings,
            "latents_pair": self.latents_pair,
            "noise_maps": self.noise_maps,
            "noisy_latents": self.noisy_latents,
        }
        out.update({name: t.contiguous() for name, t in extra.items() if t is not None})
        return out

    def non_finite(self) -> list[str]:
        """The names of the result's tensors holding a NaN or an infinity: a schedule or a
        model that overflowed (float16 tops out at 65504); such a result is no inversion."""
        return [
            name
            for name, tensor in self.tensors().items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
        ]

    def to_safetensors(self) -> bytes:
        from safetensors.torch import save

        return save(self.tensors(), metadata=self.metadata.to_header())

    def to_npy(self) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, self.latents.numpy(), allow_pickle=False)
        return buffer.getvalue()


def load_result(data: bytes) -> tuple[dict[str, torch.Tensor], ResultMetadata]:
    """Read a safetensors result back: its tensors and its metadata."""
    from safetensors.torch import load

    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    return load(data), ResultMetadata.from_header(header.get("__metadata__", {}))


def result_dtype(params: InversionParams, model: LoadedModel) -> torch.dtype:
    """The dtype of a result's tensors: float16 or float32 as asked, float32 meaning float64
    for a float64 model (exactness work keeps every bit it computed)."""
    if model.dtype == torch.float64 and params.result_dtype == "float32":
        return torch.float64
    return torch.float16 if params.result_dtype == "float16" else torch.float32


def resolution_of(params: InversionParams, model: LoadedModel) -> tuple[int, int]:
    return params.resolution or model.native_resolution


def scheduler_config_for(params: InversionParams, model: LoadedModel) -> dict[str, Any]:
    """The full scheduler config the request runs with (the model's, then its overrides)."""
    return resolve_scheduler_config(
        model.scheduler_config,
        dict(params.scheduler),
        params.num_inference_steps,
        params.inverse_scheduler,
        params.method,
        params.verify,
    )


def batch_key(params: InversionParams, model: LoadedModel) -> str:
    """Requests with equal keys can share UNet calls: same size, steps, schedule, guidance
    mode and method settings. What a method takes per row (edict's mixing, ddpm's seed, the
    prompts and guidance scales, SDXL's second prompts and size conditioning) stays out of
    the key: a row's result does not depend on its batch-mates'. SDXL-only parameters given
    to a model of another family are refused (InvalidParameter)."""
    given = params.sdxl_parameters
    if given and model.family != "sdxl":
        raise InvalidParameter(
            given[0],
            f"{', '.join(given)} apply to SDXL models only; model {model.name!r} is of "
            f"family {model.family!r}",
        )
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
            params.inverse_scheduler,
            params.verify,
            *([params.ddpm_eta] if params.method == "ddpm" else []),
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
    """The units `progress` counts up to: the inversion's steps (an EDICT step, with its two
    UNet calls, is one unit), then for null_text each step's inner iterations, then for
    verify the sampling steps back."""
    steps = params.num_inference_steps
    total = steps
    if params.method == "null_text":
        total += steps * params.null_text_inner_steps
    if params.verify:
        total += steps
    return total
