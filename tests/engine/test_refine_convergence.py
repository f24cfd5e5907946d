"""The refinement's solver: Anderson acceleration converges where plain fixed-point
iteration oscillates, costs no more UNet calls than plain iteration where that converges,
and says which steps did not converge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ddim_inversion import imaging
from ddim_inversion.params import InversionParams
from tests.conftest import worker_threads
from worker.engine.anderson import Anderson
from worker.engine.dispatch import invert
from worker.engine.types import InversionRequest, InversionResult
from worker.models import LoadedModel, load_model

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
PROMPT = "a cat on a sofa"


def linear_map(eigenvalues: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """J = Q diag(eigenvalues) Q^T with a random orthogonal Q, and a random offset b."""
    generator = torch.Generator().manual_seed(seed)
    size = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q @ torch.diag(eigenvalues) @ q.T, torch.randn(size, generator=generator).double()


def iterate(jacobian: torch.Tensor, offset: torch.Tensor, solver: Anderson | None) -> list[float]:
    """Relative residuals ||g(x) - x|| / ||g(x)|| of 30 evaluations of g(x) = J x + b."""
    x = torch.zeros_like(offset)
    residuals = []
    for _ in range(30):
        gx = jacobian @ x + offset
        residuals.append(float((gx - x).norm() / gx.norm()))
        x = gx if solver is None else solver.next(0, x, gx)
    return residuals


def test_anderson_converges_where_plain_iteration_oscillates():
    # Two directions with eigenvalues -1.5 and -3 make plain iteration oscillate with a
    # growing amplitude (the refined SDXL step's failure); the other 62 contract by 0.3.
    eigenvalues = torch.cat([torch.tensor([-1.5, -3.0]), torch.linspace(-0.3, 0.3, 62)]).double()
    jacobian, offset = linear_map(eigenvalues, seed=0)
    plain = iterate(jacobian, offset, None)
    accelerated = iterate(jacobian, offset, Anderson(1, memory=4))
    assert plain[-1] > plain[0], plain
    # I - J has eigenvalues in [0.7, 4]: condition 6, so float64 solves it to about
    # 6 x 2.2e-16 relative; Anderson's few extra directions and 30 float64 sums add at most
    # 30 x that. 1e-12 leaves over 100x margin.
    assert min(accelerated) < 1e-12, accelerated


def test_damped_restart_contracts_what_anderson_cannot_model():
    """A row whose residual grows restarts with a damped step x + f / 2; its history is
    its own, so a second row's iterates are those it would have alone."""
    eigenvalues = torch.cat([torch.tensor([-2.5]), torch.linspace(-0.2, 0.2, 31)]).double()
    jacobian, offset = linear_map(eigenvalues, seed=1)
    alone = iterate(jacobian, offset, Anderson(1, memory=1))
    solver = Anderson(2, memory=1)
    x = torch.zeros(2, offset.numel(), dtype=torch.float64)
    together = []
    for _ in range(30):
        gx = torch.stack([jacobian @ x[0] + offset, torch.full_like(offset, 7.0)])
        together.append(float((gx[0] - x[0]).norm() / gx[0].norm()))
        x = torch.stack([solver.next(row, x[row], gx[row]) for row in range(2)])
    assert together == alone
    # float64: I - J's condition is 3.5/0.8, so 1e-12 is over 100x the attainable 1e-15.
    assert min(alone) < 1e-12, alone


