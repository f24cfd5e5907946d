"""Between pixels and prompts and the latent space: the image normalised for the VAE, the
clean latent z_0 and back, the text embeddings, and the dtype the latent state is kept in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddim_inversion import imaging
from ddim_inversion.params import InversionParams
from worker.engine.conditioning import TextConditioning
from worker.engine.types import InversionRequest
from worker.models import LoadedModel


def state_dtype(model: LoadedModel) -> torch.dtype:
    """The latent state is float32 (float64 if the model is): fp16 only inside the UNet."""
    return torch.float64 if model.dtype == torch.float64 else torch.float32


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


def encode_image(model: LoadedModel, array: np.ndarray, params: InversionParams) -> torch.Tensor:
    """One clean latent z_0 = (E(x) - shift) * scaling_factor (1, C, h, w).

    One image per VAE call: a VAE encode is already a large GPU workload at 512x512, a row's
    latent then cannot depend on its batch-mates (batched == solo, bit for bit), and a
    canceled row is dropped between two calls.
    """
    pixels = torch.from_numpy(array.copy()).to(model.device).permute(2, 0, 1).unsqueeze(0)
    distribution = model.vae.encode(pixels.to(model.vae_compute_dtype) / 127.5 - 1.0).latent_dist
    latent = distribution.mean.to(state_dtype(model))
    if params.encode_mode == "sample":
        generator = torch.Generator(device="cpu").manual_seed(int(params.seed or 0))
        noise = torch.randn(latent.shape, generator=generator, dtype=latent.dtype)
        latent = latent + distribution.std.to(latent.dtype) * noise.to(model.device)
    return (latent - model.shift_factor) * model.scaling_factor


def decode_latents(model: LoadedModel, latents: torch.Tensor) -> np.ndarray:
    """Latents (B, C, h, w) -> images (B, H, W, 3) uint8: x = D(z / scaling_factor + shift)."""
    pixels = model.vae.decode(
        (latents / model.scaling_factor + model.shift_factor).to(model.vae_compute_dtype)
    ).sample
    images = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def encode_prompts(
    model: LoadedModel,
    prompts: list[str],
    prompts_2: list[str] | None = None,
    time_ids: torch.Tensor | None = None,
) -> tuple[TextConditioning, list[int], list[bool]]:
    """The text conditioning of `prompts` (one row each), with each prompt's token count and
    truncation (by the first tokenizer).

    SD 1.x/2.x: the text encoder's last hidden states (B, 77, hidden). SDXL, as diffusers'
    StableDiffusionXLPipeline.encode_prompt: each encoder's penultimate hidden states,
    concatenated (B, 77, hidden_1 + hidden_2); the pooled (projected) embedding of the
    second; `prompts_2` for the second encoder (default: `prompts`); `time_ids` (B, 6), by
    default those of the model's native size (`added_time_ids`).
    """
    tokenizer = model.tokenizer
    max_length = model.tokenizer_max_length
    full_lengths = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
    token_counts = [min(n, max_length) for n in full_lengths]
    truncated = [n > max_length for n in full_lengths]
    if model.text_encoder_2 is None:
        embeddings = model.text_encoder(_token_ids(model, tokenizer, prompts))[0]
        return TextConditioning(embeddings), token_counts, truncated
    hidden = model.text_encoder(
        _token_ids(model, tokenizer, prompts), output_hidden_states=True
    ).hidden_states[-2]
    second = model.text_encoder_2(
        _token_ids(model, model.tokenizer_2, prompts if prompts_2 is None else prompts_2),
        output_hidden_states=True,
    )
    if time_ids is None:
        width, height = model.native_resolution
        time_ids = added_time_ids([((height, width), (0, 0), (height, width))] * len(prompts))
    conditioning = TextConditioning(
        torch.cat([hidden, second.hidden_states[-2]], dim=-1),
        pooled=second[0],
        time_ids=time_ids.to(model.device, hidden.dtype),
    )
    return conditioning, token_counts, truncated


def _token_ids(model: LoadedModel, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(model.device)


SizeTriple = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
"""(original_size, crops_coords_top_left, target_size), each (height, width) / (top, left)."""


def added_time_ids(rows: list[SizeTriple]) -> torch.Tensor:
    """SDXL's added time ids (B, 6): original_size + crops_coords_top_left + target_size."""
    return torch.tensor([[*a, *b, *c] for a, b, c in rows], dtype=torch.float32)


def size_conditioning(params: InversionParams, size: tuple[int, int]) -> SizeTriple:
    """A request's SDXL size conditioning, the SDXL pipeline's defaults from the job's
    resolution `size` (width, height): original and target size (height, width), crop
    (0, 0)."""
    width, height = size
    return (
        params.original_size or (height, width),
        params.crops_coords_top_left or (0, 0),
        params.target_size or (height, width),
    )


def sdxl_conditioning(params: InversionParams, size: tuple[int, int]) -> dict[str, Any]:
    """What an SDXL result's metadata records beside the prompts: the SDXL pipeline's
    arguments that reproduce the conditioning, defaults filled in."""
    original, crop, target = size_conditioning(params, size)
    return {
        "prompt_2": _or(params.prompt_2, params.prompt),
        "negative_prompt_2": _or(params.negative_prompt_2, params.negative_prompt),
        "original_size": list(original),
        "crops_coords_top_left": list(crop),
        "target_size": list(target),
    }


def encode_request_prompts(
    model: LoadedModel,
    requests: Sequence[InversionRequest],
    size: tuple[int, int],
    *,
    guided: bool,
) -> tuple[TextConditioning, TextConditioning | None, list[int], list[bool]]:
    """The requests' conditioning, one row each, and under guidance their negative prompts'
    (encoded in the same batch), with the prompts' token counts and truncation. For SDXL:
    the second prompts (default: the first ones) and the size conditioning at `size`
    (width, height), the negative rows with the same time ids, as the SDXL pipeline does."""
    params = [r.params for r in requests]
    negatives = params if guided else []
    prompts = [p.negative_prompt for p in negatives] + [p.prompt for p in params]
    prompts_2 = [_or(p.negative_prompt_2, p.negative_prompt) for p in negatives] + [
        _or(p.prompt_2, p.prompt) for p in params
    ]
    time_ids = added_time_ids([size_conditioning(p, size) for p in [*negatives, *params]])
    text, token_counts, truncated = encode_prompts(model, prompts, prompts_2, time_ids)
    n = len(negatives)
    uncond = text[:n] if guided else None
    return text[n:], uncond, token_counts[n:], truncated[n:]


def _or(second: str | None, first: str) -> str:
    """A second prompt, or the first where none is given (the SDXL pipeline's default)."""
    return first if second is None else second
