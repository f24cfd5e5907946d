"""Fixtures of the method tests: the tiny model in float32 and float64, its clean latents
of two samples, and the model as the methods take it (a guided predict_noise callable)
written here from the guidance equation, not taken from the engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ddim_inversion import imaging
from worker.models import LoadedModel, load_model

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


@pytest.fixture(scope="session")
def tiny64(model_cache_dir: Path) -> LoadedModel:
    return load_model("tiny", device="cpu", dtype="float64", cache_dir=model_cache_dir)


@pytest.fixture(scope="session")
def tiny32(tiny_model: LoadedModel) -> LoadedModel:
    return tiny_model


@torch.no_grad()
def clean_latents(model: LoadedModel) -> torch.Tensor:
    """The astronaut and the cat at 64x64, VAE means scaled: (2, C, 8, 8) in the model's dtype."""
    latents = []
    for name in ("astronaut", "chelsea"):
        array = imaging.normalize((SAMPLES / f"{name}.png").read_bytes(), (64, 64))
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].to(model.dtype)
        latent = model.vae.encode(pixels / 127.5 - 1.0).latent_dist.mean
        latents.append(latent * model.vae.config.scaling_factor)
    return torch.cat(latents)


@pytest.fixture(scope="session")
def clean64(tiny64: LoadedModel) -> torch.Tensor:
    return clean_latents(tiny64)


@pytest.fixture(scope="session")
def clean32(tiny32: LoadedModel) -> torch.Tensor:
    return clean_latents(tiny32)


@torch.no_grad()
def embed(model: LoadedModel, prompts: list[str]) -> torch.Tensor:
    ids = model.tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    return model.text_encoder(ids)[0]


class UnetNoise:
    """eps = unet(z, t, c), or under guidance g: eps_u + g (eps_c - eps_u). Each row has
    its own texts; `uncond` may hold one text per step (B, steps, 77, hidden), indexed by
    the step index as a sampler with null embeddings does. `calls` counts UNet image-calls."""

    def __init__(
        self,
        model: LoadedModel,
        cond: torch.Tensor,
        guidance: float = 1.0,
        uncond: torch.Tensor | None = None,
    ) -> None:
        self.model, self.cond, self.guidance, self.uncond = model, cond, guidance, uncond
        self.calls = 0

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, t: int, step_index: int) -> torch.Tensor:
        unet = self.model.unet
        if self.guidance == 1.0:
            self.calls += z.shape[0]
            return unet(z, t, encoder_hidden_states=self.cond).sample
        uncond = self.uncond if self.uncond.ndim == 3 else self.uncond[:, step_index]
        self.calls += 2 * z.shape[0]
        eps_u, eps_c = unet(
            torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, self.cond])
        ).sample.chunk(2)
        return eps_u + self.guidance * (eps_c - eps_u)


@pytest.fixture
def unet_noise() -> Callable[..., UnetNoise]:
    """unet_noise(model, prompts, guidance=1.0, negatives=None or uncond tensor)."""

    def make(
        model: LoadedModel,
        prompts: list[str],
        guidance: float = 1.0,
        negatives: list[str] | torch.Tensor | None = None,
    ) -> UnetNoise:
        cond = embed(model, prompts)
        if negatives is None:
            negatives = [""] * len(prompts)
        uncond = negatives if isinstance(negatives, torch.Tensor) else embed(model, negatives)
        return UnetNoise(model, cond, guidance, uncond)

    return make


def sd_alpha_bars(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The tiny model's (SD 1.5's) alpha-bars from the definition: scaled_linear betas
    0.00085 .. 0.012 over 1000 steps, cumulative products of 1 - beta, in float32 as the
    schedulers compute them."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="session")
def helpers() -> Any:
    class Helpers:
        alpha_bars = staticmethod(sd_alpha_bars)
        relative = staticmethod(rel)

    return Helpers