class PlainFixedPoint:
    """Yesterday's refinement, from the equations: z <- g(z) until the relative change is
    below the tolerance, one UNet call per evaluation of g."""

    def __init__(self, model: LoadedModel, reference: Any) -> None:
        self.model = model
        self.reference = reference
        self.calls = 0

    def g(self, z: torch.Tensor, source: torch.Tensor, t: int, text: Any, alphas: Any) -> Any:
        a_cur, a_next = alphas
        self.calls += 1
        eps = self.model.unet(z, t, encoder_hidden_states=text).sample
        x0 = (source - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
        return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps

    @torch.no_grad()
    def invert(self, array: np.ndarray, steps: int, iterations: int, tolerance: float) -> Any:
        """Per step: (iterations run, the last relative change)."""
        alphas_cumprod = self.reference.sd_alphas_cumprod()
        ratio = 1000 // steps
        z = self.reference.encode_image(array)
        text = self.reference.encode_text(PROMPT)
        per_step = []
        for t in (i * ratio + 1 for i in range(steps)):
            alphas = (alphas_cumprod[max(t - ratio, 0)], alphas_cumprod[t])
            z_next = self.g(z, z, t, text, alphas)
            run, change = 0, float("inf")
            while run < iterations and not change < tolerance:
                new = self.g(z_next, z, t, text, alphas)
                change = float((new - z_next).norm() / new.norm())
                z_next, run = new, run + 1
            per_step.append((run, change))
            z = z_next
        return per_step


def test_refinement_takes_no_more_unet_calls_than_plain_fixed_point(
    tiny64, ref64, sample_arrays, count_unet_calls
):
    """Each photograph, 25 steps: the engine converges wherever plain iteration does, in no
    more UNet calls in all nor on the steps plain iteration solved. (The step from t=1 to
    t=41 converges under neither within 30 iterations on the tiny model: its Jacobian
    reaches outside the unit circle as tiny-xl's does below.)"""
    tolerance, steps, iterations = 1e-8, 25, 30
    params = InversionParams(
        prompt=PROMPT,
        num_inference_steps=steps,
        refine_iterations=iterations,
        refine_tolerance=tolerance,
    )
    calls = count_unet_calls(tiny64)
    for name, array in sample_arrays.items():
        calls.clear()
        with worker_threads():  # one thread: two fight over a shared CPU's cores
            (result,) = invert(tiny64, [InversionRequest(array, params)])
            assert result is not None
            engine_calls = len(calls)
            plain = PlainFixedPoint(tiny64, ref64)
            per_step = plain.invert(array, steps, iterations, tolerance)
        counts = result.metadata.refine_iterations
        solved = [step for step, (_, change) in enumerate(per_step) if change < tolerance]
        unconverged = result.metadata.refine_unconverged_steps
        assert not set(unconverged) & set(solved), (name, unconverged, per_step)
        assert engine_calls <= plain.calls, (name, engine_calls, plain.calls)
        engine_solved = sum(counts[step] for step in solved)
        assert engine_solved <= sum(per_step[step][0] for step in solved), (counts, per_step)


@pytest.fixture(scope="module")
def sdxl_case(model_cache_dir: Path) -> dict[str, InversionResult]:
    """The issue's case: tiny SDXL in float64, a 128x128 photograph, 10 steps, plain and
    refined with 30 iterations, both sampled back (verify)."""
    model = load_model("tiny-xl", device="cpu", dtype="float64", cache_dir=model_cache_dir)
    image = imaging.open_image((SAMPLES / "chelsea.png").read_bytes())
    common = {"prompt": PROMPT, "num_inference_steps": 10, "resolution": 128, "verify": True}
    results = {}
    for name, extra in (("plain", {}), ("refined", {"refine_iterations": 30})):
        params = InversionParams(**common, refine_tolerance=1e-10, **extra)
        with worker_threads():
            (results[name],) = invert(model, [InversionRequest(image, params)])
    return results


def test_sdxl_refinement_names_exactly_the_steps_above_tolerance(sdxl_case):
    refined = sdxl_case["refined"].metadata
    residuals = refined.refine_residuals
    assert residuals is not None and len(residuals) == 10
    above = [step for step, residual in enumerate(residuals) if not residual < 1e-10]
    assert refined.refine_unconverged_steps == above
    assert all(n == 30 for step, n in enumerate(refined.refine_iterations) if step in above)
    assert sdxl_case["plain"].metadata.refine_unconverged_steps is None
    # An unconverged step keeps its best iterate: the refined inversion still samples back
    # closer than the plain one.
    plain_error = sdxl_case["plain"].metadata.reconstruction_latent_error
    assert refined.reconstruction_latent_error < plain_error


@pytest.mark.xfail(
    strict=True,
    reason="tiny-xl's step t=1 -> 101: the Jacobian of g at the plain step has spectral "
    "radius 1.53 and 81 of 1024 eigenvalues outside the unit circle, around 1 as well as -1; "
    "no Anderson, Krylov or damped combination (a residual polynomial p with p(1) = 1) "
    "shrinks such a spectrum, so 30 evaluations end near 0.2",
)
def test_sdxl_refinement_meets_the_issue_targets(sdxl_case):
    refined = sdxl_case["refined"].metadata
    assert max(refined.refine_residuals) < 1e-10
    plain_error = sdxl_case["plain"].metadata.reconstruction_latent_error
    assert refined.reconstruction_latent_error * 100 <= plain_error
