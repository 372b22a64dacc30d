"""The differentiable solve u = M^{-1} r with a custom backward pass (SOLVER_SPEC section 5)."""

from __future__ import annotations

import torch

__all__ = ["solve_with_factor", "fused_solve"]


class _FactoredSolve(torch.autograd.Function):
    """x = M^{-1} rhs for canonical block-tridiagonal M, with M already factorized.

    forward(diag (N,T,n,n), sub (N,T-1,n,n), rhs (N,T,n,P), factor) -> x (N,T,n,P).
    ``diag`` and ``sub`` are the (possibly differentiable) blocks the factor was computed from;
    they are inputs only so autograd can route their gradients. Backward: lambda = M^{-1} g with
    the stored factor (M symmetric), dl/drhs = lambda, dl/dM_t = -sym(lambda_t x_t^T) and
    dl/dM_{t+1,t} = -(lambda_{t+1} x_t^T + x_{t+1} lambda_t^T), summed over the P columns.
    Only the factor and x are kept: O(T) memory, no second factorization.
    """

    @staticmethod
    def forward(ctx, diag, sub, rhs, factor):
        x = factor.solve(rhs)
        ctx.factor = factor
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad_x):
        (x,) = ctx.saved_tensors
        lam = ctx.factor.solve(grad_x.contiguous())
        grad_diag = grad_sub = None
        if ctx.needs_input_grad[0]:
            outer = lam @ x.transpose(-1, -2)
            grad_diag = -0.5 * (outer + outer.transpose(-1, -2))
        if ctx.needs_input_grad[1]:
            grad_sub = -(
                lam[:, 1:] @ x[:, :-1].transpose(-1, -2) + x[:, 1:] @ lam[:, :-1].transpose(-1, -2)
            )
        grad_rhs = lam if ctx.needs_input_grad[2] else None
        return grad_diag, grad_sub, grad_rhs, None


def solve_with_factor(
    diag: torch.Tensor, sub: torch.Tensor, rhs: torch.Tensor, factor
) -> torch.Tensor:
    """Differentiable x = M^{-1} rhs; shapes as in :class:`_FactoredSolve`.

    ``factor`` is any object with ``.solve(rhs (N,T,n,P)) -> (N,T,n,P)`` that was computed from
    ``diag`` and ``sub``.
    """
    return _FactoredSolve.apply(diag, sub, rhs, factor)


class _FusedOdeSolve(torch.autograd.Function):
    """u = M(c, h)^{-1} r with M assembled by compiled kernels (CPU fast path).

    forward(coef (N,Tc,E,m), steps (N,Th), rhs (N,T',n,P), lhs) -> x (N,T',n,P), where ``lhs``
    holds the factorization of M(coef, steps) (and how it was laid out). The backward pass solves
    once more with the stored factor and applies the chain rule through the block assembly in one
    compiled loop (:func:`smnn.solver.numba_kernels.assemble_blocks_backward`), so neither the
    block gradients nor an autograd graph over the blocks is ever materialised.
    """

    @staticmethod
    def forward(ctx, coef, steps, rhs, lhs):
        x = lhs.factor.solve(rhs)
        ctx.lhs = lhs
        ctx.save_for_backward(coef, steps, x)
        return x

    @staticmethod
    def backward(ctx, grad_x):
        coef, steps, x = ctx.saved_tensors
        lhs = ctx.lhs
        lam = lhs.factor.solve(grad_x.contiguous())
        grad_coef = grad_steps = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_coef, grad_steps = lhs.assembly.backward(lam, x, coef, steps)
            if not ctx.needs_input_grad[0]:
                grad_coef = None
            if not ctx.needs_input_grad[1]:
                grad_steps = None
        grad_rhs = lam if ctx.needs_input_grad[2] else None
        return grad_coef, grad_steps, grad_rhs, None


def fused_solve(coef: torch.Tensor, steps: torch.Tensor, rhs: torch.Tensor, lhs) -> torch.Tensor:
    """Differentiable x = M(coef, steps)^{-1} rhs; see :class:`_FusedOdeSolve`."""
    return _FusedOdeSolve.apply(coef, steps, rhs, lhs)
