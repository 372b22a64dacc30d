"""The orthogonal (QR) least-squares solve on the CPU lane engine (docs/solver.md, "The orthogonal
(QR) solve").

``method="qr"`` on CPU with numba: the least-squares problem min ||A u - beta|| is solved by
Householder reflections of the stacked rows of A, block by block along T, never forming A^T A,
so the error grows with cond(A) instead of cond(A)^2 (float32 becomes usable). The kernels are
in :mod:`smnn.solver.qr_lane_kernels`; this module lays the lanes out and wraps them for
autograd.

- :func:`qr_lane_ode_forward`: u with gradients to every input. One forward kernel assembles,
  triangularises and back-substitutes; one backward kernel solves the adjoint
  lambda = (R^T R)^{-1} g with the stored triangular factor and chains the least-squares
  gradients (dl/dA = r lambda^T - (A lambda) u^T, dl/dbeta = A lambda, with the residual r
  rebuilt from the inputs) to coefficients, rhs_equation, init_vars and steps. No Q is kept.
- :func:`qr_lane_factorize`: the left-hand side triangularised once, *with its Householder
  reflectors kept* (not the semi-normal equations: those square the condition number of the
  right-hand side's path unless refined, and the reflectors cost only O(T n (p + n)) memory
  per system); every ``solve`` assembles the new right-hand side with the same code as the
  forward kernel, reflects it with the stored reflectors in the same order and
  back-substitutes, so ``factorize(...).solve`` equals :func:`qr_lane_ode_forward` to the bit.

float32: the Householder sweep runs in float32; the solution then gets mixed-precision
refinement (:func:`_refine`: residual and A^T r in float64 by a kernel, correction
(R^T R)^{-1} A^T r with the float32 R, until the next correction is predicted to be
negligible), which brings the error from about cond(A) * eps32 to a few 1e-8 on the problems of
tests/test_qr_lanes.py. The backward pass refines the adjoint the same way (the float32 solve
lambda = (R^T R)^{-1} g alone carries about cond(A)^2 * eps32, O(1) there) and chains the
gradients in float64 from the refined solution kept in float64, so float32 gradients match
float64 ones to a few 1e-8 as well.

Lanes. A lane holds one *item*: system n (a left-hand side) with one right-hand-side column p.
With one column per system (P = 1) the fused forward kernel runs on lanes of systems. With
P > 1 (a left-hand side shared by several right-hand sides: shared coefficients and steps) the
left-hand sides are triangularised once (lanes of systems, reflectors kept) and the columns are
reflected and solved on lanes of items; the backward pass runs on lanes of items and sums the
per-item gradients of the shared coefficients and steps in a fixed order. Groups of W = 32
lanes, or 8 below 64 items; lanes never mix, so the width does not change the bits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from smnn.solver import hugepages
from smnn.solver import qr_lane_kernels as kernels
from smnn.solver.banded import raise_if_failed
from smnn.solver.fused import _run_kernel as _run
from smnn.solver.inputs import OdeProblem, check_finite, check_values_of
from smnn.solver.layout import BatchFolding, EngineSizes
from smnn.solver.qr import RANK_TOLERANCE_FACTOR

__all__ = ["QrLaneFactor", "QrLaneLeftHandSide", "qr_lane_factorize", "qr_lane_ode_forward"]

WIDE, NARROW = 32, 8
# refinement of float32 solutions and adjoints (_refine): an item stops once its next correction,
# predicted from the ratio of its last two, is at most _REFINE_TOL times its size. Steps taken on
# the problems of tests/test_qr_lanes.py (solution, adjoint): KdV- and Lorenz-like 2 and 2, long
# (T = 4000) 5 and 6; with 2^-24 the long case's rhs_equation gradient was 1.3e-6 off, 2.7e-7 now
_REFINE_TOL = 2.0**-28
_REFINE_MAX_STEPS = 8
# eps of the float64 rank check of systems solved again in float64 (_resolve_in_float64): the
# singular problem of tests/test_qr.py (T = 5, 60, 400, both smoothness modes) fails the check
# from eps = 1e-15 up, its well-posed systems pass up to 1e-8 and beyond
_RESOLVE_RANK_EPS = 1e-12


def lane_width(n_items: int) -> int:
    """Lanes per group: 32, or 8 when fewer than two groups of 32 would be filled."""
    return WIDE if n_items >= 2 * WIDE else NARROW


@dataclass(frozen=True)
class _Sizes(EngineSizes):
    """What the QR lane kernels need besides the tensors (layout.EngineSizes); ``rank_eps``:
    the eps of the rank check where not :data:`smnn.solver.qr.RANK_TOLERANCE_FACTOR` times the
    working type's (appended to the weights array: block t fails where
    |R_t[j, j]| <= nb * rank_eps * ||A[:, j]||)."""

    rank_eps: float | None = None

    def args(self, dtype: torch.dtype) -> tuple:
        """(T, D, S, K, central, weights array, inverse factorials array) for the kernels."""
        wts, finv = _constants(self.n_orders, self.weights, dtype)
        # the torch path's margin (smnn.solver.qr.rank_tolerance): with eps alone, the global
        # null space of a system of smoothness rows only (polynomials of degree < R) showed in
        # its last R_t as rounding of 1-2 nb * eps and passed; factors 2-64 catch it at
        # T = 60-4000, and the well-posed systems keep their margin (test_qr_lanes)
        rank_eps = self.rank_eps
        if rank_eps is None:
            rank_eps = RANK_TOLERANCE_FACTOR * torch.finfo(dtype).eps
        wts = np.append(wts, wts.dtype.type(rank_eps))
        T, D = self.n_steps, self.n_dims
        return T, D, self.n_init_steps, self.n_init_orders, self.central, wts, finv

    def plan(self, n_equations: int) -> tuple:
        """The reflections' plan of :func:`qr_lane_kernels.supports` (made once per setting)."""
        return _plan(
            self.n_steps,
            self.n_dims,
            self.n_orders,
            n_equations,
            self.n_init_steps,
            self.n_init_orders,
            self.central,
        )

    def blocks(self, n_equations: int) -> tuple[int, int, int, int]:
        """(G, nb, TB, pmax) of :func:`qr_lane_kernels.block_sizes`."""
        return kernels.block_sizes(
            self.n_steps,
            self.n_dims,
            self.n_orders,
            n_equations,
            self.n_init_orders,
            self.central,
        )


