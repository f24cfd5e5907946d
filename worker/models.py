"""Loading a Stable Diffusion 1.x/2.x or SDXL model once: a local folder, a hub id, or one
of the offline tiny models (`tiny`, `tiny-v`, `tiny-xl`).

Every source ends in the same `from_pretrained` calls on a diffusers folder, so the
offline tiny models (worker/tiny_model.py) exercise exactly the code a real checkpoint
goes through. The family (sd: one CLIP text encoder; sdxl: two, with the pooled
embedding and size conditioning) is read from the folder's model_index.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddim_inversion.contract import ModelInfo
from worker.libraries import quiet_libraries
from worker.tiny_model import TINY_MODELS, tiny_model_dir

SUPPORTED = (
    "Stable Diffusion 1.x/2.x (StableDiffusionPipeline folders: CLIP tokenizer and text "
    "encoder, AutoencoderKL, UNet2DConditionModel; epsilon or v-prediction) and SDXL "
    "(StableDiffusionXLPipeline folders: two CLIP text encoders, the second with "
    "projection), given as a local folder, a cached Hugging Face hub id, or "
    f"{', '.join(repr(name) for name in TINY_MODELS)}"
)

_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")

# Components a pipeline folder of each family must hold, with the classes accepted for them.
REQUIRED_COMPONENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "sd": {
        "tokenizer": _TOKENIZERS,
        "text_encoder": ("CLIPTextModel",),
        "vae": ("AutoencoderKL",),
        "unet": ("UNet2DConditionModel",),
        "scheduler": (),
    },
    "sdxl": {
        "tokenizer": _TOKENIZERS,
        "tokenizer_2": _TOKENIZERS,
        "text_encoder": ("CLIPTextModel",),
        "text_encoder_2": ("CLIPTextModelWithProjection",),
        "vae": ("AutoencoderKL",),
        "unet": ("UNet2DConditionModel",),
        "scheduler": (),
    },
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
    tokenizer_2: Any = None
    """SDXL: the second tokenizer and text encoder (with projection); None for SD 1.x/2.x."""
    text_encoder_2: Any = None
    vae_dtype: torch.dtype | None = None
    """The VAE's dtype where it differs from `dtype` (float32 for a VAE that overflows in
    float16, as SDXL's does: its config says force_upcast)."""

    @property
    def family(self) -> str:
        """sd (Stable Diffusion 1.x/2.x) or sdxl."""
        return "sd" if self.text_encoder_2 is None else "sdxl"

    @property
    def vae_compute_dtype(self) -> torch.dtype:
        return self.vae_dtype or self.dtype

    @property
    def text_hidden_size(self) -> int:
        """The width of the UNet's text conditioning (SDXL: both encoders' side by side)."""
        width = int(self.text_encoder.config.hidden_size)
        if self.text_encoder_2 is not None:
            width += int(self.text_encoder_2.config.hidden_size)
        return width

    @property
    def text_pooled_size(self) -> int | None:
        """SDXL: the width of the pooled (projected) text embedding; None otherwise."""
        if self.text_encoder_2 is None:
            return None
        return int(self.text_encoder_2.config.projection_dim)

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
            text_hidden_size=self.text_hidden_size,
            family=self.family,
            text_pooled_size=self.text_pooled_size,
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

    components = {c for family in REQUIRED_COMPONENTS.values() for c in family}
    patterns = ["model_index.json"] + [f"{c}/*" for c in sorted(components)]
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
    """The diffusers folder behind a model name: a tiny model, a local folder, or a hub id."""
    if name in TINY_MODELS:
        return tiny_model_dir(cache_dir, name)
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


def check_family(folder: Path) -> str:
    """The folder's family (sd or sdxl); anything else is refused, naming what is supported
    (SD3 and Flux have a transformer, not a UNet; an SDXL refiner has no first encoder)."""
    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise ModelLoadError(f"{folder} has no model_index.json; supported: {SUPPORTED}")
    index = json.loads(index_path.read_text())
    pipeline = index.get("_class_name", "unknown")
    if "transformer" in index or "text_encoder_3" in index or "Inpaint" in pipeline:
        raise ModelLoadError(f"{pipeline} models are not supported; supported: {SUPPORTED}")
    family = "sdxl" if "text_encoder_2" in index else "sd"
    for component, classes in REQUIRED_COMPONENTS[family].items():
        entry = index.get(component)
        if not entry or entry[1] is None:
            raise ModelLoadError(f"{pipeline} has no {component}; supported: {SUPPORTED}")
        if classes and entry[1] not in classes:
            raise ModelLoadError(
                f"{pipeline} has a {entry[1]} as {component} (expected {' or '.join(classes)}); "
                f"supported: {SUPPORTED}"
            )
    return family


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
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    quiet_libraries()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    folder = locate_model(name, allow_download=allow_download, cache_dir=cache_dir)
    family = check_family(folder)
    tokenizer_2 = text_encoder_2 = None
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        if family == "sdxl":
            tokenizer_2 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2"
            )
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
    if (unet.config.addition_embed_type == "text_time") != (family == "sdxl"):
        raise ModelLoadError(
            f"{folder}: a {family} pipeline whose UNet has addition_embed_type "
            f"{unet.config.addition_embed_type!r}; supported: {SUPPORTED}"
        )
    # SDXL's VAE overflows in float16 (NaN latents): its config asks for float32.
    vae_dtype = (
        torch.float32
        if getattr(vae.config, "force_upcast", False) and torch_dtype == torch.float16
        else None
    )
    modules: tuple[Any, ...] = (text_encoder, text_encoder_2, vae, unet)
    for module in modules:
        if module is None:
            continue
        module.requires_grad_(False)
        module.eval()
        module.to(torch_device, vae_dtype if module is vae and vae_dtype else torch_dtype)
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
        tokenizer_2=tokenizer_2,
        text_encoder_2=text_encoder_2,
        vae_dtype=vae_dtype,
    )
