"""A cancel (or a deadline) stops a row inside every phase, and the other rows of the batch
still get exactly their solo results.

The engine calls `check_canceled` between its units of work: before each VAE encode, each
step, each refine iteration, each null-text iteration, each verify step and each decode.
Each test stops the middle row of three at a moment inside one phase (found with a hook
on the UNet or the VAE, never by time), then checks that the row's work stopped right
there (the batch sizes the UNet and the VAE saw next), that its result is None, and that
the other rows equal what each gives alone (float64: batching is exact to 1e-10).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from ddim_inversion.params import InversionParams
from worker.engine.dispatch import invert
from worker.engine.types import InversionRequest, InversionResult
from worker.models import LoadedModel

TOLERANCE = 1e-10
"""float64 latents, batched and alone: the kernels' summation order only (measured 1.4e-14
after 3 steps); 1e-10 leaves 7000x and is 1e3 below what float32 rounding would leave."""
NAMES = ("chelsea", "astronaut", "coffee")
VICTIM = 1
MEASURED = (
    "refine_residuals",
    "null_text_losses",
    "reconstruction_psnr",
    "reconstruction_latent_error",
)
"""Metadata figures computed from the latents: equal to rounding, not bit for bit. Their
relative change is the latents' (1e-14); rel 1e-9 leaves 1e5 and abs 1e-12 covers a figure
near zero (a converged residual), whose change is 1e-14 of the latents' size."""


class Calls:
    """Batch sizes of each forward of the hooked modules, in order, tagged by module."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.seen: list[tuple[str, int]] = []
        self.handles = [
            module.register_forward_pre_hook(self._hook(name), with_kwargs=True)
            for name, module in modules.items()
        ]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            sample = args[0] if args else next(iter(kwargs.values()))
            self.seen.append((name, int(sample.shape[0])))

        return hook

    def sizes(self, name: str) -> list[int]:
        return [size for seen, size in self.seen if seen == name]

    def count(self, name: str) -> int:
        return len(self.sizes(name))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def calls(tiny64: LoadedModel) -> Iterator[Calls]:
    hooked = Calls(
        {"unet": tiny64.unet, "encode": tiny64.vae.encoder, "decode": tiny64.vae.decoder}
    )
    yield hooked
    hooked.close()


def requests_of(sample_arrays: dict, **params: Any) -> list[InversionRequest]:
    common = {"num_inference_steps": 3} | params
    return [
        InversionRequest(sample_arrays[name], InversionParams(prompt=f"a {name}", **common))
        for name in NAMES
    ]


def stop_victim_when(condition: Callable[[], bool]) -> Callable[[list[int]], list[int]]:
    """A cancel check that stops the victim from the first check at which `condition` holds."""

    def check(active: list[int]) -> list[int]:
        return [VICTIM] if VICTIM in active and condition() else []

    return check


def assert_others_equal_solo(
    model: LoadedModel, requests: list[InversionRequest], results: list[InversionResult | None]
) -> None:
    assert results[VICTIM] is None
    for index, (request, together) in enumerate(zip(requests, results, strict=True)):
        if index == VICTIM:
            continue
        (alone,) = invert(model, [request])
        assert together is not None and alone is not None
        assert float((together.latents - alone.latents).abs().max()) <= TOLERANCE
        ours, theirs = together.metadata.model_dump(), alone.metadata.model_dump()
        for name in MEASURED:
            mine, reference = ours.pop(name), theirs.pop(name)
            assert (mine is None) == (reference is None)
            if reference is not None:
                assert mine == pytest.approx(reference, rel=1e-9, abs=1e-12)
        assert ours == theirs
        if alone.reconstruction_png is not None:
            assert together.reconstruction_png == alone.reconstruction_png


def test_stopped_before_its_vae_encode(tiny64, sample_arrays, calls):
    requests = requests_of(sample_arrays)
    # Stopped once the first image is encoded: its own encode never runs.
    check = stop_victim_when(lambda: calls.count("encode") >= 1)
    results = invert(tiny64, requests, check_canceled=check)
    assert calls.count("encode") == 2
    assert calls.sizes("unet")[0] == 2
    calls.close()
    assert_others_equal_solo(tiny64, requests, results)


def test_stopped_between_refine_iterations(tiny64, sample_arrays, calls):
    # A tolerance no row meets: every step runs 1 + 3 UNet calls.
    requests = requests_of(sample_arrays, refine_iterations=3, refine_tolerance=1e-300)
    # Stopped after the second step's first refine iteration.
    check = stop_victim_when(lambda: calls.count("unet") >= 6)
    results = invert(tiny64, requests, check_canceled=check)
    assert calls.sizes("unet") == [3] * 4 + [3, 3, 2, 2] + [2] * 4
    calls.close()
    assert_others_equal_solo(tiny64, requests, results)


def test_stopped_between_null_text_iterations(tiny64, sample_arrays, calls):
    params = {
        "method": "null_text",
        "guidance_scale": 3.0,
        "null_text_inner_steps": 3,
        "null_text_early_stop": 0.0,
    }
    requests = requests_of(sample_arrays, **params)
    # The pivot takes 3 UNet calls; the first sampling step then evaluates eps_c (1) and
    # one inner iteration (1): stopped before its second inner iteration.
    check = stop_victim_when(lambda: calls.count("unet") >= 5)
    results = invert(tiny64, requests, check_canceled=check)
    assert calls.sizes("unet")[:6] == [3, 3, 3, 3, 3, 2]
    calls.close()
    assert_others_equal_solo(tiny64, requests, results)


def test_stopped_during_verify_sampling(tiny64, sample_arrays, calls):
    requests = requests_of(sample_arrays, verify=True)
    # The inversion takes 3 UNet calls, then verify samples back: stopped after its first.
    check = stop_victim_when(lambda: calls.count("unet") >= 4)
    results = invert(tiny64, requests, check_canceled=check)
    assert calls.sizes("unet") == [3, 3, 3, 3, 2, 2]
    assert calls.sizes("decode") == [1, 1], "the stopped row is never decoded"
    calls.close()
    assert_others_equal_solo(tiny64, requests, results)


def test_stopped_between_verify_decodes(tiny64, sample_arrays, calls):
    requests = requests_of(sample_arrays, verify=True)
    # Rows are decoded one per call; the victim is stopped once the first is decoded.
    check = stop_victim_when(lambda: calls.count("decode") >= 1)
    results = invert(tiny64, requests, check_canceled=check)
    assert calls.count("decode") == 2
    calls.close()
    assert_others_equal_solo(tiny64, requests, results)
