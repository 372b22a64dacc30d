"""Compiled assembly of the normal-matrix blocks and its chain rule (CPU fast path).

Same blocks as :func:`smnn.solver.blocks.build_lhs_blocks` (the autograd-friendly torch twin, used
on CUDA and when a weight needs a gradient), written by one compiled loop instead of a chain of
batched tensor ops; the backward pass maps the block gradients of SOLVER_SPEC section 5 to the
coefficients and steps in one more loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smnn.solver.blocks import taylor_gram_matrices

__all__ = ["CompiledAssembly"]


@dataclass(frozen=True)
class CompiledAssembly:
    """Sizes and weights of one problem's left-hand side.

    Attributes:
        n_steps, n_dims, n_orders: T, D, R.  n_init_steps, n_init_orders: S, K.
        weights: (w_eq, w_in, w_s) as python floats.  central: central smoothness rows on/off.
    """

    n_steps: int
    n_dims: int
    n_orders: int
    n_init_steps: int
    n_init_orders: int
    weights: tuple[float, float, float]
    central: bool

    def _constants(self, dtype: torch.dtype):
        R = self.n_orders
        n_taylor = R - 1 if self.central else R
        g0, g1, g2 = (
            g.numpy() for g in taylor_gram_matrices(R, n_taylor, dtype, torch.device("cpu"))
        )
        w2 = torch.tensor([w * w for w in self.weights], dtype=dtype).numpy()
        return g0, g1, g2, w2

    def blocks(self, coef: torch.Tensor, steps: torch.Tensor):
        """``coef`` (N, Tc, E, m), ``steps`` (N, Th) -> diag (N, T, m, m), sub (N, T-1, m, m),
        sub2 (N, T-2, m, m) or None. No autograd (see :meth:`backward`)."""
        from smnn.solver import numba_kernels
        from smnn.solver.banded import _with_threads

        coef = coef.detach().contiguous()
        steps = steps.detach().contiguous()
        N, m = coef.shape[0], coef.shape[-1]
        T = self.n_steps
        diag = torch.empty(N, T, m, m, dtype=coef.dtype)
        sub = torch.empty(N, T - 1, m, m, dtype=coef.dtype)
        sub2 = torch.empty(N, max(T - 2, 0), m, m, dtype=coef.dtype)
        g0, g1, g2, w2 = self._constants(coef.dtype)
        _with_threads(
            numba_kernels.assemble_blocks,
            coef.numpy(),
            steps.numpy(),
            T,
            self.n_dims,
            self.n_init_steps,
            self.n_init_orders,
            g0,
            g1,
            g2,
            w2,
            self.central,
            diag.numpy(),
            sub.numpy(),
            sub2.numpy(),
        )
        return diag, sub, (sub2 if self.central else None)

    def backward(self, lam: torch.Tensor, x: torch.Tensor, coef: torch.Tensor, steps: torch.Tensor):
        """Gradients of the coefficients and steps from lam = M^{-1} g and the solution x.

        ``lam``, ``x``: canonical (N, T', n, P) (paired steps when central). Returns
        dl/dcoef (N, Tc, E, m) and dl/dsteps (N, Th).
        """
        from smnn.solver import numba_kernels
        from smnn.solver.banded import _with_threads

        N, m = coef.shape[0], coef.shape[-1]
        P = lam.shape[-1]
        # paired layout (N, T2, 2m, P) is (N, 2*T2, m, P) step by step
        lam = lam.detach().contiguous().reshape(N, -1, m, P)
        x = x.detach().contiguous().reshape(N, -1, m, P)
        coef = coef.detach().contiguous()
        steps = steps.detach().contiguous()
        grad_coef = torch.empty_like(coef)
        grad_steps = torch.empty_like(steps)
        g0, g1, g2, w2 = self._constants(coef.dtype)
        _with_threads(
            numba_kernels.assemble_blocks_backward,
            lam.numpy(),
            x.numpy(),
            coef.numpy(),
            steps.numpy(),
            self.n_steps,
            self.n_dims,
            g0,
            g1,
            g2,
            w2,
            self.central,
            grad_coef.numpy(),
            grad_steps.numpy(),
        )
        return grad_coef, grad_steps
