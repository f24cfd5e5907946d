"""Loading a Stable Diffusion 1.x/2.x model once: a local folder, a hub id, or `tiny`.

Every source ends in the same `from_pretrained` calls on a diffusers folder, so the
offline `tiny` model (worker/tiny_model.py) exercises exactly the code a real checkpoint
goes through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddim_inversion.contract import ModelInfo
from worker.libraries import quiet_libraries
from worker.tiny_model import TINY_MODEL, tiny_model_dir

SUPPORTED = (
    "Stable Diffusion 1.x/2.x (StableDiffusionPipeline folders: CLIP tokenizer and text "
    "encoder, AutoencoderKL, UNet2DConditionModel), given as a local folder, a cached "
    "Hugging Face hub id, or 'tiny'"
)

# Components an SD 1.x/2.x pipeline folder must hold, with the classes accepted for them.
REQUIRED_COMPONENTS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "text_encoder": ("CLIPTextModel",),
    "vae": ("AutoencoderKL",),
    "unet": ("UNet2DConditionModel",),
    "scheduler": (),
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says what is supported or how to provide it."""


@dataclass
class LoadedModel:
    """The components of one Stable Diffusion model, on one device, in one dtype."""

    name: str
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    scheduler_config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def native_resolution(self) -> tuple[int, int]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return int(width) * self.vae_scale_factor, int(height) * self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def tokenizer_max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            native_resolution=self.native_resolution,
            latent_channels=self.latent_channels,
            vae_scale_factor=self.vae_scale_factor,
            tokenizer_max_length=self.tokenizer_max_length,
            text_hidden_size=int(self.text_encoder.config.hidden_size),
            scheduler_config=self.scheduler_config,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
        )


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA where available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelLoadError(f"device {device!r} is not one of auto, cpu, cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is float16 on CUDA, float32 on the CPU; float64 only on the CPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if dtype == "float64" and device.type != "cpu":
        raise ModelLoadError("float64 is for exactness work on the CPU only")
    return DTYPES[dtype]


# -- finding and checking a model folder ------------------------------------------------


def _hub_folder(repo_id: str, allow_download: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json"] + [f"{c}/*" for c in REQUIRED_COMPONENTS]
    ignore = ["*.ckpt", "*.bin", "*.msgpack", "*.onnx", "*non_ema*", "*.fp16.*"]
    try:
        return Path(
            snapshot_download(
                repo_id, local_files_only=True, allow_patterns=patterns, ignore_patterns=ignore
            )
        )
    except Exception as cached_error:
        if not allow_download:
            raise ModelLoadError(
                f"model {repo_id!r} is not a local folder and is not in the Hugging Face cache, "
                "and downloads are off. Provide it by passing a diffusers folder "
                "(--model /path/to/model), by downloading it first on a machine with network "
                f"(`huggingface-cli download {repo_id}`) into HF_HOME, by setting "
                "INVERSION_ALLOW_DOWNLOAD=true, or use --model tiny for the offline test model"
            ) from cached_error
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=ignore))
    except Exception as exc:
        raise ModelLoadError(
            f"model {repo_id!r} could not be downloaded ({type(exc).__name__}: {exc}). "
            "Pass a local diffusers folder with --model, or use --model tiny"
        ) from None


def locate_model(name: str, *, allow_download: bool = False, cache_dir: Path | None = None) -> Path:
    """The diffusers folder behind a model name: `tiny`, a local folder, or a hub id."""
    if name == TINY_MODEL:
        return tiny_model_dir(cache_dir)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(
            f"{name!r} is a file; single-file checkpoints are not supported, pass a diffusers "
            f"folder. Supported: {SUPPORTED}"
        )
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise ModelLoadError(f"{name!r} is neither a folder, a hub id (owner/name) nor 'tiny'")
    return _hub_folder(name, allow_download)


def check_family(folder: Path) -> None:
    """Refuse anything that is not an SD 1.x/2.x pipeline, naming what is supported."""
    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise ModelLoadError(f"{folder} has no model_index.json; supported: {SUPPORTED}")
    index = json.loads(index_path.read_text())
    pipeline = index.get("_class_name", "unknown")
    if "text_encoder_2" in index or "transformer" in index:
        raise ModelLoadError(f"{pipeline} models are not supported; supported: {SUPPORTED}")
    for component, classes in REQUIRED_COMPONENTS.items():
        entry = index.get(component)
        if not entry or entry[1] is None:
            raise ModelLoadError(f"{pipeline} has no {component}; supported: {SUPPORTED}")
        if classes and entry[1] not in classes:
            raise ModelLoadError(
                f"{pipeline} has a {entry[1]} as {component} (expected {' or '.join(classes)}); "
                f"supported: {SUPPORTED}"
            )


def limit_cpu_threads(threads: int) -> None:
    """Cap torch's CPU threads; 0 keeps torch's default.

    The thread count decides how CPU kernels split their sums, and so the last bits of every
    result: the worker and `ddim-invert local` apply the same setting to agree exactly.
    """
    if threads:
        torch.set_num_threads(threads)


def load_model(
    name: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    allow_download: bool = False,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a model once; the engine takes the result as an argument."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    quiet_libraries()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    folder = locate_model(name, allow_download=allow_download, cache_dir=cache_dir)
    check_family(folder)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{folder} is not a loadable diffusers folder: {exc}") from None
    if unet.config.in_channels != vae.config.latent_channels:
        raise ModelLoadError(
            f"the UNet takes {unet.config.in_channels} channels but the VAE makes "
            f"{vae.config.latent_channels} (an inpainting or depth model?); supported: {SUPPORTED}"
        )
    modules: tuple[Any, ...] = (text_encoder, vae, unet)
    for module in modules:
        module.requires_grad_(False)
        module.eval()
        module.to(torch_device, torch_dtype)
    if torch_device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    scheduler_config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return LoadedModel(
        name=name,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        scheduler_config=scheduler_config,
        device=torch_device,
        dtype=torch_dtype,
    )
