"""The built-in offline model `tiny`: a small SD-shaped model with random weights, generated
deterministically and written as a diffusers folder, so that it is loaded back through the
same `from_pretrained` calls as a real checkpoint. `write_random_model` writes random
weights of any SD 1.x shape (bench/sd15.py writes SD 1.5's).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.libraries import quiet_libraries

TINY_MODEL = "tiny"
"""The built-in offline model's name."""

TINY_SEED = 0
"""Seed of the tiny model's weights: every machine generates bit-identical ones."""

TINY_VERSION = "1"
"""Bumped when the tiny model's shape changes, so that stale caches are not reused."""

SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "trained_betas": None,
}
"""The scheduler config of every generated model: Stable Diffusion 1.5's."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a random SD 1.x-shaped model; its UNet cross-attends to the text width."""

    text_hidden_size: int
    text_intermediate_size: int
    text_layers: int
    text_heads: int
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_norm_groups: int
    vae_sample_size: int
    unet_sample_size: int
    unet_channels: tuple[int, ...]
    unet_layers_per_block: int
    unet_down_blocks: tuple[str, ...]
    unet_up_blocks: tuple[str, ...]
    unet_attention_head_dim: int
    unet_norm_groups: int
    vocab_size: int | None = None
    """None: the byte tokenizer's own vocabulary size."""


TINY_SHAPE = ModelShape(
    text_hidden_size=32,
    text_intermediate_size=64,
    text_layers=2,
    text_heads=4,
    vae_channels=(8, 16, 16, 16),
    vae_layers_per_block=1,
    vae_norm_groups=8,
    vae_sample_size=64,
    unet_sample_size=8,
    unet_channels=(32, 64),
    unet_layers_per_block=1,
    unet_down_blocks=("CrossAttnDownBlock2D", "DownBlock2D"),
    unet_up_blocks=("UpBlock2D", "CrossAttnUpBlock2D"),
    unet_attention_head_dim=4,
    unet_norm_groups=8,
)
"""The tiny model: 64x64 images, an 8x8 latent, a few thousand parameters per component."""


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character map (the GPT-2 BPE alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def byte_tokenizer(directory: Path) -> Any:
    """A working CLIP BPE tokenizer over single bytes (a few common merges): any text encodes."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges = ["t h", "th e</w>", "a n", "i n", "o f</w>", "o n</w>", "e r</w>", "a t</w>"]
    for merge in merges:
        vocab.append(merge.replace(" ", ""))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=str(directory / "vocab.json"),
        merges=str(directory / "merges.txt"),
        model_max_length=77,
    )
    (directory / "vocab.json").unlink()
    (directory / "merges.txt").unlink()
    return tokenizer


def write_random_model(directory: str | Path, shape: ModelShape, seed: int) -> Path:
    """Write an SD pipeline folder with random weights of `shape` into `directory`.

    Each component is seeded on its own (seed, seed + 1, seed + 2), so its weights do not
    depend on the others; each is freed once saved, which keeps SD 1.5 sizes in memory.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    quiet_libraries()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_tokenizer(directory / "tokenizer")
    tokenizer.save_pretrained(directory / "tokenizer")

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=shape.vocab_size or len(tokenizer),
            hidden_size=shape.text_hidden_size,
            intermediate_size=shape.text_intermediate_size,
            num_hidden_layers=shape.text_layers,
            num_attention_heads=shape.text_heads,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    text_encoder.save_pretrained(directory / "text_encoder")
    del text_encoder
    torch.manual_seed(seed + 1)
    vae: Any = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=shape.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(shape.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(shape.vae_channels),
        latent_channels=4,
        layers_per_block=shape.vae_layers_per_block,
        norm_num_groups=shape.vae_norm_groups,
        sample_size=shape.vae_sample_size,
    )
    vae.save_pretrained(directory / "vae")
    del vae
    torch.manual_seed(seed + 2)
    unet: Any = UNet2DConditionModel(
        sample_size=shape.unet_sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=shape.unet_channels,
        layers_per_block=shape.unet_layers_per_block,
        down_block_types=shape.unet_down_blocks,
        up_block_types=shape.unet_up_blocks,
        cross_attention_dim=shape.text_hidden_size,
        attention_head_dim=shape.unet_attention_head_dim,
        norm_num_groups=shape.unet_norm_groups,
    )
    unet.save_pretrained(directory / "unet")
    del unet
    write_pipeline_index(directory)
    return directory


def make_tiny_model(directory: str | Path) -> Path:
    """Write the tiny SD-shaped model as a diffusers folder; deterministic from TINY_SEED."""
    return write_random_model(directory, TINY_SHAPE, TINY_SEED)


def write_pipeline_index(directory: Path) -> None:
    """The scheduler config (SD 1.5's) and model_index.json of an SD pipeline folder."""
    scheduler_dir = directory / "scheduler"
    scheduler_dir.mkdir(exist_ok=True)
    (scheduler_dir / "scheduler_config.json").write_text(
        json.dumps(SD15_SCHEDULER_CONFIG, indent=2)
    )
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    (directory / "model_index.json").write_text(json.dumps(model_index, indent=2))


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddim-inversion"


def tiny_model_dir(cache_dir: Path | None = None) -> Path:
    """The cached tiny model folder, generated on first use (atomically: racing processes agree)."""
    target = (cache_dir or default_cache_dir()) / f"tiny-v{TINY_VERSION}"
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        make_tiny_model(staging)
        # Another process may have won the race; its folder is identical.
        with contextlib.suppress(OSError):
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
