"""`ddim-invert`: the command line of the service.

  make-tiny-model DIR    write the offline tiny model as a diffusers folder
  local IMAGE...         invert in-process, no Redis (the engine alone)
  gateway                run the HTTP gateway (uvicorn)
  worker                 run a GPU worker draining the queue
  submit IMAGE           send an image to a running service (the Python client)

Each subcommand imports only its own side: the gateway never loads torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _scheduler_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _default(name: str) -> Any:
    """A parameter's default, read from the contract: the one place defaults are set."""
    from ddim_inversion.params import InversionParams

    return InversionParams.model_fields[name].default


def _add_inversion_params(parser: argparse.ArgumentParser) -> None:
    """The engine parameters of `local`."""
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=_default("negative_prompt"))
    parser.add_argument(
        "--steps", type=int, default=_default("num_inference_steps"), dest="num_inference_steps"
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="default 1.0 (no guidance); 7.5 with --method null_text",
    )
    parser.add_argument("--resolution", default=None, help="512 or WxH, e.g. 768x512")
    parser.add_argument(
        "--resize-mode", choices=["center_crop", "stretch"], default=_default("resize_mode")
    )
    parser.add_argument(
        "--encode", choices=["mean", "sample"], default=_default("encode_mode"), dest="encode_mode"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--trajectory", action="store_true", dest="return_trajectory")
    parser.add_argument(
        "--result-dtype", choices=["float32", "float16"], default=_default("result_dtype")
    )
    parser.add_argument(
        "--scheduler",
        type=_scheduler_override,
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="DDIMInverseScheduler overrides, e.g. timestep_spacing=trailing",
    )
    parser.add_argument(
        "--refine-iterations",
        type=int,
        default=_default("refine_iterations"),
        metavar="N",
        help="fixed-point iterations per step for exact inversion (one UNet call each); 0: off",
    )
    parser.add_argument(
        "--refine-tolerance",
        type=float,
        default=_default("refine_tolerance"),
        metavar="X",
        help="stop a step's refinement once the relative change is below X",
    )
    parser.add_argument(
        "--method",
        choices=["ddim", "null_text"],
        default=_default("method"),
        help="null_text: also optimise a null embedding per step (needs guidance > 1)",
    )
    parser.add_argument(
        "--null-text-inner-steps",
        type=int,
        default=_default("null_text_inner_steps"),
        metavar="N",
        help="Adam steps per step",
    )
    parser.add_argument(
        "--null-text-learning-rate",
        type=float,
        default=_default("null_text_learning_rate"),
        metavar="LR",
        help="Adam rate",
    )
    parser.add_argument(
        "--null-text-early-stop",
        type=float,
        default=_default("null_text_early_stop"),
        metavar="X",
        help="stop a step's optimisation once the latent MSE is below X",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="sample back and decode: reconstruction error and PSNR (local: also a PNG)",
    )


def _params_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": (
            args.guidance_scale
            if args.guidance_scale is not None
            else (7.5 if args.method == "null_text" else 1.0)
        ),
        "resolution": args.resolution,
        "resize_mode": args.resize_mode,
        "encode_mode": args.encode_mode,
        "seed": args.seed,
        "return_trajectory": args.return_trajectory,
        "result_dtype": args.result_dtype,
        "scheduler": dict(args.scheduler),
        "refine_iterations": args.refine_iterations,
        "refine_tolerance": args.refine_tolerance,
        "method": args.method,
        "null_text_inner_steps": args.null_text_inner_steps,
        "null_text_learning_rate": args.null_text_learning_rate,
        "null_text_early_stop": args.null_text_early_stop,
        "verify": args.verify,
    }


def _fail(message: str) -> int:
    print(f"ddim-invert: error: {message}", file=sys.stderr)
    return 2


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from worker.models import make_tiny_model

    print(make_tiny_model(args.directory))
    return 0


def cmd_local(args: argparse.Namespace) -> int:
    import time

    from pydantic import ValidationError
    from tqdm import tqdm

    from ddim_inversion import imaging
    from ddim_inversion.errors import InvalidParameter
    from ddim_inversion.params import InversionParams
    from worker.engine import InversionRequest, invert, progress_total
    from worker.models import ModelLoadError, limit_cpu_threads, load_model
    from worker.settings import get_settings

    settings = get_settings()
    limit_cpu_threads(settings.threads)
    if args.out and len(args.images) > 1:
        return _fail("--out takes one image; use --out-dir for several")
    try:
        params = InversionParams(**_params_from_args(args))
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
            args.model or settings.model,
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

    return run_submit(args, _params_from_args(args))


def cmd_gateway(args: argparse.Namespace) -> int:
    from service.main import run

    return run(host=args.host, port=args.port)


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run

    return run(burst=args.burst)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddim-invert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny-model", help="write the offline tiny model")
    tiny.add_argument("directory")
    tiny.set_defaults(func=cmd_make_tiny_model)

    local = sub.add_parser("local", help="invert images in-process, without Redis")
    local.add_argument("images", nargs="+", metavar="IMAGE")
    _add_inversion_params(local)
    local.add_argument("--model", default=None, help="folder, hub id or 'tiny' (INVERSION_MODEL)")
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
    _add_inversion_params(submit)
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
