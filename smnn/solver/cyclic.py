"""Block cyclic reduction: a parallel-in-time factorization (docs/solver.md, "Solving M u = r in
O(T)").

One level eliminates the odd-numbered steps of a block-tridiagonal SPD system at once (given the
even steps they are independent), which leaves a block-tridiagonal Schur complement on the even
steps; recurse until one step is left. This is block Cholesky in odd-even order: SPD throughout,
O(T n^3) work and ceil(log2 T) dependent levels instead of T dependent steps. Every level is a
few batched tensor ops over all eliminated steps (small-block kernels of
:mod:`smnn.solver.smallblocks`), so it runs on any device.

Any T: with an even step count the last odd step has no right neighbour (its coupling is zero).

Per level, with A the diagonal blocks, B_t = M_{t+1,t}, odd steps o = 2i+1 and even steps e:
    U_i = A_o^{-1} B_{o-1},  V_i = A_o^{-1} B_o^T
    A'_e = A_e - B_{e}^T U_{e+1} - B_{e-1} V_{e-1}      (terms with a missing neighbour absent)
    B'_i = -B_{2i+1} U_i                                  (coupling of evens 2i and 2i+2)
    r'_e = r_e - B_e^T w_{e+1} - B_{e-1} w_{e-1},  w_o = A_o^{-1} r_o
back-substitution: x_o = w_o - U_i x_{o-1} - V_i x_{o+1}.
The factors of every level are kept, so another right-hand side costs only the substitutions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smnn.solver.banded import pivot_tolerance
from smnn.solver.smallblocks import cholesky_lower, cholesky_solve

__all__ = ["CyclicReductionFactor", "factorize_cyclic"]


@dataclass
class _Level:
    """Factors of one reduction level (k = floor(T_l/2) odd steps eliminated).

    chol_odd (N, k, n, n); u, v (N, k, n, n); b_left = B_{2i} (N, k, n, n) and
    b_right = B_{2i+1} (N, k, n, n), zero-padded when the last odd step has no right
    neighbour (even step count).
    """

    chol_odd: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    b_left: torch.Tensor
    b_right: torch.Tensor
    n_steps: int  # steps at this level


@dataclass
class CyclicReductionFactor:
    """Cyclic-reduction factors of N block-tridiagonal systems (a
    :class:`~smnn.solver.factor.Factor`, like the sequential ones)."""

    levels: list[_Level]
    chol_last: torch.Tensor  # (N, n, n): Cholesky factor of the single remaining block
    failed_at: torch.Tensor  # (N,) int64: 1 + a step with a non-positive pivot, 0 if none
    n_steps: int

    @property
    def n_levels(self) -> int:
        """Number of dependent reduction levels (ceil(log2 T) for T > 1)."""
        return len(self.levels)

    @property
    def n_systems(self) -> int:
        return self.chol_last.shape[0]

    @property
    def block_size(self) -> int:
        return self.chol_last.shape[-1]

    def failed(self) -> torch.Tensor:
        return self.failed_at > 0

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """Solve M x = rhs for ``rhs`` ``(N, T, n, P)``; returns ``(N, T, n, P)``."""
        N, T, n = self.n_systems, self.n_steps, self.block_size
        if rhs.dim() != 4 or tuple(rhs.shape[:3]) != (N, T, n):
            raise ValueError(
                f"rhs must have shape (N={N}, T={T}, n={n}, P), got {tuple(rhs.shape)}"
            )
        rhs = rhs.to(self.chol_last.dtype)
        saved_w = []
        r = rhs
        for level in self.levels:
            n_even = (level.n_steps + 1) // 2
            n_odd = level.n_steps // 2
            r_even, r_odd = r[:, 0::2], r[:, 1::2]
            w = cholesky_solve(level.chol_odd, r_odd)
            r_new = r_even.clone()
            r_new[:, :n_odd] -= level.b_left.transpose(-1, -2) @ w
            r_new[:, 1:] -= (level.b_right @ w)[:, : n_even - 1]
            saved_w.append(w)
            r = r_new
        x = cholesky_solve(self.chol_last[:, None], r)  # (N, 1, n, P)
        for level, w in zip(reversed(self.levels), reversed(saved_w), strict=True):
            n_odd = level.n_steps // 2
            right = x[:, 1:]
            if right.shape[1] < n_odd:  # even step count: the last odd step has no right even
                right = F.pad(right, (0, 0, 0, 0, 0, 1))
            x_odd = w - level.u @ x[:, :n_odd] - level.v @ right
            full = x.new_empty(x.shape[0], level.n_steps, *x.shape[2:])
            full[:, 0::2] = x
            full[:, 1::2] = x_odd
            x = full
        return x


def factorize_cyclic(diag: torch.Tensor, sub: torch.Tensor) -> CyclicReductionFactor:
    """Cyclic reduction of ``diag`` ``(N, T, n, n)`` and ``sub`` ``(N, T-1, n, n)``.

    Pivot failures are recorded in ``failed_at`` (the factors of failed systems hold NaN).
    """
    diag = diag.detach()
    sub = sub.detach()
    N, T, n, _ = diag.shape
    failed_at = torch.zeros(N, dtype=torch.int64, device=diag.device)
    levels: list[_Level] = []
    a, b = diag, sub
    # original diagonal entries of the steps at this level: a pivot below n * eps of its
    # entry is rounding noise, a failure (smnn.solver.banded.pivot_tolerance)
    floor = pivot_tolerance(n, diag.dtype) * diag.diagonal(dim1=-2, dim2=-1)  # (N, T, n)
    stride = 1  # original-step distance between neighbouring steps at this level
    while a.shape[1] > 1:
        steps = a.shape[1]
        n_even, n_odd = (steps + 1) // 2, steps // 2
        a_even, a_odd = a[:, 0::2], a[:, 1::2]
        b_left = b[:, 0::2]  # B_{2i}: odd 2i+1 to its left even (n_odd blocks)
        b_right = b[:, 1::2]  # B_{2i+1}: odd 2i+1 to its right even (one short for even T)
        if b_right.shape[1] < n_odd:
            b_right = F.pad(b_right, (0, 0, 0, 0, 0, 1))
        chol_odd, bad = cholesky_lower(a_odd)
        bad = bad | _negligible(chol_odd, floor[:, 1::2])
        _record_failures(failed_at, bad, first_step=stride, stride=2 * stride)
        u = cholesky_solve(chol_odd, b_left)
        v = cholesky_solve(chol_odd, b_right.transpose(-1, -2))
        a_new = a_even.clone()
        a_new[:, :n_odd] -= b_left.transpose(-1, -2) @ u
        a_new[:, 1:] -= (b_right @ v)[:, : n_even - 1]
        b_new = -(b_right @ u)[:, : n_even - 1]
        levels.append(_Level(chol_odd, u, v, b_left, b_right, steps))
        a, b = a_new, b_new
        floor = floor[:, 0::2]
        stride *= 2
    chol_last, bad = cholesky_lower(a[:, 0])
    bad = bad | _negligible(chol_last, floor[:, 0])
    _record_failures(failed_at, bad[:, None], first_step=0, stride=1)
    if bool((failed_at > 0).any()):  # finite factors of a negligible pivot: make them NaN
        chol_last = chol_last.masked_fill((failed_at > 0)[:, None, None], float("nan"))
    return CyclicReductionFactor(levels, chol_last, failed_at, T)


def _negligible(chol: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """``(...)`` bool: a pivot diag(chol)^2 of the block is not above its ``floor`` ``(..., n)``."""
    return ~(chol.diagonal(dim1=-2, dim2=-1).square() > floor).all(dim=-1)


def _record_failures(failed_at: torch.Tensor, bad: torch.Tensor, first_step: int, stride: int):
    """Store 1 + original step of the first failed block per system (in place), if none yet."""
    if not bool(bad.any()):
        return
    idx = torch.arange(bad.shape[1], device=bad.device)
    first = torch.where(bad, idx, torch.full_like(idx, bad.shape[1])).min(dim=1).values
    step = first_step + first * stride
    new = bad.any(dim=1) & (failed_at == 0)
    failed_at[new] = step[new] + 1
