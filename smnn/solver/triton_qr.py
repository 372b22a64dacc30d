"""The orthogonal (QR) sweep of docs/solver.md, "The orthogonal (QR) solve" as one Triton kernel
(forward only).

:func:`triton_qr_solve` solves the least-squares problem min ||A u - beta|| of the row blocks
of :func:`smnn.solver.qr.build_step_rows` (``x``, ``y`` ``(N, Ts, p, n)``) and
:func:`~smnn.solver.qr.build_step_rhs` (``beta`` ``(N, Ts, p, P)``) in **one launch** of
:func:`~smnn.solver.triton_kernels.qr_sweep_kernel`, one lane per system: per step it stacks
the carried triangle (and its rotated right-hand sides) over the step's rows, sorts the stacked
rows by decreasing max-norm (stable: the torch path's order, :func:`smnn.solver.qr._row_order`),
triangularises the first 2n columns (n at the last step) by Householder reflections applied to
every column, the right-hand sides included, stores R_t, S_t and z_t, and carries the next
triangle; then it back-substitutes u_t = R_t^{-1} (z_t - S_t u_{t+1}) in the same launch. No
A^T A is formed.
Measured under the interpreter: float64 equal to the torch path's QR to 3e-15; float32 within
5e-7 of a float64 solve (the torch path's float32 QR refines its solution to 4e-8).

Not yet: gradients (the torch path's :class:`~smnn.solver.qr._QRLeastSquares` backward), the
float32 refinement, kept reflectors for ``factorize``, and dispatch from
:func:`smnn.ode_forward` (``method='qr'`` with ``backend='triton'``).

Importing this module does not import triton (the kernel module is imported when a call runs).
"""

from __future__ import annotations

import torch

from smnn.solver.banded import raise_if_failed
from smnn.solver.inputs import OdeProblem
from smnn.solver.layout import BatchFolding
from smnn.solver.qr import build_step_rhs, build_step_rows, rank_tolerance
from smnn.solver.triton_engine import _launching, triton_cdiv, triton_unavailable_reason

__all__ = ["triton_qr_ode_forward", "triton_qr_solve"]

# elements of one [BLOCK, RP, CP] tile a program holds per step (as the LDL^T kernels)
_TILE_ELEMENTS = 512


def _pow2(n: int) -> int:
    return max(2, 1 << (max(n, 1) - 1).bit_length())


def triton_qr_solve(
    x: torch.Tensor, y: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares solution of the row blocks, not differentiable.

    Args:
        x, y: ``(N, Ts, p, n)``; beta: ``(N, Ts, p, P)``.

    Returns:
        u ``(N, Ts, n, P)`` (NaN for failed systems) and failed_at ``(N,)`` int64 (1 + the
        first step whose |diag(R_t)| is negligible against its column of A,
        :func:`smnn.solver.qr.rank_tolerance`; 0 where none).
    """
    from smnn.solver.triton_kernels import qr_sweep_kernel

    N, Ts, p, n = x.shape
    P = beta.shape[-1]
    if y.shape != x.shape or tuple(beta.shape[:3]) != (N, Ts, p):
        raise ValueError(
            f"x, y must be (N, Ts, p, n) and beta (N, Ts, p, P); got x {tuple(x.shape)}, "
            f"y {tuple(y.shape)}, beta {tuple(beta.shape)}"
        )
    dtype, device = x.dtype, x.device
    xl = x.detach().permute(1, 2, 3, 0).contiguous()  # (Ts, p, n, N)
    yl = y.detach().permute(1, 2, 3, 0).contiguous()
    bl = beta.detach().to(dtype).permute(1, 2, 3, 0).contiguous()  # (Ts, p, P, N)
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
    out = u[:, :, :P].permute(3, 0, 1, 2)
    dead = (failed_at > 0).reshape(-1, 1, 1, 1)
    return out.masked_fill(dead, float("nan")), failed_at


def triton_qr_ode_forward(
    problem: OdeProblem, weights: tuple[float, float, float], central: bool, check_pivots: bool
) -> torch.Tensor:
    """u ``(*batch, T, D, R)`` of ``problem`` (values checked by the caller) by the Triton QR
    sweep; the rows are built by the torch formulas of :mod:`smnn.solver.qr` (forward only:
    the result carries no gradient)."""
    why = triton_unavailable_reason(problem.coefficients.device)
    if why is not None:
        raise ValueError(f"the Triton QR sweep cannot run this call: {why}")
    folding = BatchFolding(tuple(problem.batch_shape), tuple(problem.lhs_batch_shape))
    with torch.no_grad():
        x, y = (folding.fold_lhs(v) for v in build_step_rows(problem, weights, central))
        rhs = build_step_rhs(problem, problem.rhs_equation, problem.init_vars, weights, central)
        u, failed_at = triton_qr_solve(x, y, folding.fold_rhs(rhs))
    if check_pivots:
        raise_if_failed(failed_at, tuple(problem.lhs_batch_shape), rank=True)
    T, D, R = problem.n_steps, problem.n_dims, problem.n_orders
    u = folding.unfold(u)  # (*batch, Ts, n)
    if central:
        from smnn.solver.layout import unpair_solution

        u = unpair_solution(u, T)
    return u.reshape(*problem.batch_shape, T, D, R)
