"""Reshaping between the solver's natural layout and the canonical block-tridiagonal layout.

Two reshapes, both exact and differentiable:

- **Step pairing** (central smoothness): a block-pentadiagonal matrix with blocks of size m over T
  steps is block tridiagonal with blocks of size 2m over ceil(T/2) super-steps (steps 2k, 2k+1).
  An odd T gets one decoupled padding step (identity diagonal block, zero right-hand side), whose
  solution is exactly zero and is dropped.
- **Batch folding**: batch dims over which the left-hand side is shared (size 1 in its batch
  shape) become extra right-hand-side columns, so shared systems are factorized once.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover - typing only
    from smnn.solver.inputs import OdeProblem

__all__ = ["pair_steps", "pair_rhs", "unpair_solution", "BatchFolding"]


def pair_steps(
    diag: torch.Tensor, sub: torch.Tensor, sub2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block pentadiagonal -> block tridiagonal by pairing steps.

    Args:
        diag: ``(..., T, m, m)``; sub: ``(..., T-1, m, m)`` (M_{t+1,t});
        sub2: ``(..., T-2, m, m)`` (M_{t+2,t}).
    Returns:
        ``(..., T2, 2m, 2m)`` diagonal and ``(..., T2-1, 2m, 2m)`` sub-diagonal super-blocks,
        T2 = ceil(T/2).
    """
    T, m = diag.shape[-3], diag.shape[-1]
    pad = T % 2
    if pad:
        eye = torch.eye(m, dtype=diag.dtype, device=diag.device)
        diag = torch.cat([diag, eye.expand(*diag.shape[:-3], 1, m, m)], dim=-3)
        sub = F.pad(sub, (0, 0, 0, 0, 0, 1))
        sub2 = F.pad(sub2, (0, 0, 0, 0, 0, 1))
    even, odd = diag[..., 0::2, :, :], diag[..., 1::2, :, :]
    inner = sub[..., 0::2, :, :]  # M_{2k+1,2k}
    top = torch.cat([even, inner.transpose(-1, -2)], dim=-1)
    bottom = torch.cat([inner, odd], dim=-1)
    diag2 = torch.cat([top, bottom], dim=-2)

    a = sub2[..., 0::2, :, :]  # M_{2k+2,2k}
    b = sub[..., 1::2, :, :]  # M_{2k+2,2k+1}
    d = sub2[..., 1::2, :, :]  # M_{2k+3,2k+1}
    zero = torch.zeros_like(a)
    sub_top = torch.cat([a, b], dim=-1)
    sub_bottom = torch.cat([zero, d], dim=-1)
    subd = torch.cat([sub_top, sub_bottom], dim=-2)
    return diag2, subd


