"""`ddim-invert local` end to end in subprocesses, against the in-process engine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ddim_inversion import imaging
from ddim_inversion.params import InversionParams
from tests.conftest import EVENT_GUARD_S
from tests.rounding import drift, size
from worker.engine.dispatch import invert
from worker.engine.types import InversionRequest, load_result

REPO = Path(__file__).resolve().parents[2]


def _run(cli, env, *args, timeout=EVENT_GUARD_S):
    return subprocess.run(
        [*cli, "local", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def _in_process(model, image: str, **params):
    request = InversionRequest(
        imaging.open_image((REPO / image).read_bytes()), InversionParams(**params)
    )
    return invert(model, [request])[0]


def test_single_image_with_overrides(cli, cli_env, tmp_path, tiny, diff):
    out = tmp_path / "OUT.safetensors"
    proc = _run(
        cli,
        cli_env,
        "samples/chelsea.png",
        "--prompt",
        "a cat",
        "--steps",
        "10",
        "--scheduler",
        "timestep_spacing=trailing",
        "--trajectory",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0]["shape"] == [1, 4, 8, 8]
    assert lines[0]["out"] == str(out)
    tensors, metadata = load_result(out.read_bytes())
    assert metadata.scheduler_config["timestep_spacing"] == "trailing"
    expected = _in_process(
        tiny,
        "samples/chelsea.png",
        prompt="a cat",
        num_inference_steps=10,
        return_trajectory=True,
        scheduler={"timestep_spacing": "trailing"},
    )
    assert metadata == expected.metadata
    # Another process, maybe another thread count: float32 rounding (tests/rounding.py),
    # 1.2e-4 for 10 steps; measured 0 with equal thread counts.
    tolerance = drift(10, 1.0, size(expected.trajectory))
    assert diff(tensors["latents"], expected.latents) <= tolerance
    assert diff(tensors["trajectory"], expected.trajectory) <= tolerance
    assert tensors["timesteps"].tolist() == expected.timesteps.tolist()


def test_out_dir_two_images(cli, cli_env, tmp_path, tiny, diff):
    images = ["samples/chelsea.png", "samples/coffee.png"]
    proc = _run(
        cli, cli_env, *images, "--prompt", "a cat", "--steps", "10", "--out-dir", str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [line["file"] for line in lines] == images
    for image, line in zip(images, lines, strict=True):
        assert line["shape"] == [1, 4, 8, 8]
        target = tmp_path / f"{Path(image).stem}.safetensors"
        assert Path(line["out"]) == target
        tensors, _ = load_result(target.read_bytes())
        expected = _in_process(tiny, image, prompt="a cat", num_inference_steps=10)
        # The CLI batches the two images, this run takes each alone: float32 rounding
        # (tests/rounding.py), 1.2e-4 for 10 steps; measured 3.9e-6.
        assert diff(tensors["latents"], expected.latents) <= drift(10, 1.0, size(expected.latents))


@pytest.fixture
def local_in_process(cli_env, monkeypatch, capsys):
    """`ddim-invert local` through its main() in this process, in the CLI tests' environment:
    a refusal needs no fresh interpreter (the runs above prove the installed entry point).
    Returns run(*args) -> (exit code, stderr)."""
    from ddim_inversion_cli import main as cli
    from worker.settings import get_settings

    for name, value in cli_env.items():
        if name.startswith("INVERSION_"):
            monkeypatch.setenv(name, value)
    get_settings.cache_clear()

    def run(*args: str) -> tuple[int, str]:
        code = cli.main(["local", *args])
        return code, capsys.readouterr().err

    yield run
    get_settings.cache_clear()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--resolution", "100"], ["resolution"]),
        (["--model", "nobody-here/no-such-model"], ["not in the Hugging Face cache"]),
        (["--scheduler", "beta_schedule=cosine"], ["beta_schedule"]),
    ],
)
def test_refusals_exit_2(local_in_process, tmp_path, args, needles):
    code, stderr = local_in_process(
        "samples/chelsea.png", "--prompt", "x", "--out", str(tmp_path / "o"), *args
    )
    assert code == 2, stderr
    for needle in needles:
        assert needle in stderr
    assert not (tmp_path / "o").exists()


SD_COMPONENTS = {
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", "PNDMScheduler"],
}


@pytest.mark.parametrize(
    "index",
    [
        {
            "_class_name": "StableDiffusion3Pipeline",
            **SD_COMPONENTS,
            "transformer": ["diffusers", "SD3Transformer2DModel"],
            "text_encoder_3": ["transformers", "T5EncoderModel"],
        },
        {
            "_class_name": "FluxPipeline",
            **SD_COMPONENTS,
            "transformer": ["diffusers", "FluxTransformer2DModel"],
        },
        {
            "_class_name": "StableDiffusionInpaintPipeline",
            **SD_COMPONENTS,
            "unet": ["diffusers", "UNet2DConditionModel"],
        },
    ],
    ids=["sd3", "flux", "inpainting"],
)
def test_unsupported_families_are_refused_naming_the_supported(local_in_process, tmp_path, index):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    code, stderr = local_in_process("samples/chelsea.png", "--prompt", "x", "--model", str(folder))
    assert code == 2, stderr
    assert index["_class_name"] in stderr
    assert "not supported" in stderr
    assert "Stable Diffusion 1.x/2.x" in stderr
    assert "SDXL" in stderr
