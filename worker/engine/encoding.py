"""Between pixels and prompts and the latent space: the image normalised for the VAE, the
clean latent z_0 and back, the text embeddings, and the dtype the latent state is kept in."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ddim_inversion import imaging
from ddim_inversion.params import InversionParams
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
    distribution = model.vae.encode(pixels.to(model.dtype) / 127.5 - 1.0).latent_dist
    latent = distribution.mean.to(state_dtype(model))
    if params.encode_mode == "sample":
        generator = torch.Generator(device="cpu").manual_seed(int(params.seed or 0))
        noise = torch.randn(latent.shape, generator=generator, dtype=latent.dtype)
        latent = latent + distribution.std.to(latent.dtype) * noise.to(model.device)
    return (latent - model.shift_factor) * model.scaling_factor


def decode_latents(model: LoadedModel, latents: torch.Tensor) -> np.ndarray:
    """Latents (B, C, h, w) -> images (B, H, W, 3) uint8: x = D(z / scaling_factor + shift)."""
    pixels = model.vae.decode(
        (latents / model.scaling_factor + model.shift_factor).to(model.dtype)
    ).sample
    images = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def encode_prompts(
    model: LoadedModel, prompts: list[str]
) -> tuple[torch.Tensor, list[int], list[bool]]:
    """Text embeddings (B, 77, hidden), with each prompt's token count and truncation."""
    tokenizer = model.tokenizer
    max_length = model.tokenizer_max_length
    full_lengths = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(model.device)
    embeddings = model.text_encoder(ids)[0]
    token_counts = [min(n, max_length) for n in full_lengths]
    return embeddings, token_counts, [n > max_length for n in full_lengths]
