"""Benchmark: the engine's `invert` against a plain diffusers DDIM inversion loop.

Same process, model, device and inputs; median of --repeats runs at each batch size.
Prints images/s for both and engine_time / plain_time (target <= 1.05), then a final
`RESULT {json}` line.

    python bench/engine.py                        # tiny model, CPU or GPU
    python bench/engine.py --sd15 --steps 50      # SD 1.5-shaped random model at 512x512 (GPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddim_inversion import imaging
from ddim_inversion.params import InversionParams
from worker.engine.dispatch import invert
from worker.engine.types import InversionRequest
from worker.models import LoadedModel, load_model

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
PROMPTS = ["a photo of a cat", "an astronaut", "a cup of coffee", "a photo of a dog"]


def _sync(model: LoadedModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


@torch.inference_mode()
def plain_loop(
    model: LoadedModel, arrays: list[np.ndarray], prompts: list[str], steps: int
) -> torch.Tensor:
    """DDIM inversion as a diffusers user writes it."""
    from diffusers import DDIMInverseScheduler

    pixels = torch.from_numpy(np.stack(arrays)).to(model.device).permute(0, 3, 1, 2)
    pixels = pixels.to(model.dtype) / 127.5 - 1.0
    latents = model.vae.encode(pixels).latent_dist.mean * model.vae.config.scaling_factor
    ids = model.tokenizer(
        prompts,
        padding="max_length",
        max_length=model.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(model.device)
    text = model.text_encoder(ids)[0]
    scheduler = DDIMInverseScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(steps, device=model.device)
    for t in scheduler.timesteps:
        eps = model.unet(latents, t, encoder_hidden_states=text).sample
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def _time_pair(engine, plain, model: LoadedModel, repeats: int) -> tuple[float, float]:
    """Median seconds of each; runs interleaved so that machine drift hits both alike."""
    engine()  # warm-up: kernels, allocator, caches
    plain()
    times: dict[str, list[float]] = {"engine": [], "plain": []}
    for _ in range(repeats):
        for key, fn in (("engine", engine), ("plain", plain)):
            _sync(model)
            started = time.perf_counter()
            fn()
            _sync(model)
            times[key].append(time.perf_counter() - started)
    return statistics.median(times["engine"]), statistics.median(times["plain"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--sd15", action="store_true", help="SD 1.5-shaped random model, 512x512")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--cache-dir", default=None, help="where the tiny model is generated")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        started = time.perf_counter()
        if args.sd15:
            from sd15 import make_sd15_model

            name = str(make_sd15_model(Path(tmp) / "sd15"))
        else:
            name = args.model
        cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tmp) / "cache"
        model = load_model(name, device=args.device, dtype=args.dtype, cache_dir=cache_dir)
        setup_s = time.perf_counter() - started
        size = model.native_resolution
        print(
            f"model={'sd15-random' if args.sd15 else name} device={model.device} "
            f"dtype={str(model.dtype).removeprefix('torch.')} resolution={size[0]}x{size[1]} "
            f"steps={args.steps} repeats={args.repeats} setup_s={setup_s:.1f}",
            flush=True,
        )
        images = sorted(SAMPLES.glob("*.png"))
        rows = []
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            arrays = [
                imaging.normalize(images[i % len(images)].read_bytes(), size) for i in range(batch)
            ]
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            requests = [
                InversionRequest(a, InversionParams(prompt=p, num_inference_steps=args.steps))
                for a, p in zip(arrays, prompts, strict=True)
            ]
            engine_s, plain_s = _time_pair(
                lambda r=requests: invert(model, r),
                lambda a=arrays, p=prompts: plain_loop(model, a, p, args.steps),
                model,
                args.repeats,
            )
            engine_latents = torch.cat([r.latents for r in invert(model, requests)])
            plain_latents = plain_loop(model, arrays, prompts, args.steps).float().cpu()
            row = {
                "batch_size": batch,
                "engine_s": round(engine_s, 5),
                "plain_s": round(plain_s, 5),
                "engine_images_per_s": round(batch / engine_s, 3),
                "plain_images_per_s": round(batch / plain_s, 3),
                "ratio": round(engine_s / plain_s, 4),
                "max_abs_diff": float((engine_latents.float() - plain_latents).abs().max()),
            }
            rows.append(row)
            print(
                f"batch {batch}: engine {row['engine_images_per_s']} img/s, plain "
                f"{row['plain_images_per_s']} img/s, engine/plain {row['ratio']:.3f} "
                f"(target <= 1.05), max |diff| {row['max_abs_diff']:.2e}",
                flush=True,
            )
    result = {
        "model": "sd15-random" if args.sd15 else args.model,
        "device": str(model.device),
        "device_name": torch.cuda.get_device_name(model.device)
        if model.device.type == "cuda"
        else "cpu",
        "dtype": str(model.dtype).removeprefix("torch."),
        "resolution": list(size),
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": rows,
        "worst_ratio": max(r["ratio"] for r in rows),
        "target_ratio": 1.05,
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
