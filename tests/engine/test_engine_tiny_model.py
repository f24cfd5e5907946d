"""The tiny models are bit-identical wherever and however often they are generated."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import EVENT_GUARD_S
from worker.tiny_model import tiny_model_dir

REPO = Path(__file__).resolve().parents[2]


def _digest(folder: Path) -> dict[str, str]:
    """sha256 per file; safetensors per tensor (their JSON headers may order keys freely)."""
    out: dict[str, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        if path.suffix == ".safetensors":
            for key, tensor in sorted(load_file(str(path)).items()):
                data = tensor.contiguous().view(-1).view(dtype=__import__("torch").uint8)
                digest = hashlib.sha256(data.numpy().tobytes())
                digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
                out[f"{name}:{key}"] = digest.hexdigest()
        elif path.suffix == ".json":
            out[name] = hashlib.sha256(
                json.dumps(json.loads(path.read_text()), sort_keys=True).encode()
            ).hexdigest()
        else:
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize(
    ("family", "name", "component"),
    [
        ("sd", "tiny", "text_encoder"),
        ("sd-v", "tiny-v", "text_encoder"),
        ("sdxl", "tiny-xl", "text_encoder_2"),
    ],
)
def test_tiny_model_is_identical_across_processes(
    cli, cli_env, tmp_path, model_cache_dir, family, name, component
):
    folders = [tmp_path / "a", tmp_path / "b"]
    procs = [
        subprocess.Popen(
            [*cli, "make-tiny-model", str(f), "--family", family],
            env=cli_env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for f in folders
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=EVENT_GUARD_S)
        assert proc.returncode == 0, err
    first, second = (_digest(f) for f in folders)
    assert any(k.startswith("unet/") and ":" in k for k in first)
    assert any(k.startswith(f"{component}/") and ":" in k for k in first)
    assert first == second
    # ... and equal to the one the model's name resolves to, generated in-process.
    assert _digest(tiny_model_dir(model_cache_dir, name)) == first
