"""Reconstruction fidelity of every inversion method, and the cost.

For each image in samples/ and each method, the image is inverted, then sampled back by
diffusers' own DDIMScheduler (configured from the result's scheduler config, same prompt)
from the returned latents: at guidance 1 for plain and refined inversion; at
`--guidance` for null-text inversion, with each step's null embedding as the unconditional
one, and for comparison for the plain latents with the negative prompt's embedding
(`plain@gN`, what null-text inversion repairs). Prints the relative error
||x_rec - x0|| / ||x0|| against the clean latent x0 and the number of UNet calls the
inversion made (counted by a forward pre-hook), then the cost of `verify` (its extra UNet
calls and seconds on a plain inversion).

Then every method side by side (`--method-steps`, default 10): ddim, inverse_scheduler
dpmsolver, negative_prompt, edict and ddpm, at guidance 1 and `--guidance` where the
method applies (negative_prompt inverts at guidance 1 and is sampled back guided: at
guidance 1 it is ddim), float32, and edict and ddpm in float64 too. Each is sampled back
by the engine's `verify` with the method's own sampler (DDIMScheduler; the null
embeddings for negative_prompt; DPMSolverMultistepScheduler; EDICT's; DDPM's with the
saved noise maps): its relative latent error, and the UNet calls of the inversion alone.
A final `RESULT {json}` holds every row.

    python bench/fidelity.py                       # tiny model, CPU
    python bench/fidelity.py --methods-only --method-steps 10 25
    python bench/fidelity.py --steps 50 --refine-iterations 20 --iterations64 50
    python bench/fidelity.py --null-text-inner-steps 10 --null-text-learning-rate 0.01
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

from ddim_inversion import imaging  # noqa: E402
from ddim_inversion.params import InversionParams  # noqa: E402
from worker.engine.dispatch import invert  # noqa: E402
from worker.engine.encoding import encode_prompts  # noqa: E402
from worker.engine.types import InversionRequest, InversionResult  # noqa: E402
from worker.models import LoadedModel, load_model  # noqa: E402

PROMPTS = {"astronaut": "an astronaut", "chelsea": "a cat", "coffee": "a cup of coffee"}


@torch.inference_mode()
def reconstruction_error(
    model: LoadedModel,
    result: InversionResult,
    guidance: float = 1.0,
    nulls: torch.Tensor | None = None,
) -> float:
    """Sampled back at `guidance`; the unconditional embedding is nulls[i] or the negative's."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(result.metadata.scheduler_config)
    scheduler.set_timesteps(result.metadata.num_inference_steps)
    text = encode_prompts(model, [result.metadata.prompt])[0].embeds
    negative = encode_prompts(model, [result.metadata.negative_prompt])[0].embeds
    z = result.latents.to(model.device, model.dtype)
    for i, t in enumerate(scheduler.timesteps):
        if guidance == 1.0:
            eps = model.unet(z, t, encoder_hidden_states=text).sample
        else:
            uncond = negative
            if nulls is not None:
                uncond = nulls[i : i + 1].to(model.device, model.dtype)
            eps_u, eps_c = model.unet(
                torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, text])
            ).sample.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        z = scheduler.step(eps, t, z).prev_sample
    assert result.trajectory is not None
    clean = result.trajectory[0].to(model.device, model.dtype)
    return float((z - clean).norm() / clean.norm())


def timed(model: LoadedModel, image: Any, params: InversionParams) -> tuple[Any, int, float]:
    """(result, UNet calls, seconds) of one inversion."""
    calls: list[int] = []

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append(1)

    handle = model.unet.register_forward_pre_hook(hook, with_kwargs=True)
    started = time.perf_counter()
    try:
        (result,) = invert(model, [InversionRequest(image, params)])
    finally:
        handle.remove()
    assert result is not None
    return result, len(calls), time.perf_counter() - started


def measure(
    model: LoadedModel, image: Any, prompt: str, steps: int, iterations: int, tolerance: float
) -> dict[str, Any]:
    params = InversionParams(
        prompt=prompt,
        num_inference_steps=steps,
        return_trajectory=True,
        refine_iterations=iterations,
        refine_tolerance=tolerance,
    )
    result, calls, seconds = timed(model, image, params)
    return {
        "error": reconstruction_error(model, result),
        "unet_calls": calls,
        "seconds": round(seconds, 3),
        "max_residual": max(result.metadata.refine_residuals or [0.0]),
    }


