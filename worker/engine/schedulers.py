"""The two diffusers schedulers the engine steps with, built from the job's scheduler config
(the model's with the job's overrides), never from the bare constructors: their defaults
(`clip_sample=True`, linear betas) are wrong for Stable Diffusion latents."""

from __future__ import annotations

from typing import Any


def inverse_scheduler(config: dict[str, Any], steps: int) -> tuple[Any, list[int]]:
    """diffusers' DDIMInverseScheduler for `steps` steps, with its ascending timesteps."""
    from diffusers import DDIMInverseScheduler

    scheduler = DDIMInverseScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    # Python ints: comparing a CUDA timestep tensor inside step() would synchronise the host.
    return scheduler, [int(t) for t in scheduler.timesteps]


def sampling_scheduler(config: dict[str, Any], timesteps: list[int]) -> Any:
    """diffusers' DDIMScheduler from the job's config, checked against the inversion's steps."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(len(timesteps))
    if [int(t) for t in scheduler.timesteps] != timesteps[::-1]:
        raise ValueError(
            "the sampling scheduler's timesteps are not the inversion's reversed; "
            f"{[int(t) for t in scheduler.timesteps]} vs {timesteps[::-1]}"
        )
    return scheduler
