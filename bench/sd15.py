"""A Stable Diffusion 1.5-shaped model with random weights, as a diffusers folder.

Same shapes as SD 1.5 (UNet 320/640/1280/1280, cross-attention 768, VAE 128/256/512/512,
CLIP text 768 x 12 layers, vocab 49408), so timings on a GPU match the real model's
without a download. Loaded back through `worker.models.load_model(folder)`.
"""

from __future__ import annotations

from pathlib import Path

from worker.tiny_model import ModelShape, write_random_model

SEED = 0
"""Seed of the weights (the text encoder's; the VAE's and the UNet's follow it)."""

SD15_SHAPE = ModelShape(
    text_hidden_size=768,
    text_intermediate_size=3072,
    text_layers=12,
    text_heads=12,
    vocab_size=49408,
    vae_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    vae_norm_groups=32,
    vae_sample_size=512,
    unet_sample_size=64,
    unet_channels=(320, 640, 1280, 1280),
    unet_layers_per_block=2,
    unet_down_blocks=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    unet_up_blocks=(
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    unet_attention_head_dim=8,
    unet_norm_groups=32,
)
"""Stable Diffusion 1.5's component sizes."""


def make_sd15_model(directory: str | Path) -> Path:
    """Write the SD 1.5-shaped random model into `directory`; returns it."""
    return write_random_model(directory, SD15_SHAPE, SEED)
