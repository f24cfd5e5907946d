"""The built-in offline models, one per family: `tiny` (SD 1.x shape), `tiny-v` (the same
shape, v-prediction, as SD 2.x 768-v) and `tiny-xl` (SDXL shape: two CLIP text encoders,
the second with projection, a UNet with the `text_time` added embedding). Small models
with random weights, generated deterministically from a fixed seed each and written as
diffusers folders, so that they are loaded back through the same `from_pretrained` calls
as a real checkpoint. `write_random_model` writes random weights of any SD 1.x or SDXL
shape (bench/sd15.py and bench/real_size.py write real sizes).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from worker.libraries import quiet_libraries

TINY_MODEL = "tiny"
"""The built-in offline SD 1.x-shaped model's name."""

TINY_MODELS: dict[str, str] = {"tiny": "sd", "tiny-v": "sd-v", "tiny-xl": "sdxl"}
"""The built-in offline models by name, with the family `make-tiny-model --family` names."""

FAMILIES = ("sd", "sd-v", "sdxl")

TINY_SEED = 0
"""Seed of the tiny model's weights: every machine generates bit-identical ones."""

TINY_SEEDS: dict[str, int] = {"sd": TINY_SEED, "sd-v": TINY_SEED, "sdxl": 20}
"""Each family's seed (its components take seed, seed + 1, ...)."""

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
"""The scheduler config of generated SD 1.x models: Stable Diffusion 1.5's."""

SD2_V_SCHEDULER_CONFIG: dict[str, Any] = {
    **SD15_SCHEDULER_CONFIG,
    "_class_name": "DDIMScheduler",
    "prediction_type": "v_prediction",
}
"""The scheduler config of generated v-prediction models: SD 2.x 768-v's."""

SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    **SD15_SCHEDULER_CONFIG,
    "_class_name": "EulerDiscreteScheduler",
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "sample_max_value": 1.0,
}
"""The scheduler config of generated SDXL models: SDXL base 1.0's."""


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
    unet_attention_head_dim: int | tuple[int, ...]
    unet_norm_groups: int
    vocab_size: int | None = None
    """None: the byte tokenizer's own vocabulary size."""
    family: str = "sd"
    """sd, sd-v (v-prediction) or sdxl."""
    text_2_hidden_size: int = 0
    """sdxl: the second text encoder's width (its projection too)."""
    text_2_intermediate_size: int = 0
    text_2_layers: int = 0
    text_2_heads: int = 0
    addition_time_embed_dim: int = 8
    """sdxl: each time id's embedding width (six of them, then the pooled embedding)."""
    unet_extra: tuple[tuple[str, Any], ...] = ()
    """More UNet2DConditionModel arguments (SDXL's transformer_layers_per_block, ...)."""
    vae_scaling_factor: float = 0.18215

    @property
    def cross_attention_dim(self) -> int:
        return self.text_hidden_size + (self.text_2_hidden_size if self.family == "sdxl" else 0)


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

TINY_V_SHAPE = replace(TINY_SHAPE, family="sd-v")
"""tiny-v: tiny's shape and weights (the same seed), its scheduler predicting v."""

TINY_XL_SHAPE = replace(
    TINY_SHAPE,
    family="sdxl",
    text_2_hidden_size=32,
    text_2_intermediate_size=64,
    text_2_layers=2,
    text_2_heads=4,
    unet_extra=(("transformer_layers_per_block", (1, 1)), ("use_linear_projection", True)),
    vae_scaling_factor=0.13025,
)
"""tiny-xl: two 32-wide text encoders (cross-attention 64), SDXL's VAE scaling factor."""

TINY_SHAPES: dict[str, ModelShape] = {"sd": TINY_SHAPE, "sd-v": TINY_V_SHAPE, "sdxl": TINY_XL_SHAPE}


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


