"""Anderson acceleration of a fixed-point iteration x = g(x), one history per row.

Plain iteration x <- g(x) converges only where g contracts; where its Jacobian has an
eigenvalue below -1 it oscillates for ever (a refined DDIM step of a model whose noise
prediction is steep in z). Anderson acceleration (type II, as AIDI, Pan et al. 2023, uses
it) keeps the last `memory` iterates x_i and residuals f_i = g(x_i) - x_i and steps to

    x_next = g(x_k) - dG gamma,   gamma = argmin ||f_k - dF gamma||

with dF, dG the differences of consecutive residuals and values of g: the combination of
recent iterates whose linearised residual is smallest. On a linear map it is a Krylov
method (GMRES-equivalent), so it converges where plain iteration diverges; on a
contraction it needs no more evaluations than plain iteration in practice. A step that did
not reduce the residual norm means the secant model is wrong there: the row forgets its
history and takes a damped step x + damping * f, which contracts any map whose Jacobian's
eigenvalues lie in (1 - 2 / damping, 1) along the way.

Each row has its own history: rows of a batch converge independently, and a row's next
iterate depends only on its own iterates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _History:
    """One row's last iterates and residuals (flattened), oldest first."""

    xs: list[torch.Tensor] = field(default_factory=list)
    fs: list[torch.Tensor] = field(default_factory=list)
    norm: float = float("inf")
    """||f|| of the latest iterate."""


class Anderson:
    """Anderson acceleration with memory `memory` and a damped restart, for `rows` rows."""

    def __init__(self, rows: int, memory: int = 4, damping: float = 0.5) -> None:
        if memory < 1 or not 0.0 < damping <= 1.0:
            raise ValueError("Anderson needs memory >= 1 and 0 < damping <= 1")
        self.memory = memory
        self.damping = damping
        self.rows = [_History() for _ in range(rows)]

    def keep(self, rows: list[int]) -> None:
        """Keep only the rows at positions `rows`, in that order."""
        self.rows = [self.rows[row] for row in rows]

    def next(self, row: int, x: torch.Tensor, gx: torch.Tensor) -> torch.Tensor:
        """The next iterate of `row` after g(x) = gx was evaluated (same shape as x)."""
        history = self.rows[row]
        flat_x = x.flatten()
        f = gx.flatten() - flat_x
        norm = float(f.norm())
        if norm >= history.norm:
            # Not reduced: the secant model failed here; restart from a damped step.
            history.xs, history.fs, history.norm = [flat_x], [f], norm
            return x + self.damping * (gx - x)
        history.xs.append(flat_x)
        history.fs.append(f)
        history.norm = norm
        del history.xs[: -self.memory - 1], history.fs[: -self.memory - 1]
        if len(history.fs) == 1:
            return gx.clone()
        return _anderson_step(history, gx).view_as(x)


def _anderson_step(history: _History, gx: torch.Tensor) -> torch.Tensor:
    """g(x_k) - dG gamma, gamma the least-squares fit of f_k by the residual differences.

    Solved in float64 from the small Gram system with a ridge of float64 eps times its
    scale, so nearly parallel differences (late iterations in float32) give a bounded
    gamma rather than a blow-up.
    """
    fs = torch.stack(history.fs).double()
    xs = torch.stack(history.xs).double()
    d_f = (fs[1:] - fs[:-1]).T
    d_g = d_f + (xs[1:] - xs[:-1]).T
    gram = d_f.T @ d_f
    ridge = torch.finfo(torch.float64).eps * float(gram.diagonal().max())
    gram = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    gamma = torch.linalg.solve(gram, d_f.T @ fs[-1])
    step = gx.flatten().double() - d_g @ gamma
    return step.to(gx.dtype)
