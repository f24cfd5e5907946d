"""`ddim-invert submit` (its arguments are parsed in ddim_inversion_cli/main.py): send an image to a
running service, optionally wait for the job and download the latents.

Exit status: 0 on success, 1 when the job failed, was canceled or did not finish within
--timeout, 2 when a request was refused or the gateway could not be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ddim_inversion_client.errors import InversionError, JobFailed
from ddim_inversion_client.sync import InversionClient


def _changed(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters that differ from the contract's defaults: the others need not travel."""
    from ddim_inversion.params import InversionParams

    fields = InversionParams.model_fields
    out: dict[str, Any] = {}
    for name, value in params.items():
        info = fields.get(name)
        if (
            info is not None
            and not info.is_required()
            and value == info.get_default(call_default_factory=True)
        ):
            continue
        out[name] = value
    return out


def _error(message: str, status: int) -> int:
    print(f"ddim-invert: error: {message}", file=sys.stderr)
    return status


def run_submit(args: argparse.Namespace, params: dict[str, Any]) -> int:
    """Submit `args.image` with `params` (from ddim_inversion_cli/flags.py); see the module doc."""
    image = Path(args.image)
    if not image.is_file():
        return _error(f"{image}: no such file", 2)
    fields = _changed(params)
    prompt = str(fields.pop("prompt"))
    with InversionClient(url=args.url) as client:
        try:
            job = client.submit(image, prompt, **fields)
        except InversionError as exc:
            return _error(str(exc), 2)
        print(json.dumps(job.data), flush=True)
        if not args.wait:
            return 0
        out = Path(args.out) if args.out else Path(f"{image.stem}.safetensors")
        try:
            _wait_with_bar(job, args.timeout)
            out.parent.mkdir(parents=True, exist_ok=True)
            job.download(out)
        except JobFailed as exc:
            return _error(f"job {exc.job_id} {exc.status}: {exc.code}: {exc.message}", 1)
        except TimeoutError as exc:
            return _error(str(exc), 1)
        except InversionError as exc:
            return _error(str(exc), 2)
    print(json.dumps({"id": job.id, "status": job.status, "out": str(out)}), flush=True)
    return 0


def _wait_with_bar(job: Any, timeout: float | None) -> None:
    from tqdm import tqdm

    with tqdm(desc="inverting", file=sys.stderr, leave=False, unit="step") as bar:

        def progress(step: int, total: int) -> None:
            bar.total = total
            bar.n = step
            bar.refresh()

        job.wait(timeout=timeout, on_progress=progress)