def _text_encoder(tokenizer: Any, shape: ModelShape, second: bool) -> Any:
    """A random CLIP text encoder of `shape`: the first, or SDXL's second (its own sizes,
    and the projection that makes the pooled embedding)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hidden, intermediate, layers, heads = (
        (
            shape.text_2_hidden_size,
            shape.text_2_intermediate_size,
            shape.text_2_layers,
            shape.text_2_heads,
        )
        if second
        else (
            shape.text_hidden_size,
            shape.text_intermediate_size,
            shape.text_layers,
            shape.text_heads,
        )
    )
    config = CLIPTextConfig(
        vocab_size=shape.vocab_size or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if second else CLIPTextModel(config)


def write_random_model(directory: str | Path, shape: ModelShape, seed: int) -> Path:
    """Write a pipeline folder with random weights of `shape` into `directory`.

    Each component is seeded on its own (seed, seed + 1, seed + 2, and for SDXL's second
    text encoder seed + 3), so its weights do not depend on the others; each is freed once
    saved, which keeps real sizes in memory.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    quiet_libraries()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    xl = shape.family == "sdxl"
    tokenizer = byte_tokenizer(directory / "tokenizer")
    tokenizer.save_pretrained(directory / "tokenizer")
    if xl:
        tokenizer.save_pretrained(directory / "tokenizer_2")

    encoders = [("text_encoder", seed, False), ("text_encoder_2", seed + 3, True)]
    for folder, encoder_seed, second in encoders[: 2 if xl else 1]:
        torch.manual_seed(encoder_seed)
        encoder = _text_encoder(tokenizer, shape, second)
        encoder.save_pretrained(directory / folder)
        del encoder
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
        scaling_factor=shape.vae_scaling_factor,
        force_upcast=xl,
    )
    vae.save_pretrained(directory / "vae")
    del vae
    torch.manual_seed(seed + 2)
    added: dict[str, Any] = {}
    if xl:
        added = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": shape.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": 6 * shape.addition_time_embed_dim
            + shape.text_2_hidden_size,
        }
    unet: Any = UNet2DConditionModel(
        sample_size=shape.unet_sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=shape.unet_channels,
        layers_per_block=shape.unet_layers_per_block,
        down_block_types=shape.unet_down_blocks,
        up_block_types=shape.unet_up_blocks,
        cross_attention_dim=shape.cross_attention_dim,
        attention_head_dim=shape.unet_attention_head_dim,
        norm_num_groups=shape.unet_norm_groups,
        **added,
        **dict(shape.unet_extra),
    )
    unet.save_pretrained(directory / "unet")
    del unet
    write_pipeline_index(directory, shape.family)
    return directory


def make_tiny_model(directory: str | Path, family: str = "sd") -> Path:
    """Write a tiny model of `family` (sd, sd-v, sdxl) as a diffusers folder; deterministic
    from the family's seed."""
    if family not in TINY_SHAPES:
        raise ValueError(f"family {family!r} is not one of {', '.join(FAMILIES)}")
    return write_random_model(directory, TINY_SHAPES[family], TINY_SEEDS[family])


def write_pipeline_index(directory: Path, family: str = "sd") -> None:
    """The scheduler config and model_index.json of a pipeline folder of `family`."""
    config = {
        "sd": SD15_SCHEDULER_CONFIG,
        "sd-v": SD2_V_SCHEDULER_CONFIG,
        "sdxl": SDXL_SCHEDULER_CONFIG,
    }[family]
    scheduler_dir = directory / "scheduler"
    scheduler_dir.mkdir(exist_ok=True)
    (scheduler_dir / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    if family == "sdxl":
        model_index: dict[str, Any] = {
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": "0.30.0",
            "force_zeros_for_empty_prompt": True,
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "vae": ["diffusers", "AutoencoderKL"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "scheduler": ["diffusers", config["_class_name"]],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
        }
    else:
        model_index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.30.0",
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "scheduler": ["diffusers", config["_class_name"]],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
        }
    (directory / "model_index.json").write_text(json.dumps(model_index, indent=2))


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddim-inversion"


def tiny_model_dir(cache_dir: Path | None = None, name: str = TINY_MODEL) -> Path:
    """The cached folder of the tiny model `name`, generated on first use (atomically:
    racing processes agree)."""
    family = TINY_MODELS[name]
    suffix = "" if family == "sd" else f"-{family}"
    target = (cache_dir or default_cache_dir()) / f"tiny{suffix}-v{TINY_VERSION}"
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        make_tiny_model(staging, family)
        # Another process may have won the race; its folder is identical.
        with contextlib.suppress(OSError):
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
