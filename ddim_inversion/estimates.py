"""What a job stores in Redis and costs on a GPU, computed from its parameters at submit."""

from __future__ import annotations

import json
from typing import NamedTuple

from ddim_inversion.contract import ModelInfo
from ddim_inversion.params import InversionParams

FALLBACK_LATENT_CHANNELS = 4
"""Latent channels assumed without a live worker (every SD 1.x/2.x VAE has 4)."""


FALLBACK_VAE_SCALE_FACTOR = 8
"""Pixels per latent pixel, per side, assumed without a live worker."""


FALLBACK_TEXT_HIDDEN_SIZE = 1024
"""Text embedding width assumed without a live worker: SD 2.x's, the widest supported."""


FALLBACK_TOKENS = 77
"""Tokens per prompt assumed without a live worker: CLIP's."""


RECORD_BYTES = 8192
"""The job hash, RQ's bookkeeping and the fixed part of the result metadata."""


METADATA_BYTES_PER_STEP = 64
"""Per step, the metadata's lists at their longest: timestep, refinement iterations and
residual, null-text loss."""


METADATA_BYTES_PER_CHAR = 12
"""A prompt character in JSON at worst: an astral code point as two `\\uXXXX` escapes."""


METADATA_COPIES = 3
"""The result metadata is stored three times: the safetensors header, the job's meta and
RQ's result entry."""


NULL_METHODS = ("null_text", "negative_prompt")
"""The methods whose result carries `null_embeddings`."""


class StoredBytes(NamedTuple):
    """The most bytes a job keeps in Redis, by what holds them."""

    input: int
    """The normalised RGB upload, until the job ends."""
    latents: int
    """`latents` and `timesteps` of the result."""
    trajectory: int
    """`trajectory`: every step's latent (return_trajectory)."""
    null_embeddings: int
    """`null_embeddings`: one unconditional embedding per step (methods null_text and
    negative_prompt)."""
    method_latents: int
    """The latents a method adds: `latents_pair` (edict); `noise_maps`, one latent per
    step, and `noisy_latents`, steps + 1 latents (ddpm)."""
    reconstruction: int
    """The reconstruction PNG (verify), at its largest: incompressible pixels."""
    records: int
    """The metadata copies, the job hash and its parameters."""

    @property
    def total(self) -> int:
        return sum(self)

    @property
    def largest_field(self) -> str:
        """The parameter that drives the largest part, for an error to name."""
        parts = {
            "resolution": self.input + self.latents,
            "return_trajectory": self.trajectory,
            "method": self.null_embeddings + self.method_latents,
            "verify": self.reconstruction,
            "prompt": self.records,
        }
        return max(parts, key=lambda name: parts[name])


def result_element_bytes(params: InversionParams, model: ModelInfo | None) -> int:
    """Bytes per value of the result's tensors: float16 when asked; else float32, or float64
    from a float64 model (the engine's rule; assumed without a live worker)."""
    if params.result_dtype == "float16":
        return 2
    return 4 if model is not None and model.dtype != "float64" else 8


def png_bytes_bound(width: int, height: int) -> int:
    """The largest RGB PNG of this size: every row (a filter byte and the pixels) stored
    uncompressed, plus deflate's block headers, the chunk headers and the fixed chunks."""
    raw = height * (1 + 3 * width)
    return raw + raw // 1000 + 1024


def stored_bytes(
    params: InversionParams,
    model: ModelInfo | None,
    input_size: tuple[int, int],
    size: tuple[int, int],
) -> StoredBytes:
    """The most a job keeps in Redis: its input (`input_size`, width x height as stored) and
    its worst-case result at `size` (the resolution the worker inverts at)."""
    channels = model.latent_channels if model else FALLBACK_LATENT_CHANNELS
    factor = model.vae_scale_factor if model else FALLBACK_VAE_SCALE_FACTOR
    hidden = (model.text_hidden_size if model else None) or FALLBACK_TEXT_HIDDEN_SIZE
    tokens = model.tokenizer_max_length if model else FALLBACK_TOKENS
    pooled = (model.text_pooled_size if model else None) or 0  # SDXL's null_pooled_embeddings
    element = result_element_bytes(params, model)
    steps = params.num_inference_steps
    latent = channels * (size[0] // factor) * (size[1] // factor) * element
    scheduler_text = len(json.dumps(params.scheduler))
    if model is not None:
        scheduler_text += len(json.dumps(model.scheduler_config))
    prompts = len(params.prompt) + len(params.negative_prompt)
    prompts += len(params.prompt_2 or "") + len(params.negative_prompt_2 or "")
    # The scheduler config is JSON inside the header's JSON: each quote escaped, twice as long.
    metadata = METADATA_BYTES_PER_STEP * steps + METADATA_BYTES_PER_CHAR * prompts
    metadata += 2 * scheduler_text
    return StoredBytes(
        input=input_size[0] * input_size[1] * 3,
        latents=latent + 8 * steps,  # timesteps: int64
        trajectory=(steps + 1) * latent if params.return_trajectory else 0,
        null_embeddings=steps * (tokens * hidden + pooled) * element
        if params.method in NULL_METHODS
        else 0,
        method_latents={"edict": latent, "ddpm": (2 * steps + 1) * latent}.get(params.method, 0),
        reconstruction=png_bytes_bound(*size) if params.verify else 0,
        records=RECORD_BYTES + METADATA_COPIES * metadata + len(params.model_dump_json()),
    )


NULL_TEXT_CALLS_PER_INNER_STEP = 3
"""A null-text inner step: one UNet forward and its backward, about two forwards."""


def unet_calls(params: InversionParams) -> int:
    """UNet image-calls of one job at most (refinement and null-text never stop early):

    - ddim (either inverse scheduler), ddpm: steps x (2 under guidance) x (1 +
      refine_iterations), refine_iterations being 0 where it does not apply;
    - negative_prompt: steps x (1 + refine_iterations) at guidance 1;
    - edict: two calls per step, each x (2 under guidance);
    - null_text: the pivot, steps x (1 + refine_iterations) at guidance 1, then per step one
      conditional call, the inner steps' forward and backward passes and the step itself;
    - verify: one more sampling pass, steps x (2 under guidance), twice for edict.
    """
    steps = params.num_inference_steps
    passes = 2 if params.uses_guidance else 1
    refined = 1 + params.refine_iterations
    per_step = 2 * passes if params.method == "edict" else passes
    if params.method == "null_text":
        inner = NULL_TEXT_CALLS_PER_INNER_STEP * params.null_text_inner_steps
        calls = steps * refined + steps * (1 + inner + 1)
    elif params.method == "negative_prompt":
        calls = steps * refined
    else:
        calls = steps * per_step * refined
    if params.verify:
        calls += steps * per_step
    return calls


def job_cost(params: InversionParams, model: ModelInfo | None, size: tuple[int, int]) -> int:
    """GPU work of a job: UNet image-calls times latent pixels at `size`. The VAE's encode
    (and verify's decode) are not counted: one each per job, bounded by the resolution."""
    factor = model.vae_scale_factor if model else FALLBACK_VAE_SCALE_FACTOR
    return unet_calls(params) * (size[0] // factor) * (size[1] // factor)
