"""Benchmark: real-size random models through the real service on the CPU.

SD 1.5-shaped (UNet 320/640/1280/1280, CLIP ViT-L 768) at 512x512 and SDXL-shaped (UNet
320/640/1280 with 1/2/10 transformer layers, CLIP ViT-L + OpenCLIP bigG 2048-wide
conditioning, 1280 pooled, text_time added embedding) at 1024x1024: random weights written
as diffusers folders (by another process), then, per family, a private redis-server, the
gateway process (`ddim-invert gateway`) and a worker process (`ddim-invert worker`) serving
the folder (loaded by `from_pretrained`, as a real checkpoint is); the sample photograph is
submitted over HTTP (2 steps, guidance 5, native size), followed to its end and its latents
downloaded and checked (bench/real_size_service.py says where each figure comes from).
Prints the worker's peak resident memory, seconds per step, VAE encode + text, end-to-end
HTTP time, then a final `RESULT {json}` line. Not part of the test suite: minutes of CPU
and ~20 GB of memory.

The worker's warm-up (a 2-step inversion at the native size, `INVERSION_WARMUP`) is off
unless `--warmup`: on a CPU it costs as much as the job measured, and the job's figures do
not depend on it.

    python bench/real_size.py                 # both families, through the service
    python bench/real_size.py --family sdxl   # one
    python bench/real_size.py --tiny          # the 64x64 tiny shapes: seconds
    python bench/real_size.py --engine        # the engine alone (worker.engine.dispatch.invert)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sd15 import SD15_SHAPE  # noqa: E402
from worker.tiny_model import TINY_SHAPE, TINY_XL_SHAPE, ModelShape  # noqa: E402

SDXL_SHAPE = replace(
    SD15_SHAPE,
    family="sdxl",
    text_2_hidden_size=1280,
    text_2_intermediate_size=5120,
    text_2_layers=32,
    text_2_heads=20,
    addition_time_embed_dim=256,
    vae_sample_size=1024,
    vae_scaling_factor=0.13025,
    unet_sample_size=128,
    unet_channels=(320, 640, 1280),
    unet_down_blocks=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    unet_up_blocks=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    unet_attention_head_dim=(5, 10, 20),
    unet_extra=(("transformer_layers_per_block", (1, 2, 10)), ("use_linear_projection", True)),
)
"""SDXL base 1.0's component sizes."""

SHAPES: dict[str, tuple[ModelShape, int]] = {
    "sd": (SD15_SHAPE, 512),
    "sdxl": (SDXL_SHAPE, 1024),
    "tiny": (TINY_SHAPE, 64),
    "tiny-xl": (TINY_XL_SHAPE, 64),
}
"""Each family's shape and native size (the tiny ones: a quick run of the same path)."""

STEPS = 2
GUIDANCE = 5.0


def write_folder(folder: str, family: str) -> None:
    """The family's random weights, written by another process: the measuring process's
    (or the worker's) peak memory is loading and inverting only."""
    subprocess.run([sys.executable, __file__, "--write-to", folder, "--family", family], check=True)


def run_service_family(family: str, threads: int, warmup: bool) -> dict[str, float | str]:
    from bench.real_size_service import run_service

    size = SHAPES[family][1]
    with tempfile.TemporaryDirectory(prefix=f"real-{family}-") as folder:
        started = time.perf_counter()
        write_folder(folder, family)
        written = time.perf_counter()
        out = run_service(folder, f"real-{family}", size, STEPS, GUIDANCE, threads, warmup)
    return {
        "family": family,
        "resolution": f"{size}x{size}",
        "write_s": round(written - started, 1),
        **out,
    }


def run_family(family: str, threads: int) -> dict[str, float | str]:
    import torch

    from ddim_inversion import imaging
    from ddim_inversion.params import InversionParams
    from worker.engine.dispatch import invert
    from worker.engine.types import InversionRequest
    from worker.models import load_model

    torch.set_num_threads(threads)
    size = SHAPES[family][1]
    with tempfile.TemporaryDirectory(prefix=f"real-{family}-") as folder:
        started = time.perf_counter()
        write_folder(folder, family)
        written = time.perf_counter()
        model = load_model(folder, device="cpu", dtype="float32")
        loaded = time.perf_counter()
        image = imaging.normalize((ROOT / "samples" / "chelsea.png").read_bytes(), (size, size))
        params = InversionParams(
            prompt="a photo of a cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE
        )
        (result,) = invert(model, [InversionRequest(image, params)])
    assert result is not None and torch.isfinite(result.latents).all()
    return {
        "family": family,
        "resolution": f"{size}x{size}",
        "latents_shape": "x".join(str(n) for n in result.latents.shape),
        "text_hidden_size": model.text_hidden_size,
        "write_s": round(written - started, 1),
        "load_s": round(loaded - written, 1),
        "vae_encode_and_text_s": round(result.timings["encode_s"], 1),
        "s_per_step": round(result.timings["loop_s"] / STEPS, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1),
    }


def engine_mode(families: list[str], threads: int) -> list[dict[str, float | str]] | None:
    """Each family in its own process (its peak memory its own), the engine called directly."""
    results = []
    for family in families:
        child = subprocess.run(
            [sys.executable, __file__, "--child", "--family", family, "--threads", str(threads)],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode or not lines:
            print(child.stderr[-3000:], file=sys.stderr)
            return None
        result = json.loads(lines[-1].removeprefix("RESULT "))
        results.append(result)
        print(
            f"{family:7} {result['resolution']:>9}  engine alone: peak RSS "
            f"{result['peak_rss_gib']} GiB  {result['s_per_step']} s/step (guided, 2 UNet rows)"
            f"  VAE+text {result['vae_encode_and_text_s']} s  load {result['load_s']} s",
            flush=True,
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(SHAPES), action="append")
    parser.add_argument("--tiny", action="store_true", help="the tiny 64x64 shapes: seconds")
    parser.add_argument("--engine", action="store_true", help="the engine alone, no service")
    parser.add_argument("--warmup", action="store_true", help="the worker warms up first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write-to", help=argparse.SUPPRESS)
    args = parser.parse_args()
    families = args.family or (["tiny", "tiny-xl"] if args.tiny else ["sd", "sdxl"])
    if args.write_to:
        from worker.tiny_model import write_random_model

        write_random_model(args.write_to, SHAPES[families[0]][0], 0)
        return 0
    if args.child:
        print("RESULT " + json.dumps(run_family(families[0], args.threads)), flush=True)
        return 0
    if args.engine:
        results = engine_mode(families, args.threads)
        if results is None:
            return 1
        print("RESULT " + json.dumps(results))
        return 0
    results = []
    for family in families:
        result = run_service_family(family, args.threads, args.warmup)
        results.append(result)
        # No step seen: the steps ran faster than the status was polled (the tiny shapes).
        per_step = f"{result['s_per_step']} s/step" if "s_per_step" in result else "s/step n/a"
        encode = f"{result.get('vae_encode_and_text_s', 'n/a')} s"
        print(
            f"{family:7} {result['resolution']:>9}  worker peak RSS {result['peak_rss_gib']} GiB"
            f"  {per_step} (guided, 2 UNet rows)  VAE+text {encode}  job run {result['run_s']} s  "
            f"end to end (HTTP) {result['end_to_end_http_s']} s  worker ready after "
            f"{result['worker_ready_s']} s",
            flush=True,
        )
    print("RESULT " + json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