def measure_null_text(
    model: LoadedModel, image: Any, prompt: str, steps: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Null-text inversion, and the plain latents sampled at the same guidance without it."""
    params = InversionParams(
        prompt=prompt,
        num_inference_steps=steps,
        return_trajectory=True,
        method="null_text",
        guidance_scale=args.guidance,
        null_text_inner_steps=args.null_text_inner_steps,
        null_text_learning_rate=args.null_text_learning_rate,
        null_text_early_stop=args.null_text_early_stop,
    )
    result, calls, seconds = timed(model, image, params)
    assert result.null_embeddings is not None
    baseline = reconstruction_error(model, result, args.guidance)  # the pivot is the plain run
    return [
        {"method": f"plain@g{args.guidance:g}", "error": baseline, "unet_calls": steps},
        {
            "method": "null_text",
            "error": reconstruction_error(model, result, args.guidance, result.null_embeddings),
            "unet_calls": calls,
            "seconds": round(seconds, 3),
            "final_loss": result.metadata.null_text_losses[-1],
        },
    ]


def measure_verify(model: LoadedModel, image: Any, prompt: str, steps: int) -> dict[str, Any]:
    """What verify adds to a plain inversion: UNet calls (a sampling pass) and seconds."""
    plain = InversionParams(prompt=prompt, num_inference_steps=steps)
    _, calls, seconds = timed(model, image, plain)
    result, verified_calls, verified_seconds = timed(
        model, image, plain.model_copy(update={"verify": True})
    )
    return {
        "extra_unet_calls": verified_calls - calls,
        "extra_seconds": round(verified_seconds - seconds, 3),
        "verify_s": round(result.timings["verify_s"], 3),
        "reconstruction_latent_error": result.metadata.reconstruction_latent_error,
        "reconstruction_psnr": result.metadata.reconstruction_psnr,
    }


METHODS: list[tuple[str, dict[str, Any], bool]] = [
    ("ddim", {}, True),
    ("dpmsolver", {"inverse_scheduler": "dpmsolver"}, True),
    ("negative_prompt", {"method": "negative_prompt"}, False),
    ("edict", {"method": "edict"}, True),
    ("ddpm", {"method": "ddpm", "seed": 0}, True),
]
"""(name, parameters, whether it is measured at guidance 1 too)."""


def measure_methods(
    models: dict[str, LoadedModel], image: Any, prompt: str, steps: int, guidance: float
) -> list[dict[str, Any]]:
    """Each method's latent error sampled back by verify, and its inversion's UNet calls."""
    rows = []
    for name, fields, unguided in METHODS:
        for scale in [1.0, guidance] if unguided else [guidance]:
            for dtype, model in models.items():
                if dtype == "float64" and name not in ("edict", "ddpm"):
                    continue
                params = InversionParams(
                    prompt=prompt, num_inference_steps=steps, guidance_scale=scale, **fields
                )
                _, calls, seconds = timed(model, image, params)
                verified, _, _ = timed(model, image, params.model_copy(update={"verify": True}))
                rows.append(
                    {
                        "method": name,
                        "guidance": scale,
                        "dtype": dtype,
                        "steps": steps,
                        "error": verified.metadata.reconstruction_latent_error,
                        "unet_calls": calls,
                        "seconds": round(seconds, 3),
                    }
                )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--refine-iterations", type=int, default=20, help="float32 refinement")
    parser.add_argument("--iterations64", type=int, default=50, help="float64 refinement")
    parser.add_argument("--tolerance32", type=float, default=1e-7)
    parser.add_argument("--tolerance64", type=float, default=1e-10)
    parser.add_argument("--guidance", type=float, default=7.5, help="null-text guidance")
    parser.add_argument("--null-text-inner-steps", type=int, default=10)
    parser.add_argument("--null-text-learning-rate", type=float, default=1e-2)
    parser.add_argument("--null-text-early-stop", type=float, default=1e-5)
    parser.add_argument("--no-null-text", action="store_true", help="skip null-text inversion")
    parser.add_argument("--images", nargs="*", default=None, help="default: every samples/*.png")
    parser.add_argument("--method-steps", type=int, nargs="*", default=[10])
    parser.add_argument("--methods-only", action="store_true", help="only the methods side by side")
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
    if args.methods_only:
        paths_done: list[Path] = []
    else:
        print(f"{'image':<12} {'method':<14} {'rel. error':>12} {'UNet calls':>11} {'seconds':>8}")
        paths_done = paths
    for path in paths_done:
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
        if args.no_null_text:
            continue
        for extra in measure_null_text(fp32, image, prompt, args.steps, args):
            row = {"image": path.stem, **extra}
            rows.append(row)
            seconds = f"{row['seconds']:>8.2f}" if "seconds" in row else f"{'':>8}"
            print(
                f"{row['image']:<12} {row['method']:<14} {row['error']:>12.3e} "
                f"{row['unet_calls']:>11} {seconds}",
                flush=True,
            )
    verify: dict[str, Any] = {}
    if not args.methods_only:
        image = imaging.open_image(paths[0].read_bytes())
        verify = measure_verify(fp32, image, PROMPTS.get(paths[0].stem, paths[0].stem), args.steps)
        print(
            f"verify ({paths[0].stem}, plain): +{verify['extra_unet_calls']} UNet calls, "
            f"+{verify['extra_seconds']:.2f} s, latent error "
            f"{verify['reconstruction_latent_error']:.3e}, "
            f"PSNR {verify['reconstruction_psnr']:.2f} dB"
        )
    side_by_side: list[dict[str, Any]] = []
    header = f"{'image':<12} {'method':<16} {'g':>4} {'dtype':<8} {'steps':>5}"
    print(f"{header} {'rel. error':>12} {'UNet calls':>11}")
    models = {"float32": fp32, "float64": fp64}
    for path in paths:
        image = imaging.open_image(path.read_bytes())
        for steps in args.method_steps:
            prompt = PROMPTS.get(path.stem, path.stem)
            for row in measure_methods(models, image, prompt, steps, args.guidance):
                side_by_side.append({"image": path.stem, **row})
                print(
                    f"{path.stem:<12} {row['method']:<16} {row['guidance']:>4g} "
                    f"{row['dtype']:<8} {steps:>5} {row['error']:>12.3e} {row['unet_calls']:>11}",
                    flush=True,
                )
    config = {
        "model": args.model,
        "steps": args.steps,
        "guidance": args.guidance,
        "null_text_inner_steps": args.null_text_inner_steps,
        "null_text_learning_rate": args.null_text_learning_rate,
    }
    print(
        "RESULT " + json.dumps(config | {"rows": rows, "verify": verify, "methods": side_by_side})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
