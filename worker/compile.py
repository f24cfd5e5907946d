"""Compiled UNet per batch-size bucket, with batches padded up to their bucket.

`torch.compile` (and CUDA graphs even more so) specialise on shapes: a worker whose
batches come in every size from 1 to 64 would compile dozens of graphs. So batches are
padded up to the next bucket (powers of two), each bucket is compiled and warmed up once
before the worker reports ready, and the padding rows are dropped from the output. The
wrapper is transparent to the engine: it is called like the UNet and answers like it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

COMPILE_MODES = ("none", "torch", "torch-cudagraphs")
"""`torch`: torch.compile's default mode; `torch-cudagraphs`: mode="reduce-overhead"."""


def buckets_up_to(rows: int) -> list[int]:
    """1, 2, 4, ... up to the first power of two that holds `rows`."""
    sizes = [1]
    while sizes[-1] < rows:
        sizes.append(sizes[-1] * 2)
    return sizes


@dataclass
class UNetOutput:
    sample: torch.Tensor


class BucketedUNet(torch.nn.Module):
    """Pads each call's batch to a bucket, runs the compiled UNet, and trims the result."""

    def __init__(
        self,
        unet: torch.nn.Module,
        buckets: list[int],
        compiler: Callable[[torch.nn.Module], Callable[..., Any]],
    ) -> None:
        super().__init__()
        self.inner = unet
        self.buckets = sorted(buckets)
        self.compiled = compiler(unet)
        self._timesteps: dict[tuple[int, str], torch.Tensor] = {}

    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.inner.parameters()).dtype

    def bucket_for(self, rows: int) -> int:
        for size in self.buckets:
            if size >= rows:
                return size
        return rows  # beyond the largest bucket: run unpadded (compiles once more)

    def _timestep(self, timestep: int | torch.Tensor, device: torch.device) -> torch.Tensor:
        if isinstance(timestep, torch.Tensor):
            return timestep
        # One device tensor per timestep, made once: no host-to-device copy per step.
        key = (int(timestep), str(device))
        if key not in self._timesteps:
            self._timesteps[key] = torch.tensor(int(timestep), device=device)
        return self._timesteps[key]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: int | torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        **kwargs: Any,
    ) -> UNetOutput:
        rows = sample.shape[0]
        size = self.bucket_for(rows)
        if size > rows:
            pad = size - rows
            sample = torch.cat([sample, sample[-1:].expand(pad, *sample.shape[1:])])
            encoder_hidden_states = torch.cat(
                [
                    encoder_hidden_states,
                    encoder_hidden_states[-1:].expand(pad, *encoder_hidden_states.shape[1:]),
                ]
            )
        out = self.compiled(
            sample,
            self._timestep(timestep, sample.device),
            encoder_hidden_states=encoder_hidden_states,
        )
        return UNetOutput(sample=out.sample[:rows])


def compile_unet(model: Any, mode: str, max_rows: int) -> None:
    """Replace the model's UNet by a bucketed, compiled one (in place); `none` leaves it."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    if mode == "none":
        return
    if getattr(model, "family", "sd") != "sd":
        # The bucketed UNet pads encoder_hidden_states only, not SDXL's added conditioning.
        raise ValueError(f"compile mode {mode!r} is for SD 1.x/2.x models; use none for SDXL")
    options: dict[str, Any] = {"fullgraph": False, "dynamic": False}
    if mode == "torch-cudagraphs":
        options["mode"] = "reduce-overhead"
    model.unet = BucketedUNet(
        model.unet, buckets_up_to(max_rows), lambda unet: torch.compile(unet, **options)
    )


@torch.inference_mode()
def warm_up_buckets(model: Any, text_length: int = 77) -> None:
    """Run every bucket once, so that no job pays for compilation."""
    unet = model.unet
    if not isinstance(unet, BucketedUNet):
        return
    width, height = model.native_resolution
    factor = model.vae_scale_factor
    hidden = model.text_encoder.config.hidden_size
    for size in unet.buckets:
        sample = torch.zeros(
            size,
            model.latent_channels,
            height // factor,
            width // factor,
            device=model.device,
            dtype=model.dtype,
        )
        text = torch.zeros(size, text_length, hidden, device=model.device, dtype=model.dtype)
        unet(sample, 1, encoder_hidden_states=text)