def pair_rhs(rhs: torch.Tensor) -> torch.Tensor:
    """``(..., T, m)`` -> ``(..., ceil(T/2), 2m)`` (zero padding step for odd T)."""
    T, m = rhs.shape[-2], rhs.shape[-1]
    if T % 2:
        rhs = F.pad(rhs, (0, 0, 0, 1))
    return rhs.reshape(*rhs.shape[:-2], (T + 1) // 2, 2 * m)


def unpair_solution(x: torch.Tensor, n_steps: int) -> torch.Tensor:
    """``(..., T2, 2m)`` -> ``(..., T, m)``: undo :func:`pair_rhs`."""
    m = x.shape[-1] // 2
    return x.reshape(*x.shape[:-2], 2 * x.shape[-2], m)[..., :n_steps, :]


@dataclass(frozen=True)
class BatchFolding:
    """Map between ``(*batch, T, n)`` right-hand sides and canonical ``(N, T, n, P)``.

    ``lhs_batch`` (the left-hand side's batch shape) broadcasts to ``batch``; dims where it is 1
    and ``batch`` is not go to the P columns, the others to the N systems.
    """

    batch: tuple[int, ...]
    lhs_batch: tuple[int, ...]

    def _dims(self) -> tuple[list[int], list[int]]:
        lhs = (1,) * (len(self.batch) - len(self.lhs_batch)) + tuple(self.lhs_batch)
        system_dims = [i for i, (a, b) in enumerate(zip(lhs, self.batch, strict=True)) if a == b]
        column_dims = [i for i in range(len(self.batch)) if i not in system_dims]
        return system_dims, column_dims

    @property
    def n_systems(self) -> int:
        return prod(self.lhs_batch)

    def fold_lhs(self, blocks: torch.Tensor) -> torch.Tensor:
        """``(*lhs_batch, T, n, n)`` -> ``(N, T, n, n)``."""
        return blocks.reshape(self.n_systems, *blocks.shape[-3:])

    def fold_rhs(self, rhs: torch.Tensor) -> torch.Tensor:
        """``(*batch, T, n)`` -> ``(N, T, n, P)``."""
        system_dims, column_dims = self._dims()
        L = len(self.batch)
        perm = system_dims + [L, L + 1] + column_dims
        x = rhs.permute(*perm)
        T, n = rhs.shape[-2], rhs.shape[-1]
        n_columns = prod(self.batch[i] for i in column_dims)  # explicit: n may be 0 (K = 0)
        return x.reshape(self.n_systems, T, n, n_columns)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, n, P)`` -> ``(*batch, T, n)``: inverse of :meth:`fold_rhs`."""
        system_dims, column_dims = self._dims()
        L = len(self.batch)
        T, n = x.shape[1], x.shape[2]
        sizes = [self.batch[i] for i in system_dims] + [T, n] + [self.batch[i] for i in column_dims]
        x = x.reshape(*sizes)
        perm = system_dims + [L, L + 1] + column_dims
        inverse = [0] * len(perm)
        for pos, dim in enumerate(perm):
            inverse[dim] = pos
        return x.permute(*inverse)


def fold_lhs_inputs(problem: OdeProblem, lhs_batch: tuple[int, ...]):
    """coefficients ``(N, Tc, E, m)`` and steps ``(N, Th)`` at the left-hand side's batch shape
    ``lhs_batch`` (N systems), for the lane and Triton engines."""
    c, h = problem.coefficients, problem.steps
    N = BatchFolding(tuple(problem.batch_shape), lhs_batch).n_systems
    E, m = problem.n_equations, problem.block_size
    coef = c.expand(*lhs_batch, *c.shape[-4:]).reshape(N, c.shape[-4], E, m)
    return coef, h.expand(*lhs_batch, h.shape[-1]).reshape(N, h.shape[-1])


def fold_rhs_inputs(problem: OdeProblem, folding: BatchFolding, rhs_equation, init_vars):
    """rhs_eq ``(N, Tb, E, P)`` and init ``(N, Su, D*K, P)``: the batch dims the left-hand side
    is shared over become the P columns."""
    batch = tuple(problem.batch_shape)
    D, K = problem.n_dims, problem.n_init_orders
    b, u0 = rhs_equation, init_vars
    rhs_eq = folding.fold_rhs(b.expand(*batch, *b.shape[-2:]))
    u0 = u0.expand(*batch, *u0.shape[-3:]).reshape(*batch, u0.shape[-3], D * K)
    return rhs_eq, folding.fold_rhs(u0)


@dataclass(frozen=True)
class EngineSizes:
    """The sizes and constants a compiled engine (lanes, QR lanes, Triton) needs besides the
    tensors: T, D, R, S, K, the weights (w_eq, w_in, w_s), central rows, and the kernels'
    threads (None: torch's count). Each engine subclasses it with its own derived values."""

    n_steps: int
    n_dims: int
    n_orders: int
    n_init_steps: int
    n_init_orders: int
    weights: tuple[float, float, float]  # w_eq, w_in, w_s
    central: bool = False
    threads: int | None = None

    @classmethod
    def of(cls, problem: OdeProblem, weights, central: bool, threads: int | None = None):
        """The sizes of ``problem`` with plain-number ``weights``."""
        return cls(
            problem.n_steps,
            problem.n_dims,
            problem.n_orders,
            problem.n_init_var_steps,
            problem.n_init_orders,
            tuple(float(w) for w in weights),
            bool(central),
            threads,
        )
