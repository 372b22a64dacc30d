"""The torch path's differentiable solve u = M^{-1} r, custom backward (docs/solver.md 5)."""

from __future__ import annotations

import torch

__all__ = ["solve_with_factor"]


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
