"""How far two evaluations of the same inversion may differ by rounding alone: the bounds
that tests comparing float32 (or float64) results use, derived once here.

Two runs of the same DDIM loop differ where their kernels sum in another order: a row in a
batch or alone, another thread count, another CPU's vector width (AVX2, AVX-512). Each
UNet output element is a sum of up to 3 * 3 * 128 = 1152 products (the widest convolution
of the tiny models' UNet, 64 channels and the 64 of the skip connection), so its rounding
is about sqrt(1152) = 34 eps relative (random walk); under guidance g, eps_u + g (eps_c -
eps_u) carries the two outputs' errors with weights |1 - g| + g <= 1 + 2g; and each step
adds its error to z. Hence, for `steps` steps and latents of size `scale`:

    drift = steps * (1 + 2g) * 34 * eps * scale

Measured on the tiny model (10 steps, |z| <= 1.04, 2-core AMD EPYC, float32): a batched row
and the same row alone differ by 2.4e-6 unguided (drift 1.2e-4, 50x) and 1.8e-5 at g = 2.5
(drift 2.4e-4, 13x); the float32 run and the float64 one differ by the same order. Float64
runs differ by 1e-14 (drift 4.5e-13 at g = 2.5, 10 steps, 45x). A wrong equation (a shifted
timestep, a v taken for an eps, a leaked row) moves latents by 1e-2 or more.
"""

from __future__ import annotations

from typing import Any

EPS32 = 2.0**-23
"""float32's machine epsilon (torch.finfo(torch.float32).eps), 1.19e-7."""
EPS64 = 2.0**-52
"""float64's machine epsilon, 2.2e-16."""
UNET_ROUNDING = 34
"""Relative rounding of one UNet output element, in eps: sqrt of its 1152-term sums."""


def drift(steps: int, guidance: float = 1.0, scale: float = 1.0, eps: float = EPS32) -> float:
    """What rounding may leave between two runs of a `steps`-step loop at guidance
    `guidance` over latents of size `scale` (see the module's docstring)."""
    return steps * (1 + 2 * guidance) * UNET_ROUNDING * eps * scale


def size(*tensors: Any) -> float:
    """The largest |element| of tensors or arrays: the `scale` of `drift`."""
    return max(float(abs(t).max()) for t in tensors)


def figure_tolerance(steps: int, guidance: float, figure: float) -> float:
    """How far a reconstruction figure ||z' - z_0|| / ||z_0|| of a float32 sampling loop may
    move when the same loop runs elsewhere (verify's in the engine, a test's own): z' moves
    by `drift` of its size, which moves the figure by as much relative to itself when z'
    is far from z_0 (figure > 1), and relative to ||z_0||, absolutely, when it is near
    (up to sqrt(256) max|z_0| / ||z_0|| = 3.4 times on the tiny latents); 10x that."""
    return 10 * drift(steps, guidance) * max(1.0, figure)
