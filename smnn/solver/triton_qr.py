"""The orthogonal (QR) solve of docs/solver.md, "The orthogonal (QR) solve", on Triton: the sweep
and its substitutions as kernels, gradients, float32 refinement and ``factorize`` (user guide:
docs/gpu.md).

Rows: the row blocks x, y ``(N, Ts, p, n)`` and beta ``(N, Ts, p, P)`` are built by the torch
formulas of :mod:`smnn.solver.qr` (:func:`~smnn.solver.qr.build_step_rows`,
:func:`~smnn.solver.qr.build_step_rhs`, differentiable), a left-hand side shared by several
right-hand sides folded into columns (:class:`~smnn.solver.layout.BatchFolding`; in
``ode_forward`` only up to 8 columns per system or as many as there are systems, else every
batch entry gets its own lane: the sweep's tile holds a lane's columns). Kernels
(:mod:`smnn.solver.triton_kernels`, one lane per system, layouts batch last):

- :func:`~smnn.solver.triton_kernels.qr_sweep_kernel` (**1** launch): per step stack the
  carried triangle (and its rotated right-hand sides) over the step's rows, sort the stacked
  rows by decreasing max-norm (stable: the torch path's order), triangularise the first 2n
  columns (n at the last step) by Householder reflections applied to every column, the
  right-hand sides included, store R_t, S_t, z_t, carry the next triangle; then back-substitute
  u_t = R_t^{-1} (z_t - S_t u_{t+1}). No A^T A is formed.
- :func:`~smnn.solver.triton_kernels.qr_normal_solve_kernel` (**1** launch): (R^T R)^{-1} g by
  a forward sweep with R_t^T, S_{t-1}^T and a back sweep with R_t, S_t
  (:meth:`TritonQRFactor.solve`).

Gradients: the torch path's formulas (:func:`~smnn.solver.qr.least_squares_backward`):
lambda = (R^T R)^{-1} g (one launch of the normal solve), r = beta - A u,
dl/dbeta = A lambda, dl/dA = r lambda^T - (A lambda) u^T on the blocks x, y (batched torch
products, O(T), fixed order, no atomics); autograd carries them on through the row builders to
the coefficients, steps, right-hand sides and initial values (shared and broadcast inputs
summed by autograd's fixed-order reductions).

float32: the solution and lambda are refined once each as on the torch path
(:func:`~smnn.solver.qr.refine_solution`: residual and A^T r in float64, the correction by
the float32 factor, one more launch of the normal solve each). Measured under the interpreter
(tests/test_triton_qr.py, ``test_float32_refined_to_float64``: B=3, T=12, E=2, D=2, R=3,
K=2, against the float64 solve of the same rounded inputs): max error relative to max |u|
2.0e-6 before the refinement, 3.4e-8 after (B=3, T=30: 3.0e-6 before, 1.5e-7 after, the
same as the torch path's float32 QR, and 2e-8 from it).

Launches per call: ``ode_forward`` forward 1 (float32: 2), backward 1 (float32: 2).

``factorize`` (:func:`triton_qr_factorize`): one launch of the sweep without right-hand sides
keeps R and S; each solve uses the corrected semi-normal equations with the kept rows
(:meth:`TritonQRFactor.solve_rows`: u = (R^T R)^{-1} A^T beta, then one refinement step
r = beta - A u, u += (R^T R)^{-1} A^T r with residual and A^T r in float64), and in float32
the torch path's refinement once more (:class:`~smnn.solver.qr.QRLeftHandSide` drives it): 2
launches per solve in float64, 3 in float32; backward 1 (float32: 2). Why not kept
reflectors as the torch path: they cost an (n+p) x 2n block per step (R and S cost 2 n x n)
and a second Householder kernel replaying the rotations, while the semi-normal equations reuse
the normal-solve kernel the gradients need anyway. The corrected semi-normal equations
(Björck) reach the accuracy of the QR solve while cond(A)^2 eps stays well below 1; in float32
the float64 residuals of the refinement make up the difference on the tests' problems.
Measured under the interpreter (tests/test_triton_qr.py,
``test_factorize_solve_equals_ode_forward``, B=3, T=5, E=2, D=2, R=3): factorize(...).solve
agrees with ode_forward to 4.5e-15 relative in float64 and to the bit in float32 (B=3,
T=30: 1.4e-9 in float32).

Importing this module does not import triton (the kernel module is imported when a call runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from smnn.solver.banded import raise_if_failed
from smnn.solver.inputs import OdeProblem
from smnn.solver.layout import BatchFolding
from smnn.solver.qr import (
    QRLeftHandSide,
    apply_rows_t,
    build_step_rows,
    folded_rhs,
    nan_failed,
    qr_least_squares,
    rank_tolerance,
    refine_solution,
    unfold_solution,
)
from smnn.solver.triton_engine import (
    _columns_in_lanes,
    _launching,
    triton_cdiv,
    triton_unavailable_reason,
)

__all__ = ["TritonQRFactor", "triton_qr_factorize", "triton_qr_ode_forward", "triton_qr_sweep"]

# elements of one [BLOCK, RP, CP] tile a program holds per step (as the LDL^T kernels)
_TILE_ELEMENTS = 512


def _pow2(n: int) -> int:
    return max(2, 1 << (max(n, 1) - 1).bit_length())


def _to_lanes(v: torch.Tensor) -> torch.Tensor:
    """``(N, Ts, a, b)`` -> ``(Ts, a, b, N)``, contiguous (the kernels' layout)."""
    return v.detach().permute(1, 2, 3, 0).contiguous()


@dataclass
class TritonQRFactor:
    """The block-bidiagonal factor R of A (R^T R = A^T A) of N systems from the Triton QR
    sweep, a :class:`~smnn.solver.factor.Factor`.

    Attributes:
        r: ``(Ts, n, n, N)`` upper triangular diagonal blocks R_t (lanes last).
        s: ``(Ts, n, n, N)`` blocks S_t coupling u_t to u_{t+1} (S_{Ts-1} = 0).
        failed_at: ``(N,)`` int64, 1 + the first step whose |diag(R_t)| is negligible
            against its column of A (:func:`~smnn.solver.qr.rank_tolerance`), else 0.
        x, y: the rows ``(N, Ts, p, n)`` it was made from (detached), for
            :meth:`solve_rows`.
    """

    r: torch.Tensor
    s: torch.Tensor
    failed_at: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor

    @property
    def n_systems(self) -> int:
        return self.r.shape[3]

    @property
    def n_steps(self) -> int:
        return self.r.shape[0]

    @property
    def block_size(self) -> int:
        return self.r.shape[1]

    def failed(self) -> torch.Tensor:
        """``(N,)`` bool: rank-deficient systems."""
        return self.failed_at > 0

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """x with (R^T R) x = rhs (the normal equations A^T A x = rhs), ``rhs``
        ``(N, Ts, n, P)``; returns ``(N, Ts, n, P)``, NaN for failed systems (one launch of
        :func:`~smnn.solver.triton_kernels.qr_normal_solve_kernel`)."""
        from smnn.solver.triton_kernels import qr_normal_solve_kernel

        N, Ts, n = self.n_systems, self.n_steps, self.block_size
        if rhs.dim() != 4 or tuple(rhs.shape[:3]) != (N, Ts, n):
            raise ValueError(
                f"rhs must have shape (N={N}, T={Ts}, n={n}, P), got {tuple(rhs.shape)}"
            )
        P = rhs.shape[3]
        if Ts * n * max(P, 1) * N >= 2**31:
            raise ValueError(f"too large for one launch: N={N}, Ts={Ts}, n={n}, P={P}")
        g = _to_lanes(rhs.to(self.r.dtype))  # (Ts, n, P, N)
        out = torch.zeros_like(g)
        if N * P > 0:
            NP = _pow2(n)
            BLOCK = max(1, _TILE_ELEMENTS // (NP * NP))
            with _launching():
                qr_normal_solve_kernel[(triton_cdiv(N, BLOCK),)](
                    self.r, self.s, g, out, N, P, Ts, NB=n, NP=NP, BLOCK=BLOCK
                )
        return nan_failed(out.permute(3, 0, 1, 2), self.failed_at)

    def solve_rows(self, beta: torch.Tensor) -> torch.Tensor:
        """The least-squares solution u ``(N, Ts, n, P)`` for row right-hand sides ``beta``
        ``(N, Ts, p, P)`` by the corrected semi-normal equations (module docstring):
        u = (R^T R)^{-1} A^T beta, then one refinement step (2 launches)."""
        x, y = self.x, self.y
        atb = apply_rows_t(x.double(), y.double(), beta.detach().double())
        u = self.solve(atb.to(x.dtype))
        return refine_solution(self, x, y, beta.detach(), u)


def triton_qr_sweep(
    x: torch.Tensor, y: torch.Tensor, beta: torch.Tensor | None
) -> tuple[torch.Tensor | None, TritonQRFactor]:
    """The QR sweep of the row blocks in one launch, not differentiable.

    Args:
        x, y: ``(N, Ts, p, n)``; beta: ``(N, Ts, p, P)``, or None (factorize only).

    Returns:
        u ``(N, Ts, n, P)`` (NaN for failed systems; None without ``beta``) and the
        :class:`TritonQRFactor`.
    """
    from smnn.solver.triton_kernels import qr_sweep_kernel

    N, Ts, p, n = x.shape
    P = 0 if beta is None else beta.shape[-1]
    if y.shape != x.shape or (beta is not None and tuple(beta.shape[:3]) != (N, Ts, p)):
        raise ValueError(
            f"x, y must be (N, Ts, p, n) and beta (N, Ts, p, P); got x {tuple(x.shape)}, "
            f"y {tuple(y.shape)}, beta {None if beta is None else tuple(beta.shape)}"
        )
    dtype, device = x.dtype, x.device
    xl, yl = _to_lanes(x), _to_lanes(y)  # (Ts, p, n, N)
    bl = x.new_zeros(1) if beta is None else _to_lanes(beta.to(dtype))  # (Ts, p, P, N)
    if max(xl.numel(), bl.numel(), Ts * n * max(P, 1) * N * 2) >= 2**31:
        raise ValueError(f"too large for one launch: N={N}, Ts={Ts}, p={p}, n={n}, P={P}")
    r = torch.zeros((Ts, n, n, N), dtype=dtype, device=device)
    s = torch.zeros((Ts, n, n, N), dtype=dtype, device=device)
    z = torch.zeros((Ts, n, max(P, 1), N), dtype=dtype, device=device)
    u = torch.zeros((Ts, n, max(P, 1), N), dtype=dtype, device=device)
    RP, CP, NP = _pow2(n + p), _pow2(2 * n + P), _pow2(n)
    carried = torch.zeros((n, CP, max(N, 1)), dtype=dtype, device=device)
    failed_at = torch.zeros(N, dtype=torch.int64, device=device)
    if N > 0:
        BLOCK = max(1, _TILE_ELEMENTS // (RP * CP))
        with _launching():
            qr_sweep_kernel[(triton_cdiv(N, BLOCK),)](
                xl, yl, bl, r, s, z, carried, u, failed_at, N, P, Ts, p,
                rank_tolerance(n, dtype), NB=n, RP=RP, CP=CP, NP=NP, BLOCK=BLOCK,
            )  # fmt: skip
    factor = TritonQRFactor(r, s, failed_at, x.detach(), y.detach())
    if beta is None:
        return None, factor
    return nan_failed(u[:, :, :P].permute(3, 0, 1, 2), failed_at), factor


def _check_device(problem: OdeProblem) -> None:
    why = triton_unavailable_reason(problem.coefficients.device)
    if why is not None:
        raise ValueError(f"the Triton QR sweep cannot run this call: {why}")


def triton_qr_ode_forward(
    problem: OdeProblem, weights: tuple[float, float, float], central: bool, check_pivots: bool
) -> torch.Tensor:
    """u ``(*batch, T, D, R)`` of ``problem`` (values checked by the caller) by the Triton QR
    sweep, differentiable in the coefficients, right-hand sides, initial values and steps.

    ``check_pivots``: raise :class:`~smnn.solver.banded.NonPositivePivotError` naming the
    rank-deficient systems (as the torch path's QR); off, they come back NaN."""
    _check_device(problem)
    batch, lhs_batch = tuple(problem.batch_shape), tuple(problem.lhs_batch_shape)
    x, y = build_step_rows(problem, weights, central)
    folding = BatchFolding(batch, lhs_batch)
    N = folding.n_systems
    if _columns_in_lanes(N, math.prod(batch) // max(N, 1)):
        # the sweep's tile holds the P columns beside the 2n unknowns of a lane: with many
        # columns per system (the Lorenz pattern) every batch entry gets its own lane instead
        x, y = (v.expand(*batch, *v.shape[-3:]) for v in (x, y))
        lhs_batch = batch
        folding = BatchFolding(batch, batch)
    x, y = folding.fold_lhs(x), folding.fold_lhs(y)
    beta = folded_rhs(problem, folding, weights, central)
    u, failed_at = qr_least_squares(x, y, beta, sweep=triton_qr_sweep)  # 1 launch (+1 float32)
    if check_pivots:
        raise_if_failed(failed_at, lhs_batch, rank=True)
    return unfold_solution(u, problem, folding, central)


def triton_qr_factorize(
    problem: OdeProblem, weights: tuple[float, float, float], central: bool, check_pivots: bool
) -> QRLeftHandSide:
    """Factorize the rows of ``problem``'s coefficients and steps by the Triton sweep (one
    launch; its right-hand sides are not used). The returned
    :class:`~smnn.solver.qr.QRLeftHandSide` holds a :class:`TritonQRFactor` and solves by the
    corrected semi-normal equations (module docstring); gradients reach the right-hand sides
    and initial values."""
    _check_device(problem)
    folding = BatchFolding(tuple(problem.batch_shape), tuple(problem.lhs_batch_shape))
    with torch.no_grad():
        x, y = (folding.fold_lhs(v).detach() for v in build_step_rows(problem, weights, central))
        _, factor = triton_qr_sweep(x, y, None)
    if check_pivots:
        raise_if_failed(factor, tuple(problem.lhs_batch_shape), rank=True)
    return QRLeftHandSide(factor, x, y, central, problem.lhs_batch_shape, weights)