@functools.lru_cache(maxsize=64)
def _plan(T: int, D: int, R: int, E: int, S: int, K: int, central: bool) -> tuple:
    return kernels.supports(T, D, R, E, S, K, central)


@functools.lru_cache(maxsize=64)
def _constants(n_orders: int, weights: tuple, dtype: torch.dtype):
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    wts = np.array(weights, dtype=np_dtype)
    finv = np.array([1.0 / np.prod(np.arange(1, k + 1)) for k in range(n_orders)], np_dtype)
    return wts, finv


def _sizes(problem: OdeProblem, weights, central: bool, threads: int | None = None) -> _Sizes:
    return _Sizes.of(problem, weights, central, threads)


def _fold_lhs(problem: OdeProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """coefficients (N, Tc, E, m) and steps (N, Th) at the left-hand side's batch shape."""
    lhs_batch = tuple(problem.lhs_batch_shape)
    c, h = problem.coefficients, problem.steps
    N = BatchFolding(tuple(problem.batch_shape), lhs_batch).n_systems
    coef = c.expand(*lhs_batch, *c.shape[-4:]).reshape(N, c.shape[-4], problem.n_equations, -1)
    steps = h.expand(*lhs_batch, h.shape[-1]).reshape(N, h.shape[-1])
    return coef, steps


def _fold_rhs(problem: OdeProblem, folding: BatchFolding):
    """rhs_equation (N, Tb, E, P) and init_vars (N, Su, D*K, P)."""
    batch = tuple(problem.batch_shape)
    D, K = problem.n_dims, problem.n_init_orders
    b, u0 = problem.rhs_equation, problem.init_vars
    rhs_eq = folding.fold_rhs(b.expand(*batch, *b.shape[-2:]))
    u0 = u0.expand(*batch, *u0.shape[-3:]).reshape(*batch, u0.shape[-3], D * K)
    return rhs_eq, folding.fold_rhs(u0)


def _empty(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


# The factors [R | S] (and reflectors) of a call on huge pages (smnn.solver.hugepages) only up to
# this size. Forward + backward over the LDL^T lane time, float64, 1 thread, alternating in one
# process on a loaded 2-core machine: coupled (factor 83 MB) 2.4x with huge pages, 3.0x
# without; SST (388 MB) 2.2x with, 1.8x without (the faults of many huge pages at once cost more
# than the 4 KiB faults they save there).
_HUGE_FACTOR_MAX_BYTES = 128 * 2**20


def _factor_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised factor array: on huge pages up to ``_HUGE_FACTOR_MAX_BYTES``."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes > _HUGE_FACTOR_MAX_BYTES:
        return torch.empty(shape, dtype=dtype)
    return hugepages.empty(shape, dtype)


@dataclass
class QrLaneFactor:
    """Triangular factors (and Householder reflectors) of N least-squares systems.

    Attributes:
        rs: ``(Gs, TB, nb, 2nb, W)``, [R_t | S_t] of every block (R_t upper triangular,
            A^T A = R^T R), by groups of W systems; nb = D*R unknowns per block (2 D*R with
            central rows, whose blocks pair steps).
        refl: ``(Gs, TB, pmax, 2nb, W)`` Householder vectors; taus: ``(Gs, TB, 2nb, W)``.
        coef: ``(N, Tc, E, m)``, steps: ``(N, Th)``: the inputs of the left-hand side.
        failed_at: ``(N,)`` int64, 1 + the first block whose R_t failed the rank check
            (:mod:`qr_lane_kernels`), 0 where none.
    """

    rs: torch.Tensor
    refl: torch.Tensor
    taus: torch.Tensor
    coef: torch.Tensor
    steps: torch.Tensor
    sizes: _Sizes
    failed_at: torch.Tensor
    bad_input: bool = False

    @property
    def n_systems(self) -> int:
        return self.coef.shape[0]

    @property
    def n_steps(self) -> int:
        return self.sizes.n_steps

    @property
    def block_size(self) -> int:
        return self.coef.shape[3]

    def failed(self) -> torch.Tensor:
        """``(N,)`` bool: systems whose factor failed the rank check."""
        return self.failed_at > 0

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """x = (A^T A)^{-1} rhs = R^{-1} R^{-T} rhs for ``rhs`` ``(N, T, m, P)``."""
        N, T, m = self.n_systems, self.n_steps, self.block_size
        if rhs.dim() != 4 or tuple(rhs.shape[:3]) != (N, T, m):
            raise ValueError(
                f"rhs must have shape (N={N}, T={T}, m={m}, P), got {tuple(rhs.shape)}"
            )
        return _solve_normal(self.rs, rhs.detach().to(self.rs.dtype), self.sizes)

    def solve_rhs(
        self,
        rhs_eq: torch.Tensor,
        init: torch.Tensor,
        keep64: bool = False,
        unconverged: bool = False,
    ):
        """u ``(N, T, m, P)`` for right-hand sides ``rhs_eq`` (N, Tb, E, P) and ``init``
        (N, Su, D*K, P) (contiguous); sets ``bad_input`` where a value was not finite. With
        ``keep64`` a float32 solution comes back in float64, as refined; with ``unconverged``
        also the ``(N, P)`` items whose refinement did not converge (:func:`_refine`)."""
        N, P = self.n_systems, rhs_eq.shape[3]
        T, m = self.n_steps, self.block_size
        dtype = self.rs.dtype
        out = hugepages.empty((N, T, m, P), dtype)
        W = lane_width(N * P)
        n_jobs = -(-N * P // W)
        bad = torch.zeros(max(n_jobs, 1), dtype=torch.int64)
        if P > 0:
            _run(
                kernels.solve,
                n_jobs,
                self.coef.numpy(),
                self.steps.numpy(),
                rhs_eq.numpy(),
                init.numpy(),
                *self.sizes.args(dtype),
                *self.sizes.plan(self.coef.shape[2]),
                W,
                self.rs.numpy(),
                self.refl.numpy(),
                self.taus.numpy(),
                out.numpy(),
                bad.numpy(),
                threads=self.sizes.threads,
            )
        self.bad_input = bool(bad.any())
        x, slow = _refine(
            self.rs, self.coef, self.steps, rhs_eq, init, out, self.sizes, None, keep64
        )
        return (x, slow) if unconverged else x


def _solve_normal(rs: torch.Tensor, rhs: torch.Tensor, sizes: _Sizes) -> torch.Tensor:
    """(R^T R)^{-1} rhs for ``rhs`` (N, T, m, P) with ``rs`` by groups of systems."""
    rhs = rhs.contiguous()
    out = hugepages.empty(tuple(rhs.shape), rhs.dtype)
    N, P = rhs.shape[0], rhs.shape[3]
    W = lane_width(N * P)
    if P > 0 and N > 0:
        _run(
            kernels.solve_normal,
            -(-N * P // W),
            rs.numpy(),
            rhs.numpy(),
            sizes.n_dims,
            sizes.central,
            W,
            out.numpy(),
            threads=sizes.threads,
        )
    return out


def _refine(
    rs, coef, steps, rhs_eq, init, u: torch.Tensor, sizes: _Sizes, plus=None, keep64=False
) -> torch.Tensor:
    """Below float64: mixed-precision refinement of a solution u ``(N, T, m, P)`` of the normal
    equations A^T A u = A^T beta + plus (corrected semi-normal equations):
    u <- u + (R^T R)^{-1} (A^T (beta - A u) + plus), the residual in float64 (kernel
    :func:`qr_lane_kernels.normal_residual` on float64 copies of the inputs; u kept in float64)
    and the correction from the working-precision R. Each item (system n, column p) stops once
    its next correction, predicted as the last one times the ratio of the last two (max norms
    over T and m), is at most ``_REFINE_TOL`` times its solution, after at most
    ``_REFINE_MAX_STEPS`` steps; an item's steps depend on its own values only, so its bits do
    not depend on the rest of the batch.

    The forward pass refines the solution (``plus`` None); the backward pass the adjoint
    lambda = (A^T A)^{-1} g (``rhs_eq`` and ``init`` zero, ``plus`` = g). Each step gains
    about 1 / (cond(A)^2 eps32) (20-1000x on the problems of tests/test_qr_lanes.py).

    Returns u in its own dtype (or in float64 with ``keep64``) and ``(N, P)`` bool, the items
    still correcting after the last step (whose float32 factor is too far from A for the
    refinement to converge in time: the callers solve them in float64); float64 solutions
    are returned as they are."""
    if u.dtype == torch.float64 or u.numel() == 0:
        return u, torch.zeros(u.shape[0], u.shape[3], dtype=torch.bool)
    f64 = torch.float64
    inputs = [t.to(f64).contiguous().numpy() for t in (coef, steps, rhs_eq, init)]
    T, D, S, K, central, wts, finv = sizes.args(f64)
    N, P = u.shape[0], u.shape[3]
    W = lane_width(N * P)
    u64 = u.to(f64).contiguous()
    plus = None if plus is None else plus.to(f64)
    active = torch.ones((N, 1, 1, P), dtype=torch.bool)
    last = None  # each item's previous correction (max norm)
    for _ in range(_REFINE_MAX_STEPS):
        r = hugepages.empty(tuple(u.shape), f64)
        _run(
            kernels.normal_residual,
            -(-N * P // W),
            *inputs,
            u64.numpy(),
            D,
            S,
            K,
            central,
            wts,
            finv,
            W,
            r.numpy(),
            threads=sizes.threads,
        )
        if plus is not None:
            r += plus
        du = _solve_normal(rs, r.to(u.dtype), sizes).to(f64)
        u64 = torch.where(active, u64 + du, u64)
        size = u64.abs().amax(dim=(1, 2), keepdim=True)
        step = du.abs().amax(dim=(1, 2), keepdim=True)
        # the next correction, predicted from the contraction of the last two
        ahead = step if last is None else step * torch.clamp(step / last, max=1.0)
        active &= ahead > _REFINE_TOL * size
        last = step
        if not bool(active.any()):
            break
    return (u64 if keep64 else u64.to(u.dtype)), active[:, 0, 0, :]


def _refined_adjoint(rs, coef, steps, grad: torch.Tensor, sizes: _Sizes) -> torch.Tensor:
    """lambda = (A^T A)^{-1} grad ``(N, T, m, P)`` in float64 for a float32 factor: the float32
    solve with R (error about cond(A)^2 * eps32, O(1) on the problems of tests/test_qr_lanes.py)
    refined by :func:`_refine`."""
    N, E, P = coef.shape[0], coef.shape[2], grad.shape[3]
    D, K = sizes.n_dims, sizes.n_init_orders
    zero_eq = torch.zeros((N, 1, E, P), dtype=grad.dtype)
    zero_init = torch.zeros((N, 1, D * K, P), dtype=grad.dtype)
    lam = _solve_normal(rs, grad, sizes)
    lam, slow = _refine(rs, coef, steps, zero_eq, zero_init, lam, sizes, plus=grad, keep64=True)
    idx = torch.nonzero(slow.any(dim=1)).flatten()
    if len(idx):
        # refinement too slow for these systems: their adjoint from a float64 factor
        f64 = torch.float64
        factor = _factorize(coef[idx].to(f64).contiguous(), steps[idx].to(f64).contiguous(), sizes)
        lam[idx] = factor.solve(grad[idx].to(f64))
    return lam


def _factorize(coef: torch.Tensor, steps: torch.Tensor, sizes: _Sizes) -> QrLaneFactor:
    """Triangularise the left-hand sides (lanes of systems), keeping the reflectors."""
    N, E = coef.shape[0], coef.shape[2]
    dtype = coef.dtype
    _, nb, TB, pmax = sizes.blocks(E)
    W = lane_width(N)
    Gs = -(-N // W)
    factor = QrLaneFactor(
        rs=_factor_empty((Gs, TB, nb, 2 * nb, W), dtype),
        refl=_factor_empty((Gs, TB, pmax, 2 * nb, W), dtype),
        taus=hugepages.empty((Gs, TB, 2 * nb, W), dtype),
        coef=coef,
        steps=steps,
        sizes=sizes,
        failed_at=torch.zeros(N, dtype=torch.int64),
    )
    bad = torch.zeros(Gs, dtype=torch.int64)
    _run(
        kernels.forward,
        Gs,
        coef.numpy(),
        steps.numpy(),
        _empty(dtype, N, 1, E, 0).numpy(),
        _empty(dtype, N, 1, 0, 0).numpy(),
        *sizes.args(dtype),
        *sizes.plan(E),
        W,
        False,
        _empty(dtype, N, sizes.n_steps, coef.shape[3], 0).numpy(),
        factor.rs.numpy(),
        factor.refl.numpy(),
        factor.taus.numpy(),
        factor.failed_at.numpy(),
        bad.numpy(),
        threads=sizes.threads,
    )
    factor.bad_input = bool(bad.any())
    return factor


@dataclass
class _Outcome:
    """What the forward pass reports besides u."""

    failed_at: torch.Tensor | None = None
    bad_input: bool = False
    unconverged: torch.Tensor | None = None  # (N,) bool: float32 refinement did not converge

    def failed(self) -> torch.Tensor:
        return self.failed_at > 0

    def to_resolve(self) -> torch.Tensor:
        """``(N,)`` bool: systems to solve again in float64 (failed or not converged)."""
        if self.unconverged is None:
            return self.failed()
        return self.failed() | self.unconverged


class _QrLaneSolve(torch.autograd.Function):
    """u = argmin ||A(c, h) u - beta(c, b, u0)|| in one forward and one backward kernel.

    forward(coef (N, Tc, E, m), steps (N, Th), rhs_eq (N, Tb, E, P), init (N, Su, D*K, P),
    sizes, outcome) -> x (N, T, m, P). Saved for backward: the inputs, x (in float64 for a
    float32 solve, as refined) and [R | S]."""

    @staticmethod
    def forward(ctx, coef, steps, rhs_eq, init, sizes: _Sizes, outcome: _Outcome):
        coef, steps, rhs_eq, init = (t.detach().contiguous() for t in (coef, steps, rhs_eq, init))
        N, E, m, P = coef.shape[0], coef.shape[2], coef.shape[3], rhs_eq.shape[3]
        dtype = coef.dtype
        if P > 1:
            factor = _factorize(coef, steps, sizes)
            bad_lhs = factor.bad_input
            x, slow = factor.solve_rhs(rhs_eq, init, keep64=True, unconverged=True)
            rs, by_system = factor.rs, True
            outcome.failed_at = factor.failed_at
            outcome.bad_input = bad_lhs or factor.bad_input
        else:
            _, nb, TB, _ = sizes.blocks(E)
            W = lane_width(N * P)
            Gi = -(-N * P // W)
            x = hugepages.empty((N, sizes.n_steps, m, P), dtype)
            rs = _factor_empty((Gi, TB, nb, 2 * nb, W), dtype)
            failed_at = torch.zeros(N * P, dtype=torch.int64)
            bad = torch.zeros(max(Gi, 1), dtype=torch.int64)
            if P > 0:
                _run(
                    kernels.forward,
                    Gi,
                    coef.numpy(),
                    steps.numpy(),
                    rhs_eq.numpy(),
                    init.numpy(),
                    *sizes.args(dtype),
                    *sizes.plan(E),
                    W,
                    True,
                    x.numpy(),
                    rs.numpy(),
                    _empty(dtype, 0, 1, 1, 1, 1).numpy(),
                    _empty(dtype, 0, 1, 1, 1).numpy(),
                    failed_at.numpy(),
                    bad.numpy(),
                    threads=sizes.threads,
                )
            x, slow = _refine(rs, coef, steps, rhs_eq, init, x, sizes, keep64=True)
            by_system = False
            outcome.failed_at = failed_at
            outcome.bad_input = bool(bad.any())
        ctx.sizes, ctx.rs, ctx.by_system = sizes, rs, by_system
        # below float64, failed systems are solved again in float64 (_resolve_in_float64): their
        # gradients come from that solve, not from this one's NaN factor
        outcome.unconverged = slow.any(dim=1)
        ctx.failed = outcome.to_resolve() if dtype != torch.float64 else None
        # a float32 solution is saved as refined, in float64: the coefficient and step
        # gradients chain the residual beta - A x, which x rounded to float32 would spoil
        ctx.save_for_backward(coef, steps, rhs_eq, init, x)
        return x.to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x):
        coef, steps, rhs_eq, init, x = ctx.saved_tensors
        sizes = ctx.sizes
        dtype = coef.dtype
        grad_x = grad_x.detach().to(dtype).contiguous()
        N, P = coef.shape[0], rhs_eq.shape[3]
        W = lane_width(N * P)
        rs, adjoint = ctx.rs, grad_x
        if dtype != torch.float64 and x.numel() > 0:
            # the adjoint refined in float64 and every product chained in float64 (from the
            # refined float32 x): float32 gradients then carry the error of x, not cond(A)^2
            adjoint = _refined_adjoint(rs, coef, steps, grad_x, sizes)
            coef, steps, rhs_eq, init, x = (
                t.to(torch.float64).contiguous() for t in (coef, steps, rhs_eq, init, x)
            )
            rs = _empty(torch.float64, 0, 1, 1, 1, 1)
        work = x.dtype
        g_coef = hugepages.empty((N * P, *coef.shape[1:]), work)
        g_steps = hugepages.empty((N * P, steps.shape[1]), work)
        g_rhs = hugepages.empty(tuple(rhs_eq.shape), work)
        g_init = hugepages.empty(tuple(init.shape), work)
        T, D, S, K, central, wts, finv = sizes.args(work)
        if P > 0:
            _run(
                kernels.backward,
                -(-N * P // W),
                adjoint.numpy(),
                x.numpy(),
                coef.numpy(),
                steps.numpy(),
                rhs_eq.numpy(),
                init.numpy(),
                D,
                S,
                K,
                central,
                wts,
                finv,
                W,
                rs.numpy(),
                ctx.by_system,
                adjoint is not grad_x,
                g_coef.numpy(),
                g_steps.numpy(),
                g_rhs.numpy(),
                g_init.numpy(),
                threads=sizes.threads,
            )
        if P != 1:
            g_coef, g_steps = (_sum_items(g, N, P) for g in (g_coef, g_steps))
        if ctx.failed is not None and bool(ctx.failed.any()):
            for g in (g_coef, g_steps, g_rhs, g_init):
                g[ctx.failed] = 0
        grads = tuple(g.to(dtype) for g in (g_coef, g_steps, g_rhs, g_init))
        needed = ctx.needs_input_grad[:4]
        return (*(g if need else None for g, need in zip(grads, needed, strict=True)), None, None)


def _sum_items(partials: torch.Tensor, N: int, P: int) -> torch.Tensor:
    """(N * P, ...) per-item gradients -> (N, ...), summed over p in order (deterministic)."""
    out = torch.zeros((N, *partials.shape[1:]), dtype=partials.dtype)
    if P > 0:
        kernels.sum_items(partials.reshape(N * P, -1).numpy(), P, out.view(N, -1).numpy())
    return out


def qr_lane_ode_forward(
    problem: OdeProblem,
    plain_weights: tuple[float, float, float],
    check_inputs: bool,
    check_pivots: bool,
    central: bool,
    threads: int | None = None,
) -> torch.Tensor:
    """u ``(*batch, T, D, R)``, the least-squares solution by the orthogonal lane solve,
    differentiable w.r.t. coefficients, rhs_equation, init_vars and steps.

    Args:
        problem: shapes checked by :func:`~smnn.solver.inputs.prepare_problem` (CPU tensors).
        plain_weights: (w_eq, w_in, w_s) as python floats.
        check_inputs: raise the usual ValueError for non-finite inputs or steps <= 0 (checked
            inside the kernels while they read the inputs).
        check_pivots: raise :class:`~smnn.solver.banded.NonPositivePivotError` naming the
            systems whose stacked rows are rank deficient (rank check of
            :mod:`qr_lane_kernels`); else those systems come back as NaN.
        central: central smoothness rows on.
        threads: the kernels' threads (:func:`smnn.solver.fused.n_workers`; None: torch's count).
    """
    T, D, R = problem.n_steps, problem.n_dims, problem.n_orders
    batch, lhs_batch = tuple(problem.batch_shape), tuple(problem.lhs_batch_shape)
    folding = BatchFolding(batch, lhs_batch)
    coef, steps = _fold_lhs(problem)
    rhs_eq, init = _fold_rhs(problem, folding)
    outcome = _Outcome()
    sizes = _sizes(problem, plain_weights, central, threads)
    x = _QrLaneSolve.apply(coef, steps, rhs_eq, init, sizes, outcome)
    if coef.dtype != torch.float64 and bool(outcome.to_resolve().any()):
        x = _resolve_in_float64(x, (coef, steps, rhs_eq, init), sizes, outcome)
    if check_inputs and outcome.bad_input:
        check_values_of(
            problem.coefficients, problem.rhs_equation, problem.init_vars, problem.steps
        )
    if check_pivots:
        raise_if_failed(outcome, lhs_batch, rank=True)
    return folding.unfold(x).reshape(*batch, T, D, R)


def _resolve_in_float64(
    x: torch.Tensor, inputs: tuple[torch.Tensor, ...], sizes: _Sizes, outcome: _Outcome
) -> torch.Tensor:
    """x ``(N, T, m, P)`` with the systems that failed the rank check below float64 solved
    again in float64 (differentiably, from the folded ``inputs`` coef (N, Tc, E, m), steps
    (N, Th), rhs_eq (N, Tb, E, P), init (N, Su, D*K, P)) and cast back; ``outcome.failed_at``
    then holds the float64 verdict.

    A system whose column-scaled condition number nears 1 / (nb * eps32) has a float32 diagonal
    of R that cannot be told from a rank-deficient one (measured on the KdV demo in training:
    |R_jj| / ||a_j|| = 5.4e-7 and 5.9e-7 against the threshold nb * eps32 = 6.0e-7, cond(A)
    1.6e7), yet the problem is well posed: float64 solves it. The rank check stays as strict
    as it is for rank-deficient systems; only these systems pay for float64. Their float64
    rank check uses eps = ``_RESOLVE_RANK_EPS`` = 1e-12, not eps64 (2.2e-16): a direction the
    rows leave undetermined is caught from eps = 1e-15 up (even where the plain float64 check
    misses it, the known gap of tests/test_qr_lanes.py); a well-posed system passes up to
    cond(A) of about 1 / (nb * 1e-12)."""
    idx = torch.nonzero(outcome.to_resolve()).flatten()
    again = _Outcome()
    sub = tuple(t[idx].to(torch.float64).contiguous() for t in inputs)
    x64 = _QrLaneSolve.apply(*sub, dataclasses.replace(sizes, rank_eps=_RESOLVE_RANK_EPS), again)
    x = x.clone()
    x[idx] = x64.to(x.dtype)
    failed_at = outcome.failed_at.clone()
    failed_at[idx] = again.failed_at
    outcome.failed_at = failed_at
    outcome.unconverged = None
    outcome.bad_input = outcome.bad_input or again.bad_input
    return x


class _QrFactorSolve(torch.autograd.Function):
    """u = A^+ beta(b, u0) with a stored :class:`QrLaneFactor` (coefficients frozen).

    forward(rhs_eq (N, Tb, E, P), init (N, Su, D*K, P), lhs) -> x (N, T, m, P). Backward:
    lambda = (R^T R)^{-1} g, dl/db_t = w_eq^2 C_t lambda_t, dl/du0_t = w_in^2 lambda_t on the
    initial entries (summed over a size-1 step axis)."""

    @staticmethod
    def forward(ctx, rhs_eq, init, lhs: QrLaneLeftHandSide):
        rhs_eq, init = rhs_eq.detach().contiguous(), init.detach().contiguous()
        x = lhs.factor.solve_rhs(rhs_eq, init)
        ctx.lhs = lhs
        ctx.shapes = (tuple(rhs_eq.shape), tuple(init.shape))
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x):
        lhs = ctx.lhs
        sizes = lhs.factor.sizes
        (N, Tb, E, P), (_, Su, _, _) = ctx.shapes
        T, D, R = sizes.n_steps, sizes.n_dims, sizes.n_orders
        S, K = sizes.n_init_steps, sizes.n_init_orders
        w_eq, w_in = sizes.weights[0], sizes.weights[1]
        factor = lhs.factor
        dtype = factor.rs.dtype
        if dtype == torch.float64:
            lam = factor.solve(grad_x)  # (N, T, m, P)
        else:
            g32 = grad_x.detach().to(dtype).contiguous()
            lam = _refined_adjoint(factor.rs, factor.coef, factor.steps, g32, sizes)
        grad_rhs_eq = grad_init = None
        if ctx.needs_input_grad[0]:
            coef = factor.coef.to(lam.dtype).expand(N, T, E, D * R)
            g = torch.einsum("ntem,ntmp->ntep", coef, lam) * (w_eq * w_eq)
            grad_rhs_eq = (g if Tb == T else g.sum(1, keepdim=True)).to(dtype)
        if ctx.needs_input_grad[1]:
            lam_init = lam[:, :S].reshape(N, S, D, R, P)[:, :, :, :K].reshape(N, S, D * K, P)
            g = lam_init * (w_in * w_in)
            grad_init = (g if Su == S else g.sum(1, keepdim=True)).to(dtype)
        return grad_rhs_eq, grad_init, None


@dataclass
class QrLaneLeftHandSide:
    """A left-hand side triangularised on the lane engine (what ``factorize`` keeps for
    ``method="qr"``): the factor and the left-hand side's batch shape."""

    factor: QrLaneFactor
    lhs_batch_shape: torch.Size

    def solve(self, problem: OdeProblem, check_values: bool) -> torch.Tensor:
        """u ``(*batch, T, D, R)`` for the right-hand sides of ``problem`` (same left-hand
        side), with gradients to rhs_equation and init_vars."""
        T, D, R = problem.n_steps, problem.n_dims, problem.n_orders
        batch = tuple(problem.batch_shape)
        folding = BatchFolding(batch, tuple(self.lhs_batch_shape))
        rhs_eq, init = _fold_rhs(problem, folding)
        x = _QrFactorSolve.apply(rhs_eq, init, self)
        if check_values and self.factor.bad_input:
            check_finite("rhs_equation", problem.rhs_equation)
            check_finite("init_vars", problem.init_vars)
        return folding.unfold(x).reshape(*batch, T, D, R)


def qr_lane_factorize(
    problem: OdeProblem,
    plain_weights: tuple[float, float, float],
    check_pivots: bool,
    central: bool,
    threads: int | None = None,
) -> QrLaneLeftHandSide:
    """Triangularise the left-hand side of ``problem`` (values checked by the caller) on the
    lane engine, keeping the reflectors; the right-hand sides of ``problem`` are not used.
    ``threads``: the kernels' threads in the factorization and every later solve (None:
    torch's count at each call)."""
    coef, steps = (x.detach().contiguous() for x in _fold_lhs(problem))
    factor = _factorize(coef, steps, _sizes(problem, plain_weights, central, threads))
    if check_pivots:
        raise_if_failed(factor, tuple(problem.lhs_batch_shape), rank=True)
    return QrLaneLeftHandSide(factor, problem.lhs_batch_shape)
