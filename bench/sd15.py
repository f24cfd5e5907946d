"""A Stable Diffusion 1.5-shaped model with random weights, as a diffusers folder.

Same shapes as SD 1.5 (UNet 320/640/1280/1280, cross-attention 768, VAE 128/256/512/512,
CLIP text 768 x 12 layers, vocab 49408), so timings on a GPU match the real model's
without a download. Loaded back through `worker.models.load_model(folder)`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from worker.models import _quiet_libraries, _tiny_tokenizer, write_pipeline_index

SEED = 0


def make_sd15_model(directory: str | Path) -> Path:
    """Write the SD 1.5-shaped random model into `directory`; returns it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _quiet_libraries()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_tokenizer(directory / "tokenizer")
    tokenizer.save_pretrained(directory / "tokenizer")

    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    text_encoder.save_pretrained(directory / "text_encoder")
    del text_encoder
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=512,
    )
    vae.save_pretrained(directory / "vae")
    del vae
    torch.manual_seed(SEED + 2)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    unet.save_pretrained(directory / "unet")
    del unet
    write_pipeline_index(directory)
    return directory
