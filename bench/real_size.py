"""Benchmark: real-size random models through the worker's model loading and engine on the CPU.

SD 1.5-shaped (UNet 320/640/1280/1280, CLIP ViT-L 768) at 512x512 and SDXL-shaped (UNet
320/640/1280 with 1/2/10 transformer layers, CLIP ViT-L + OpenCLIP bigG 2048-wide
conditioning, 1280 pooled, text_time added embedding) at 1024x1024: random weights written
as diffusers folders, loaded by `worker.models.load_model` (the `from_pretrained` path a
real checkpoint takes), then 2 steps of DDIM inversion under guidance through
`worker.engine.dispatch.invert`, the function the worker runs (not through the HTTP
gateway and Redis: at these sizes the queue adds nothing measurable). Each family runs in
its own process (the weights are written by another), which prints its peak resident
memory (loading and inverting) and seconds per step, then a final `RESULT {json}` line.
Not part of the test suite: minutes of CPU and ~20 GB of memory.

    python bench/real_size.py                 # both families
    python bench/real_size.py --family sdxl   # one
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
from worker.tiny_model import ModelShape  # noqa: E402

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

SHAPES: dict[str, tuple[ModelShape, int]] = {"sd": (SD15_SHAPE, 512), "sdxl": (SDXL_SHAPE, 1024)}
STEPS = 2


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
        # Written by another process: this one's peak memory is loading and inverting only.
        subprocess.run(
            [sys.executable, __file__, "--write-to", folder, "--family", family], check=True
        )
        written = time.perf_counter()
        model = load_model(folder, device="cpu", dtype="float32")
        loaded = time.perf_counter()
        image = imaging.normalize((ROOT / "samples" / "chelsea.png").read_bytes(), (size, size))
        params = InversionParams(
            prompt="a photo of a cat", num_inference_steps=STEPS, guidance_scale=5.0
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(SHAPES), action="append")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write-to", help=argparse.SUPPRESS)
    args = parser.parse_args()
    families = args.family or sorted(SHAPES)
    if args.write_to:
        from worker.tiny_model import write_random_model

        write_random_model(args.write_to, SHAPES[families[0]][0], 0)
        return 0
    if args.child:
        print("RESULT " + json.dumps(run_family(families[0], args.threads)), flush=True)
        return 0
    results = []
    for family in families:
        # One process per family: its peak memory is its own.
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                "--family",
                family,
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode or not lines:
            print(child.stderr[-3000:], file=sys.stderr)
            return child.returncode or 1
        result = json.loads(lines[-1].removeprefix("RESULT "))
        results.append(result)
        print(
            f"{family:5} {result['resolution']:>9}  peak RSS {result['peak_rss_gib']} GiB  "
            f"{result['s_per_step']} s/step (guided, 2 UNet rows)  VAE+text "
            f"{result['vae_encode_and_text_s']} s  load {result['load_s']} s",
            flush=True,
        )
    print("RESULT " + json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
