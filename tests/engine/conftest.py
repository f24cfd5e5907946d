"""Shared fixtures of the engine tests: the tiny model (generated once per session) and an
independent reference implementation of DDIM inversion written from the equations."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ddim_inversion import imaging
from worker.models import LoadedModel, load_model

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"


@pytest.fixture(scope="session")
def tiny(tiny_model: LoadedModel) -> LoadedModel:
    """The session's float32 tiny model (tests/conftest.py generates and loads it once)."""
    return tiny_model


@pytest.fixture(scope="session")
def tiny64(model_cache_dir: Path) -> LoadedModel:
    return load_model("tiny", device="cpu", dtype="float64", cache_dir=model_cache_dir)


@pytest.fixture(scope="session")
def tiny_xl(model_cache_dir: Path) -> LoadedModel:
    """The float32 tiny SDXL-shaped model."""
    return load_model("tiny-xl", device="cpu", dtype="float32", cache_dir=model_cache_dir)


@pytest.fixture
def count_unet_calls() -> Iterator[Any]:
    """count_unet_calls(model) -> a list that gets each UNet forward's batch size appended."""
    handles: list[Any] = []

    def start(model: LoadedModel) -> list[int]:
        calls: list[int] = []

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            sample = args[0] if args else kwargs["sample"]
            calls.append(int(sample.shape[0]))

        handles.append(model.unet.register_forward_pre_hook(hook, with_kwargs=True))
        return calls

    try:
        yield start
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture
def unet_calls(tiny: LoadedModel, count_unet_calls: Any) -> list[int]:
    """The float32 tiny model's UNet calls during the test (one entry per forward)."""
    return count_unet_calls(tiny)


@pytest.fixture(scope="session")
def sample_bytes() -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in sorted(SAMPLES.glob("*.png"))}


@pytest.fixture(scope="session")
def sample_arrays(sample_bytes: dict[str, bytes]) -> dict[str, np.ndarray]:
    """The samples normalised to the tiny model's native 64x64."""
    return {name: imaging.normalize(data, (64, 64)) for name, data in sample_bytes.items()}


@pytest.fixture(scope="session")
def cli_env(model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of CLI subprocesses: the session's tiny model, the CPU, no network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVERSION_")}
    env.update(
        INVERSION_MODEL="tiny",
        INVERSION_MODEL_CACHE_DIR=str(model_cache_dir),
        INVERSION_DEVICE="cpu",
        INVERSION_DTYPE="float32",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path_factory.mktemp("hf-home")),
        PYTHONPATH=str(REPO),
    )
    return env


@pytest.fixture(scope="session")
def cli() -> list[str]:
    """The installed `ddim-invert` entry point, or the module when it is not installed."""
    script = Path(sys.executable).parent / "ddim-invert"
    if script.exists():
        return [str(script)]
    found = shutil.which("ddim-invert")
    return [found] if found else [sys.executable, "-m", "ddim_inversion_cli"]


class Reference:
    """DDIM inversion from the equations: no DDIMInverseScheduler, no engine code."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.dtype = model.dtype

    @torch.no_grad()
    def encode_image(self, array: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(array).permute(2, 0, 1)[None].to(self.dtype) / 127.5 - 1.0
        latent = self.model.vae.encode(pixels).latent_dist.mean
        return latent * self.model.vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, prompt: str) -> torch.Tensor:
        ids = self.model.tokenizer(
            prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        return self.model.text_encoder(ids)[0]

    @torch.no_grad()
    def eps(
        self, z: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor, g: float
    ) -> torch.Tensor:
        unet = self.model.unet
        if g == 1.0:
            return unet(z, t, encoder_hidden_states=cond).sample
        # Both texts in one call: CPU kernels round differently for a batch of one and of
        # two (1e-5 apart after 20 steps on AVX2), while the equations are the same.
        eps_u, eps_c = unet(
            torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, cond])
        ).sample.chunk(2)
        return eps_u + g * (eps_c - eps_u)

    @staticmethod
    def sd_alphas_cumprod() -> torch.Tensor:
        """scaled_linear betas, 0.00085 .. 0.012 over 1000 steps, in float32 like diffusers."""
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
        return torch.cumprod(1.0 - betas, dim=0)

    @torch.no_grad()
    def invert(
        self,
        array: np.ndarray,
        prompt: str,
        steps: int,
        guidance_scale: float = 1.0,
        negative_prompt: str = "",
    ) -> tuple[list[int], torch.Tensor]:
        """(timesteps, trajectory (steps+1, 1, 4, h, w)) for the SD 1.5 schedule."""
        alphas_cumprod = self.sd_alphas_cumprod()
        ratio = 1000 // steps
        timesteps = [i * ratio + 1 for i in range(steps)]  # leading spacing, steps_offset 1
        z = self.encode_image(array)
        cond = self.encode_text(prompt)
        uncond = self.encode_text(negative_prompt)
        trajectory = [z]
        for t_next in timesteps:
            t_cur = t_next - ratio
            # set_alpha_to_one=False: before the first timestep, alpha-bar is alphas_cumprod[0].
            a_cur = alphas_cumprod[t_cur] if t_cur >= 0 else alphas_cumprod[0]
            a_next = alphas_cumprod[t_next]
            eps = self.eps(z, t_next, cond, uncond, guidance_scale)
            x0 = (z - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
            z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
            trajectory.append(z)
        return timesteps, torch.stack(trajectory)

    @torch.no_grad()
    def diffusers_loop(
        self, array: np.ndarray, prompt: str, steps: int, config: dict[str, Any]
    ) -> tuple[list[int], torch.Tensor]:
        """The loop a diffusers user writes with DDIMInverseScheduler.from_config(config)."""
        from diffusers import DDIMInverseScheduler

        scheduler = DDIMInverseScheduler.from_config(config)
        scheduler.set_timesteps(steps)
        z = self.encode_image(array)
        cond = self.encode_text(prompt)
        for t in scheduler.timesteps:
            eps = self.model.unet(z, t, encoder_hidden_states=cond).sample
            z = scheduler.step(eps, t, z).prev_sample
        return [int(t) for t in scheduler.timesteps], z


@pytest.fixture(scope="session")
def ref(tiny: LoadedModel) -> Reference:
    return Reference(tiny)


@pytest.fixture(scope="session")
def ref64(tiny64: LoadedModel) -> Reference:
    return Reference(tiny64)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.fixture(scope="session")
def diff() -> Any:
    return max_abs
