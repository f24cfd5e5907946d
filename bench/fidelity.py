"""Reconstruction fidelity of plain and refined (exact) DDIM inversion, and what it costs.

For each image in samples/ and each method, the image is inverted, then sampled back by
diffusers' own DDIMScheduler (configured from the result's scheduler config, same prompt,
guidance 1) from the returned latents. Prints the relative error ||x_rec - x0|| / ||x0||
against the clean latent x0 and the number of UNet calls the inversion made (counted by a
forward pre-hook), then a final `RESULT {json}`.

    python bench/fidelity.py                       # tiny model, CPU
    python bench/fidelity.py --steps 50 --refine-iterations 20 --iterations64 50
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import imaging  # noqa: E402
from contract import InversionParams  # noqa: E402
from worker.engine import InversionRequest, InversionResult, encode_prompts, invert  # noqa: E402
from worker.models import LoadedModel, load_model  # noqa: E402

PROMPTS = {"astronaut": "an astronaut", "chelsea": "a cat", "coffee": "a cup of coffee"}


@torch.inference_mode()
def reconstruction_error(model: LoadedModel, result: InversionResult) -> float:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(result.metadata.scheduler_config)
    scheduler.set_timesteps(result.metadata.num_inference_steps)
    text = encode_prompts(model, [result.metadata.prompt])[0]
    z = result.latents.to(model.device, model.dtype)
    for t in scheduler.timesteps:
        eps = model.unet(z, t, encoder_hidden_states=text).sample
        z = scheduler.step(eps, t, z).prev_sample
    assert result.trajectory is not None
    clean = result.trajectory[0].to(model.device, model.dtype)
    return float((z - clean).norm() / clean.norm())


def measure(
    model: LoadedModel, image: Any, prompt: str, steps: int, iterations: int, tolerance: float
) -> dict[str, Any]:
    calls: list[int] = []

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append(1)

    params = InversionParams(
        prompt=prompt,
        num_inference_steps=steps,
        return_trajectory=True,
        refine_iterations=iterations,
        refine_tolerance=tolerance,
    )
    handle = model.unet.register_forward_pre_hook(hook, with_kwargs=True)
    started = time.perf_counter()
    try:
        (result,) = invert(model, [InversionRequest(image, params)])
    finally:
        handle.remove()
    seconds = time.perf_counter() - started
    assert result is not None
    return {
        "error": reconstruction_error(model, result),
        "unet_calls": len(calls),
        "seconds": round(seconds, 3),
        "max_residual": max(result.metadata.refine_residuals or [0.0]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--refine-iterations", type=int, default=20, help="float32 refinement")
    parser.add_argument("--iterations64", type=int, default=50, help="float64 refinement")
    parser.add_argument("--tolerance32", type=float, default=1e-7)
    parser.add_argument("--tolerance64", type=float, default=1e-10)
    parser.add_argument("--images", nargs="*", default=None, help="default: every samples/*.png")
    args = parser.parse_args()

    paths = [Path(p) for p in args.images] if args.images else sorted(ROOT.glob("samples/*.png"))
    fp32 = load_model(args.model, device="cpu", dtype="float32")
    fp64 = load_model(args.model, device="cpu", dtype="float64")
    methods = [
        ("plain", fp32, 0, 1e-4),
        ("refined_fp32", fp32, args.refine_iterations, args.tolerance32),
        ("refined_fp64", fp64, args.iterations64, args.tolerance64),
    ]
    rows: list[dict[str, Any]] = []
    print(f"{'image':<12} {'method':<14} {'rel. error':>12} {'UNet calls':>11} {'seconds':>8}")
    for path in paths:
        image = imaging.open_image(path.read_bytes())
        prompt = PROMPTS.get(path.stem, path.stem)
        for name, model, iterations, tolerance in methods:
            row = {"image": path.stem, "method": name, "refine_iterations": iterations}
            row |= measure(model, image, prompt, args.steps, iterations, tolerance)
            rows.append(row)
            print(
                f"{row['image']:<12} {name:<14} {row['error']:>12.3e} "
                f"{row['unet_calls']:>11} {row['seconds']:>8.2f}",
                flush=True,
            )
    print("RESULT " + json.dumps({"model": args.model, "steps": args.steps, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
