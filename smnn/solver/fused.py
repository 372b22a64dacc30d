"""The fused CPU path of :func:`smnn.solver.ode_forward` (default options, numba backend).

When the inputs are CPU tensors, the weights are plain numbers and central smoothness is off,
``ode_forward`` (method ``'auto'`` or ``'sequential'``) runs the whole solve in two compiled
kernels (:mod:`smnn.solver.lane_kernels`): one forward kernel that assembles the normal equations,
factorizes and solves, and one backward kernel that returns the gradients of all four inputs. This
module holds the torch side: folding the inputs into the kernels' layout, the autograd function,
and the stored factorization.

The backward pass is not itself differentiable (no double backward; torch says so if asked).

Input values are checked inside the forward kernel while it reads them (non-finite values, steps
<= 0); when it finds one, :func:`fused_ode_forward` runs the usual checks of
:func:`smnn.solver.inputs.check_values_of` on the caller's tensors, so the error message is the
same as on every other path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import torch
from torch.autograd.function import once_differentiable

from smnn.solver import hugepages, lane_kernels
from smnn.solver.banded import _with_threads, raise_if_failed
from smnn.solver.blocks import taylor_gram_matrices
from smnn.solver.inputs import OdeProblem, check_values_of
from smnn.solver.layout import BatchFolding

__all__ = ["LaneFactor", "fused_ode_forward", "fused_path_applies"]


def fused_path_applies(
    device: torch.device, backend: str, method: str, central: bool, plain_weights, cuda_graphs
) -> bool:
    """Whether :func:`fused_ode_forward` serves this call (see the module docstring)."""
    return (
        device.type == "cpu"
        and backend == "numba"
        and method in ("auto", "sequential")
        and not central
        and plain_weights is not None
        and cuda_graphs is None
    )


def _run_kernel(kernel, n_groups: int, *args) -> None:
    """Call a :mod:`lane_kernels` kernel with SLP vectorisation on (it may compile), on as many
    threads as torch uses, and with its last argument, the number of parallel jobs, appended
    (at most ``n_groups``)."""
    n_workers = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, n_groups))
    with lane_kernels.slp_vectorization():
        _with_threads(kernel, *args, n_workers)


@dataclass
class LaneFactor:
    """Block Cholesky factors of N systems in the lane layout of :mod:`lane_kernels`.

    Attributes:
        chol: ``(G, T, m(m-1)/2, W)``; rdiag: ``(G, T, m, W)``.
        steps: ``(N, Th)``, the step sizes of the factorized matrix (its coupling blocks are
        rebuilt from them in every solve).  constants: g0, g1, g2, squared weights (numpy).
        n_systems: N.  failed_at: ``(N,)`` int64, 1 + first step with a non-positive pivot, 0
        where none (same meaning as :class:`~smnn.solver.banded.BlockTridiagonalFactor`).
    """

    chol: torch.Tensor
    rdiag: torch.Tensor
    steps: torch.Tensor
    constants: tuple
    n_systems: int
    failed_at: torch.Tensor

    @property
    def n_steps(self) -> int:
        return self.chol.shape[1]

    @property
    def block_size(self) -> int:
        return self.rdiag.shape[2]

    def failed(self) -> torch.Tensor:
        """``(N,)`` bool: systems whose factorization met a non-positive pivot."""
        return self.failed_at > 0

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """Solve M x = rhs for ``rhs`` ``(N, T, m, P)``; returns ``(N, T, m, P)``."""
        N, T, m = self.n_systems, self.n_steps, self.block_size
        if rhs.dim() != 4 or tuple(rhs.shape[:3]) != (N, T, m):
            raise ValueError(
                f"rhs must have shape (N={N}, T={T}, m={m}, P), got {tuple(rhs.shape)}"
            )
        rhs = rhs.detach().to(self.chol.dtype).contiguous()
        out = hugepages.empty(tuple(rhs.shape), rhs.dtype)
        _run_kernel(
            lane_kernels.solve,
            self.chol.shape[0],
            self.chol.numpy(),
            self.rdiag.numpy(),
            self.steps.numpy(),
            self.constants[2],
            self.constants[3],
            rhs.numpy(),
            out.numpy(),
        )
        return out


@dataclass(frozen=True)
class _Sizes:
    """What the kernels need besides the tensors."""

    n_steps: int
    n_dims: int
    n_orders: int
    n_init_steps: int
    n_init_orders: int
    weights: tuple[float, float, float]  # w_eq, w_in, w_s

    def constants(self, dtype: torch.dtype):
        """Taylor Gram matrices g0, g1, g2 (R, R) and the squared weights (3,), as numpy."""
        R = self.n_orders
        g0, g1, g2 = (g.numpy() for g in taylor_gram_matrices(R, R, dtype, torch.device("cpu")))
        w2 = torch.tensor([w * w for w in self.weights], dtype=dtype).numpy()
        return g0, g1, g2, w2


@dataclass
class _Outcome:
    """What the forward pass reports besides u: the factor and whether an input was bad."""

    factor: LaneFactor | None = None
    bad_input: bool = False


class _FusedLaneSolve(torch.autograd.Function):
    """u = M(c, h)^{-1} r(c, b, u0) in one forward and one backward kernel.

    forward(coef (N, Tc, E, m), steps (N, Th), rhs_eq (N, Tb, E, P), init (N, Su, D*K, P),
    sizes, outcome) -> x (N, T, m, P). Saved for backward: the inputs, x and the factor
    (O(T) memory; the backward pass does no second factorization).
    """

    @staticmethod
    def forward(ctx, coef, steps, rhs_eq, init, sizes: _Sizes, outcome: _Outcome):
        coef = coef.detach().contiguous()
        steps = steps.detach().contiguous()
        rhs_eq = rhs_eq.detach().contiguous()
        init = init.detach().contiguous()
        N, _, _, m = coef.shape
        T, P, W = sizes.n_steps, rhs_eq.shape[-1], lane_kernels.LANES
        G = -(-N // W)
        dtype = coef.dtype
        constants = sizes.constants(dtype)
        factor = LaneFactor(
            chol=hugepages.empty((G, T, m * (m - 1) // 2, W), dtype),
            rdiag=hugepages.empty((G, T, m, W), dtype),
            steps=steps,
            constants=constants,
            n_systems=N,
            failed_at=torch.empty(N, dtype=torch.int64),
        )
        x = hugepages.empty((N, T, m, P), dtype)
        bad_input = torch.zeros(G, dtype=torch.int64)
        _run_kernel(
            lane_kernels.forward,
            G,
            coef.numpy(),
            steps.numpy(),
            rhs_eq.numpy(),
            init.numpy(),
            T,
            sizes.n_dims,
            sizes.n_init_steps,
            sizes.n_init_orders,
            *constants,
            factor.chol.numpy(),
            factor.rdiag.numpy(),
            x.numpy(),
            factor.failed_at.numpy(),
            bad_input.numpy(),
        )
        outcome.factor = factor
        outcome.bad_input = bool(bad_input.any())
        ctx.sizes = sizes
        ctx.factor = factor
        ctx.save_for_backward(coef, steps, rhs_eq, init, x)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x):
        coef, steps, rhs_eq, init, x = ctx.saved_tensors
        sizes, factor = ctx.sizes, ctx.factor
        grad_x = grad_x.detach().to(coef.dtype).contiguous()
        grads = [hugepages.empty(tuple(t.shape), t.dtype) for t in (coef, steps, rhs_eq, init)]
        _run_kernel(
            lane_kernels.backward,
            factor.chol.shape[0],
            grad_x.numpy(),
            x.numpy(),
            coef.numpy(),
            steps.numpy(),
            rhs_eq.numpy(),
            sizes.n_dims,
            sizes.n_init_steps,
            sizes.n_init_orders,
            *factor.constants,
            factor.chol.numpy(),
            factor.rdiag.numpy(),
            *(g.numpy() for g in grads),
        )
        needed = ctx.needs_input_grad[:4]
        return (*(g if need else None for g, need in zip(grads, needed, strict=True)), None, None)


def fused_ode_forward(
    problem: OdeProblem,
    weights: tuple[float, float, float],
    check_values: bool,
    check_pivots: bool,
) -> torch.Tensor:
    """u ``(*batch, T, D, R)`` for a problem validated with ``check_values=False``.

    Args:
        problem: shapes checked by :func:`~smnn.solver.inputs.prepare_problem`.
        weights: (w_eq, w_in, w_s) as python floats.
        check_values: raise the usual ValueError for non-finite inputs or steps <= 0.
        check_pivots: raise :class:`~smnn.solver.banded.NonPositivePivotError` for systems whose
            normal matrix is not positive definite.
    """
    T, D, R = problem.n_steps, problem.n_dims, problem.n_orders
    S, K, E = problem.n_init_var_steps, problem.n_init_orders, problem.n_equations
    batch, lhs_batch = tuple(problem.batch_shape), tuple(problem.lhs_batch_shape)
    folding = BatchFolding(batch, lhs_batch)
    N = folding.n_systems
    c, h = problem.coefficients, problem.steps
    coef = c.expand(*lhs_batch, *c.shape[-4:]).reshape(N, c.shape[-4], E, D * R)
    steps = h.expand(*lhs_batch, h.shape[-1]).reshape(N, h.shape[-1])
    b, u0 = problem.rhs_equation, problem.init_vars
    rhs_eq = folding.fold_rhs(b.expand(*batch, *b.shape[-2:]))
    u0 = u0.expand(*batch, *u0.shape[-3:]).reshape(*batch, u0.shape[-3], D * K)
    init = folding.fold_rhs(u0)
    sizes = _Sizes(T, D, R, S, K, weights)
    outcome = _Outcome()
    x = _FusedLaneSolve.apply(coef, steps, rhs_eq, init, sizes, outcome)
    if check_values and outcome.bad_input:
        check_values_of(problem.coefficients, problem.rhs_equation, problem.init_vars, h)
    if check_pivots:
        raise_if_failed(outcome.factor, lhs_batch)
    return folding.unfold(x).reshape(*batch, T, D, R)
