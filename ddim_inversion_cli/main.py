"""`ddim-invert`: the command line of the service.

  make-tiny-model DIR    write the offline tiny model as a diffusers folder
  local IMAGE...         invert in-process, no Redis (the engine alone)
  gateway                run the HTTP gateway (uvicorn)
  worker                 run a GPU worker draining the queue
  submit IMAGE           send an image to a running service (the Python client)

Each subcommand imports only its own side: the gateway never loads torch. The flags of the
inversion's parameters (`local`, `submit`) are generated from the contract (flags.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ddim_inversion_cli.flags import add_parameter_flags, parameters_from_args


def _fail(message: str) -> int:
    print(f"ddim-invert: error: {message}", file=sys.stderr)
    return 2


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from worker.tiny_model import make_tiny_model

    print(make_tiny_model(args.directory, args.family))
    return 0


def cmd_local(args: argparse.Namespace) -> int:
    import time

    from pydantic import ValidationError
    from tqdm import tqdm

    from ddim_inversion import imaging
    from ddim_inversion.errors import InvalidParameter
    from ddim_inversion.params import InversionParams
    from worker.engine.dispatch import invert
    from worker.engine.types import InversionRequest, progress_total
    from worker.models import ModelLoadError, limit_cpu_threads, load_model
    from worker.settings import get_settings

    settings = get_settings()
    limit_cpu_threads(settings.threads)
    if args.out and len(args.images) > 1:
        return _fail("--out takes one image; use --out-dir for several")
    given = parameters_from_args(args)
    # `--model` names the model to load here (a folder too), not a pool's served model.
    model_name = given.pop("model", None) or settings.model
    try:
        params = InversionParams(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "parameters"
        return _fail(f"{field}: {first['msg']}")
    try:
        requests = [
            InversionRequest(imaging.open_image(Path(path).read_bytes()), params)
            for path in args.images
        ]
    except OSError as exc:
        return _fail(str(exc))
    except imaging.ImageRejected as exc:
        return _fail(exc.message)
    started = time.perf_counter()
    try:
        model = load_model(
            model_name,
            device=args.device or settings.device,
            dtype=args.dtype or settings.dtype,
            allow_download=settings.allow_download,
            cache_dir=settings.model_cache_dir,
        )
    except ModelLoadError as exc:
        return _fail(str(exc))
    load_s = time.perf_counter() - started

    bar = tqdm(total=progress_total(params), desc="inverting", file=sys.stderr, leave=False)

    def progress(step: int, total: int) -> None:
        bar.total = total
        bar.n = step
        bar.refresh()

    try:
        results = invert(model, requests, progress=progress)
    except InvalidParameter as exc:
        return _fail(str(exc))
    finally:
        bar.close()
    out_dir = Path(args.out_dir) if args.out_dir else Path(".")
    for path, result in zip(args.images, results, strict=True):
        assert result is not None  # nothing cancels a local run
        target = Path(args.out) if args.out else out_dir / f"{Path(path).stem}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        data = result.to_npy() if target.suffix == ".npy" else result.to_safetensors()
        target.write_bytes(data)
        reconstruction = None
        if result.reconstruction_png is not None:
            reconstruction = target.with_name(f"{target.stem}.reconstruction.png")
            reconstruction.write_bytes(result.reconstruction_png)
        line = {
            "file": str(path),
            "out": str(target),
            "shape": list(result.latents.shape),
            "dtype": result.metadata.dtype,
            "token_count": result.metadata.token_count,
            "truncated": result.metadata.truncated,
            "refine_iterations": (
                sum(result.metadata.refine_iterations)
                if result.metadata.refine_iterations is not None
                else None
            ),
            "method": result.metadata.method,
            "null_text_final_loss": (
                result.metadata.null_text_losses[-1] if result.metadata.null_text_losses else None
            ),
            "reconstruction_latent_error": result.metadata.reconstruction_latent_error,
            "reconstruction_psnr": result.metadata.reconstruction_psnr,
            "reconstruction": str(reconstruction) if reconstruction is not None else None,
            "timings": {"load_model_s": round(load_s, 4)}
            | {k: round(v, 4) for k, v in result.timings.items()},
        }
        print(json.dumps(line), flush=True)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from ddim_inversion_client.cli import run_submit

    return run_submit(args, parameters_from_args(args))


def cmd_gateway(args: argparse.Namespace) -> int:
    from service.main import run

    return run(host=args.host, port=args.port)


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run

    return run(burst=args.burst)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddim-invert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny-model", help="write an offline tiny model")
    tiny.add_argument("directory")
    tiny.add_argument(
        "--family",
        choices=("sd", "sd-v", "sdxl"),
        default="sd",
        help="sd: SD 1.x shape (the model 'tiny'); sd-v: v-prediction ('tiny-v'); sdxl: "
        "SDXL shape ('tiny-xl'). Default: sd.",
    )
    tiny.set_defaults(func=cmd_make_tiny_model)

    local = sub.add_parser("local", help="invert images in-process, without Redis")
    local.add_argument("images", nargs="+", metavar="IMAGE")
    add_parameter_flags(local)
    local.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    local.add_argument(
        "--dtype", choices=["auto", "float32", "float16", "bfloat16", "float64"], default=None
    )
    out = local.add_mutually_exclusive_group()
    out.add_argument("--out", default=None, help="FILE.safetensors or FILE.npy (one image)")
    out.add_argument("--out-dir", default=None, help="folder for IMAGE-stem.safetensors files")
    local.set_defaults(func=cmd_local)

    gateway = sub.add_parser("gateway", help="run the HTTP gateway")
    gateway.add_argument("--host", default=None)
    gateway.add_argument("--port", type=int, default=None)
    gateway.set_defaults(func=cmd_gateway)

    submit = sub.add_parser("submit", help="send an image to a running service")
    submit.add_argument("image", metavar="IMAGE")
    add_parameter_flags(submit)
    submit.add_argument("--url", default=None, help="gateway URL (INVERSION_CLIENT_URL)")
    submit.add_argument("--wait", action="store_true", help="wait for the job, then download")
    submit.add_argument("--timeout", type=float, default=None, metavar="S", help="wait at most S s")
    submit.add_argument("--out", default=None, help="--wait writes here (IMAGE-stem.safetensors)")
    submit.set_defaults(func=cmd_submit)

    worker = sub.add_parser("worker", help="run a worker that drains the queue")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(func=cmd_worker)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
