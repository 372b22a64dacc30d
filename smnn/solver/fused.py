"""The lane engine: the CPU path of :func:`~smnn.solver.ode_forward` and
:func:`~smnn.solver.factorize` (numba kernels of :mod:`smnn.solver.lane_kernels`).

On CPU with numba, the sequential method (``method`` 'auto' or 'sequential') and plain-number
weights, with or without central smoothness, both entry points run on these kernels and on
nothing else:

- ``ode_forward``: one forward kernel assembles the normal equations from the inputs, factorizes
  and solves; one backward kernel returns the gradients of all four inputs. The backward pass is
  not itself differentiable (no double backward; torch says so if asked).
- central smoothness: the same kernels with the block pentadiagonal Cholesky of
  :mod:`lane_kernels`. Measured at the Lorenz shape (B=1536, T=50, R=3, forward+backward,
  float64, 2 threads): 12 ms here against 112 ms on the torch path (sequential; 147 ms cyclic),
  about 20 % more than without central rows (10 ms).
- ``factorize``: the forward kernel without right-hand sides makes a :class:`LaneFactor`; every
  ``solve`` assembles the right-hand side in the kernel that substitutes (exactly as the forward
  kernel does, so ``factorize(...).solve`` and ``ode_forward`` agree to the bit), and its
  backward pass solves once more with the stored factor: lambda = M^{-1} g, then
  dl/db = w_eq^2 C lambda and dl/du0 = w_in^2 lambda on the initial entries.

Lane layout per call. The kernels work on lanes of ``LANES`` = 32 side by side. When the left-hand
side has many systems, the lanes are systems (each with all its right-hand-side columns). When it
has few systems shared by many right-hand sides (shared coefficients and steps, the Lorenz
pattern), lanes of systems would sit mostly empty and leave threads idle; then the lanes are
*columns*: the factor is made once per system and replicated across the lanes, and each job
substitutes ``LANES`` columns of one system (:func:`lanes_are_columns` decides by the work per
thread). With fewer than 64 systems (or columns) the padding of 32-lane groups would cost as much
as real lanes: such calls run the same kernels compiled at 8 lanes (:func:`kernels_for`,
``lane_kernels.kernels(8)``); ``ode_forward`` gives the same bits at either width.

Input values are checked inside the kernels while they read them (non-finite values, steps
<= 0); when one is found, the usual checks of :func:`smnn.solver.inputs.check_values_of` run on
the caller's tensors, so the error message is the same as on every other path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import ModuleType

import numba
import torch
from torch.autograd.function import once_differentiable

from smnn.solver import hugepages, lane_kernels
from smnn.solver.banded import PIVOT_FACTOR, pivot_tolerance, raise_if_failed  # noqa: F401
from smnn.solver.blocks import taylor_gram_matrices
from smnn.solver.inputs import OdeProblem, check_finite, check_values_of
from smnn.solver.layout import BatchFolding, EngineSizes, fold_lhs_inputs, fold_rhs_inputs

__all__ = [
    "LaneFactor",
    "LaneLeftHandSide",
    "fused_ode_forward",
    "fused_path_applies",
    "kernels_for",
    "lane_factorize",
    "lanes_are_columns",
]

LANES = lane_kernels.LANES

# a column job loads its factor by itself where a group of systems shares one load among its
# columns: lanes become columns only when that leaves clearly less work per thread
_COLUMN_JOB_OVERHEAD = 1.25


def fused_path_applies(
    device: torch.device, backend: str, method: str, plain_weights, cuda_graphs
) -> bool:
    """Whether the lane engine serves this call (see the module docstring)."""
    return (
        device.type == "cpu"
        and backend == "numba"
        and method in ("auto", "sequential")
        and plain_weights is not None
        and cuda_graphs is None
    )


def pivot_floor(block_size: int, dtype: torch.dtype) -> float:
    """The relative pivot threshold of the lane kernels, the same as every LDL^T path's
    (:func:`smnn.solver.banded.pivot_tolerance`): a pivot at or below ``PIVOT_FACTOR * m * eps``
    times the diagonal entry M_t[j, j] of its assembled block (m = D*R) is a failure.
    Measured (tests/test_lane_pivots.py): float32 KdV-like problems (R = 5) have pivot ratios
    4e-7..4e-4 and errors of 0.8-78 %, a float32 growing solution 1.5e-4 and 100 %, while the
    float32 problems that are accurate to 1e-5 (R = 3, steps 0.05..0.15, Lorenz's u' = f) have
    5e-3 or more, 14x above the floor at m = 3; well-conditioned float64 problems sit 1e5x
    above it."""
    return pivot_tolerance(block_size, dtype)


def n_workers(n_jobs: int, threads: int | None = None) -> int:
    """Parallel jobs for ``n_jobs`` units of work: ``threads`` (the caller's thread count;
    None: as many as torch uses, ``torch.get_num_threads()``), at most numba's pool and
    ``n_jobs``."""
    threads = torch.get_num_threads() if threads is None else threads
    return max(1, min(threads, numba.config.NUMBA_NUM_THREADS, n_jobs))


def lanes_are_columns(
    n_systems: int, n_columns: int, width: int = LANES, threads: int | None = None
) -> bool:
    """Lay the lanes out as columns of one system (True) or as systems (False)?

    Lanes of systems: ceil(N / W) jobs of P columns each. Lanes of columns: N * ceil(P / W) jobs
    of one column each. The substitutions cost about the same per column and lane in both, so
    compare the columns per thread (the busiest thread), with a margin for the column jobs'
    own factor loads. ``threads``: as in :func:`n_workers`.
    """
    N, P = n_systems, n_columns
    groups = -(-N // width)
    column_jobs = N * -(-P // width)
    per_thread_systems = -(-groups // n_workers(groups, threads)) * P
    per_thread_columns = -(-column_jobs // n_workers(column_jobs, threads))
    return _COLUMN_JOB_OVERHEAD * per_thread_columns < per_thread_systems


def kernels_for(n_systems: int, n_columns: int, threads: int | None = None):
    """The lane kernels for a call: the wide ones (:mod:`lane_kernels`, ``LANES`` lanes) when
    the lanes' items (systems, or columns when :func:`lanes_are_columns`) fill at least two wide
    groups, else the same kernels at 8 lanes (``lane_kernels.kernels(8)``; 8 systems of
    T = 65,536 steps: 136 ms against 424 ms at 32 lanes; from 64 systems on, 32 lanes are as fast
    or faster). Given the layout (:func:`lanes_are_columns`, which weighs the threads), the width
    does not depend on the thread count. Lanes of systems give the same
    bits at either width; with lanes as columns, the gradients of shared coefficients and steps
    are sums over jobs, whose number depends on the width (equal to rounding). ``threads``: as
    in :func:`n_workers`."""
    N, P = n_systems, n_columns
    items = N * P if lanes_are_columns(N, P, threads=threads) else N
    if items >= 2 * LANES:
        return lane_kernels.kernels(LANES)
    return lane_kernels.kernels(lane_kernels.NARROW_LANES)


def _run_kernel(kernel, n_jobs: int, *args, threads: int | None = None) -> None:
    """Call a lane kernel (:mod:`lane_kernels`, :mod:`qr_lane_kernels`) with SLP vectorisation
    on (it may compile), on ``threads`` threads (None: as many as torch uses), with its last
    argument, the number of parallel jobs, appended (:func:`n_workers`: at most ``n_jobs``).

    Numba's OpenMP threading layer shares libgomp with torch, so changing numba's thread count
    changes torch's too: torch's count is put back afterwards, so a caller's
    ``torch.set_num_threads`` survives every solve, with or without ``threads``.
    """
    workers = n_workers(n_jobs, threads)
    torch_threads = torch.get_num_threads()
    with lane_kernels.slp_vectorization():
        previous = numba.get_num_threads()
        numba.set_num_threads(workers)
        try:
            kernel(*args, workers)
        finally:
            numba.set_num_threads(previous)
            if torch.get_num_threads() != torch_threads:
                torch.set_num_threads(torch_threads)


@dataclass(frozen=True)
class _Sizes(EngineSizes):
    """What the lane kernels need besides the tensors (:class:`~smnn.solver.layout.EngineSizes`)."""

    def constants(self, dtype: torch.dtype):
        """Taylor Gram matrices g0, g1, g2 (R, R) of the Taylor orders (0..R-1, or 0..R-2 with
        central rows) and the squared weights (3,), as numpy (shared between calls: the kernels
        only read them)."""
        R = self.n_orders
        return _constants(R, R - 1 if self.central else R, self.weights, dtype)


@functools.lru_cache(maxsize=64)
def _constants(n_orders: int, n_taylor: int, weights: tuple, dtype: torch.dtype):
    """:meth:`_Sizes.constants`, made once per setting (building them cost ~0.3 ms a call,
    a few % of a forward+backward step at the Lorenz shape)."""
    grams = taylor_gram_matrices(n_orders, n_taylor, dtype, torch.device("cpu"))
    g0, g1, g2 = (g.numpy() for g in grams)
    w2 = torch.tensor([w * w for w in weights], dtype=dtype).numpy()
    return g0, g1, g2, w2


def _empty(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


@dataclass
class LaneFactor:
    """Block Cholesky factors of N systems in the lane layout of :mod:`lane_kernels`.

    Attributes:
        chol: ``(G, T, m(m-1)/2, W)``; rdiag: ``(G, T, m, W)``; G = ceil(N / W) groups of W
        systems (the last system repeated in the lanes past N).
        steps: ``(N, Th)``, the step sizes of the factorized matrix (its coupling blocks are
        rebuilt from them in every solve).  constants: g0, g1, g2, squared weights (numpy).
        n_systems: N.  failed_at: ``(N,)`` int64, 1 + first step with a failed pivot (not
        above :func:`pivot_floor` times its diagonal entry of M_t), 0 where none.
        l1: ``(G, T, m, m, W)``, l2: ``(G, T, D, m, W)``: with central rows only, the stored
        off-diagonal blocks of the block Cholesky factor (:mod:`lane_kernels`); else None.
        threads: the threads of every solve with the factor (:func:`n_workers`; None: torch's
        count at the time of the solve).
    """

    chol: torch.Tensor
    rdiag: torch.Tensor
    steps: torch.Tensor
    constants: tuple
    n_systems: int
    failed_at: torch.Tensor
    l1: torch.Tensor | None = None
    l2: torch.Tensor | None = None
    kernels: ModuleType | None = None  # lane_kernels.kernels(width) that made the factor
    threads: int | None = None
    _replicated: tuple | None = field(default=None, repr=False)

    @property
    def width(self) -> int:
        """W, the lanes per group of the factor's kernels (``kernels.LANES``)."""
        return self.kernels.LANES

    @property
    def central(self) -> bool:
        return self.l1 is not None

    @property
    def n_steps(self) -> int:
        return self.chol.shape[1]

    @property
    def block_size(self) -> int:
        return self.rdiag.shape[2]

    def failed(self) -> torch.Tensor:
        """``(N,)`` bool: systems whose factorization met a failed pivot (:func:`pivot_floor`)."""
        return self.failed_at > 0

    def layout(self, columns: bool) -> tuple[torch.Tensor, ...]:
        """(chol, rdiag, l1, l2) for lanes of systems, or for lanes of columns: ``(N, T, ..., W)``
        with system n in every lane of group n (made once, then kept). Without central rows
        l1 and l2 are empty placeholders."""
        arrays = (self.chol, self.rdiag, *self._couplings())
        if not columns:
            return arrays
        if self._replicated is None:
            N, W = self.n_systems, self.width
            if N == 1:
                self._replicated = arrays  # one system: already in every lane
            else:

                def replicate(x: torch.Tensor) -> torch.Tensor:
                    if x.shape[0] == 0:
                        return x
                    per_system = x.movedim(-1, 1).reshape(-1, *x.shape[1:-1])[:N]
                    return per_system[..., None].expand(*per_system.shape, W).contiguous()

                self._replicated = tuple(replicate(x) for x in arrays)
        return self._replicated

    def _couplings(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.central:
            return self.l1, self.l2
        placeholder = torch.empty((0, 0, 0, 0, self.width), dtype=self.chol.dtype)
        return placeholder, placeholder

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """Solve M x = rhs for ``rhs`` ``(N, T, m, P)``; returns ``(N, T, m, P)``."""
        N, T, m = self.n_systems, self.n_steps, self.block_size
        if rhs.dim() != 4 or tuple(rhs.shape[:3]) != (N, T, m):
            raise ValueError(
                f"rhs must have shape (N={N}, T={T}, m={m}, P), got {tuple(rhs.shape)}"
            )
        rhs = rhs.detach().to(self.chol.dtype).contiguous()
        return self._solve(rhs=rhs)

    def _solve(
        self,
        rhs: torch.Tensor | None = None,
        coef: torch.Tensor | None = None,
        rhs_eq: torch.Tensor | None = None,
        init: torch.Tensor | None = None,
        sizes: _Sizes | None = None,
    ) -> torch.Tensor:
        """x = M^{-1} r for r = ``rhs`` (N, T, m, P), or assembled in the kernel from ``coef``
        (N, Tc, E, m), ``rhs_eq`` (N, Tb, E, P) and ``init`` (N, Su, D*K, P) with ``sizes``.
        Sets ``self.bad_input`` (a right-hand side or initial value not finite)."""
        N, T, m = self.n_systems, self.n_steps, self.block_size
        dtype = self.chol.dtype
        if rhs is not None:
            P = rhs.shape[3]
            coef, rhs_eq = _empty(dtype, 0, 1, 1, m), _empty(dtype, 0, 1, 1, P)
            init = _empty(dtype, 0, 1, 0, P)
            S = K = 0
        else:
            P = rhs_eq.shape[3]
            rhs = _empty(dtype, 0, T, m, P)
            S, K = sizes.n_init_steps, sizes.n_init_orders
        W = self.width
        columns = lanes_are_columns(N, P, W, self.threads)
        chol, rdiag, l1, l2 = self.layout(columns)
        n_jobs = N * -(-P // W) if columns else chol.shape[0]
        out = hugepages.empty((N, T, m, P), dtype)
        bad_input = torch.zeros(max(n_jobs, 1), dtype=torch.int64)
        if P > 0:
            _run_kernel(
                self.kernels.solve,
                n_jobs,
                lane_kernels.Factor(chol.numpy(), rdiag.numpy(), l1.numpy(), l2.numpy()),
                self.central,
                lane_kernels.Inputs(coef.numpy(), self.steps.numpy(), rhs_eq.numpy(), init.numpy()),
                rhs.numpy(),
                lane_kernels.Sizes(T, 0, S, K),
                lane_kernels.Constants(*self.constants, 0.0),
                columns,
                out.numpy(),
                bad_input.numpy(),
                threads=self.threads,
            )
        self.bad_input = bool(bad_input.any())
        return out


# ------------------------------------------------------------------ ode_forward


@dataclass
class _Outcome:
    """What the forward pass reports besides u: the factor and whether an input was bad."""

    factor: LaneFactor | None = None
    bad_input: bool = False


def _factor_kernel(
    coef, steps, rhs_eq, init, sizes: _Sizes, x: torch.Tensor, kernels: ModuleType | None = None
) -> LaneFactor:
    """Run the forward kernel of ``kernels`` (``x`` (N, T, m, P); P = 0: factorize only).
    Returns the factor with ``bad_input`` set."""
    kernels = kernels or lane_kernels.kernels()
    N, m = coef.shape[0], coef.shape[3]
    T, W, D = sizes.n_steps, kernels.LANES, sizes.n_dims
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
        kernels=kernels,
        threads=sizes.threads,
    )
    if sizes.central:
        factor.l1 = hugepages.empty((G, T, m, m, W), dtype)
        factor.l2 = hugepages.empty((G, T, D, m, W), dtype)
    bad_input = torch.zeros(G, dtype=torch.int64)
    _run_kernel(
        kernels.forward_central if sizes.central else kernels.forward,
        G,
        lane_kernels.Inputs(coef.numpy(), steps.numpy(), rhs_eq.numpy(), init.numpy()),
        lane_kernels.Sizes(T, sizes.n_dims, sizes.n_init_steps, sizes.n_init_orders),
        lane_kernels.Constants(*constants, pivot_floor(m, dtype)),
        lane_kernels.Factor(*(a.numpy() for a in factor.layout(False))),
        x.numpy(),
        factor.failed_at.numpy(),
        bad_input.numpy(),
        threads=sizes.threads,
    )
    factor.bad_input = bool(bad_input.any())
    return factor


class _FusedLaneSolve(torch.autograd.Function):
    """u = M(c, h)^{-1} r(c, b, u0) in one forward and one backward kernel.

    forward(coef (N, Tc, E, m), steps (N, Th), rhs_eq (N, Tb, E, P), init (N, Su, D*K, P),
    sizes, outcome) -> x (N, T, m, P). Lanes of systems: the fused forward kernel. Lanes of
    columns (:func:`lanes_are_columns`): the forward kernel without right-hand sides, then the
    solve kernel. Saved for backward: the inputs, x and the factor (O(T) memory; the backward
    pass does no second factorization).
    """

    @staticmethod
    def forward(ctx, coef, steps, rhs_eq, init, sizes: _Sizes, outcome: _Outcome):
        coef = coef.detach().contiguous()
        steps = steps.detach().contiguous()
        rhs_eq = rhs_eq.detach().contiguous()
        init = init.detach().contiguous()
        N, m, P = coef.shape[0], coef.shape[3], rhs_eq.shape[3]
        T, dtype = sizes.n_steps, coef.dtype
        kernels = kernels_for(N, P, sizes.threads)
        columns = lanes_are_columns(N, P, kernels.LANES, sizes.threads)
        if columns:
            no_rhs = (_empty(dtype, N, 1, rhs_eq.shape[2], 0), _empty(dtype, N, 1, 0, 0))
            x_none = _empty(dtype, N, T, m, 0)
            factor = _factor_kernel(coef, steps, *no_rhs, sizes, x_none, kernels)
            bad_lhs = factor.bad_input
            x = factor._solve(coef=coef, rhs_eq=rhs_eq, init=init, sizes=sizes)
            outcome.bad_input = bad_lhs or factor.bad_input
        else:
            x = hugepages.empty((N, T, m, P), dtype)
            factor = _factor_kernel(coef, steps, rhs_eq, init, sizes, x, kernels)
            outcome.bad_input = factor.bad_input
        outcome.factor = factor
        ctx.sizes = sizes
        ctx.factor = factor
        ctx.columns = columns
        ctx.save_for_backward(coef, steps, rhs_eq, init, x)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x):
        coef, steps, rhs_eq, init, x = ctx.saved_tensors
        sizes, factor, columns = ctx.sizes, ctx.factor, ctx.columns
        grad_x = grad_x.detach().to(coef.dtype).contiguous()
        N, P = coef.shape[0], rhs_eq.shape[3]
        Q = -(-P // factor.width)
        n_jobs = N * Q if columns else factor.chol.shape[0]
        J = N * Q if columns else N
        grad_coef = hugepages.empty((J, *coef.shape[1:]), coef.dtype)
        grad_steps = hugepages.empty((J, steps.shape[1]), coef.dtype)
        grad_rhs_eq = hugepages.empty(tuple(rhs_eq.shape), coef.dtype)
        grad_init = hugepages.empty(tuple(init.shape), coef.dtype)
        chol, rdiag, l1, l2 = factor.layout(columns)
        if P > 0:
            _run_kernel(
                factor.kernels.backward,
                n_jobs,
                grad_x.numpy(),
                x.numpy(),
                lane_kernels.Inputs(coef.numpy(), steps.numpy(), rhs_eq.numpy(), init.numpy()),
                lane_kernels.Sizes(
                    sizes.n_steps, sizes.n_dims, sizes.n_init_steps, sizes.n_init_orders
                ),
                lane_kernels.Constants(*factor.constants, 0.0),
                lane_kernels.Factor(chol.numpy(), rdiag.numpy(), l1.numpy(), l2.numpy()),
                factor.central,
                columns,
                lane_kernels.Gradients(
                    grad_coef.numpy(), grad_steps.numpy(), grad_rhs_eq.numpy(), grad_init.numpy()
                ),
                threads=factor.threads,
            )
        else:
            for g in (grad_coef, grad_steps):
                g.zero_()
        if columns:
            grad_coef, grad_steps = (_sum_jobs(g, N, Q) for g in (grad_coef, grad_steps))
        grads = (grad_coef, grad_steps, grad_rhs_eq, grad_init)
        needed = ctx.needs_input_grad[:4]
        return (*(g if need else None for g, need in zip(grads, needed, strict=True)), None, None)


def _sum_jobs(partials: torch.Tensor, n_systems: int, n_column_groups: int) -> torch.Tensor:
    """(N * Q, ...) per-job partial sums -> (N, ...), summed in job order (deterministic)."""
    out = torch.empty((n_systems, *partials.shape[1:]), dtype=partials.dtype)
    lane_kernels.kernels().sum_job_partials(
        partials.reshape(partials.shape[0], -1).numpy(),
        n_column_groups,
        out.view(n_systems, -1).numpy(),
    )
    return out


def _sizes(problem: OdeProblem, weights, central: bool, threads: int | None = None) -> _Sizes:
    return _Sizes.of(problem, weights, central, threads)


def fused_ode_forward(
    problem: OdeProblem,
    weights: tuple[float, float, float],
    check_values: bool,
    check_pivots: bool,
    central: bool = False,
    threads: int | None = None,
) -> torch.Tensor:
    """u ``(*batch, T, D, R)`` for a problem validated with ``check_values=False``.

    Args:
        problem: shapes checked by :func:`~smnn.solver.inputs.prepare_problem`.
        weights: (w_eq, w_in, w_s) as python floats.
        central: central smoothness rows on (block pentadiagonal normal matrix).
        check_values: raise the usual ValueError for non-finite inputs or steps <= 0.
        check_pivots: raise :class:`~smnn.solver.banded.NonPositivePivotError` for systems whose
            normal matrix is not positive definite.
        threads: the kernels' threads (:func:`n_workers`; None: torch's count).
    """
    T, D, R = problem.n_steps, problem.n_dims, problem.n_orders
    batch, lhs_batch = tuple(problem.batch_shape), tuple(problem.lhs_batch_shape)
    folding = BatchFolding(batch, lhs_batch)
    coef, steps = fold_lhs_inputs(problem, lhs_batch)
    rhs_eq, init = fold_rhs_inputs(problem, folding, problem.rhs_equation, problem.init_vars)
    outcome = _Outcome()
    sizes = _sizes(problem, weights, central, threads)
    x = _FusedLaneSolve.apply(coef, steps, rhs_eq, init, sizes, outcome)
    if check_values and outcome.bad_input:
        check_values_of(
            problem.coefficients, problem.rhs_equation, problem.init_vars, problem.steps
        )
    if check_pivots:
        raise_if_failed(outcome.factor, lhs_batch)
    return folding.unfold(x).reshape(*batch, T, D, R)


# ------------------------------------------------------------------ factorize


class _FactorSolve(torch.autograd.Function):
    """x = M^{-1} r(b, u0) with a stored :class:`LaneFactor` of M (coefficients frozen).

    forward(rhs_eq (N, Tb, E, P), init (N, Su, D*K, P), lhs) -> x (N, T, m, P). Backward:
    lambda = M^{-1} g with the stored factor, dl/db_t = w_eq^2 C_t lambda_t and
    dl/du0_t = w_in^2 lambda_t on the initial entries (summed over a size-1 step axis).
    """

    @staticmethod
    def forward(ctx, rhs_eq, init, lhs: LaneLeftHandSide):
        rhs_eq = rhs_eq.detach().contiguous()
        init = init.detach().contiguous()
        x = lhs.factor._solve(coef=lhs.coef, rhs_eq=rhs_eq, init=init, sizes=lhs.sizes)
        ctx.lhs = lhs
        ctx.shapes = (tuple(rhs_eq.shape), tuple(init.shape))
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x):
        lhs = ctx.lhs
        sizes = lhs.sizes
        (N, Tb, E, P), (_, Su, DK, _) = ctx.shapes
        T, D, R = sizes.n_steps, sizes.n_dims, sizes.n_orders
        S, K = sizes.n_init_steps, sizes.n_init_orders
        w_eq, w_in = sizes.weights[0], sizes.weights[1]
        lam = lhs.factor.solve(grad_x)  # (N, T, m, P)
        grad_rhs_eq = grad_init = None
        if ctx.needs_input_grad[0]:
            coef = lhs.coef.expand(N, T, E, D * R)
            g = torch.einsum("ntem,ntmp->ntep", coef, lam) * (w_eq * w_eq)
            grad_rhs_eq = g if Tb == T else g.sum(1, keepdim=True)
        if ctx.needs_input_grad[1]:
            lam_init = lam[:, :S].reshape(N, S, D, R, P)[:, :, :, :K].reshape(N, S, D * K, P)
            g = lam_init * (w_in * w_in)
            grad_init = g if Su == S else g.sum(1, keepdim=True)
        return grad_rhs_eq, grad_init, None


@dataclass
class LaneLeftHandSide:
    """A factorized left-hand side on the lane engine (what :func:`smnn.solver.factorize`
    keeps): the factor, the folded coefficients it was made from (``coef`` (N, Tc, E, m)), the
    sizes and weights, and the left-hand side's batch shape."""

    factor: LaneFactor
    coef: torch.Tensor
    sizes: _Sizes
    lhs_batch_shape: torch.Size

    def solve(self, problem: OdeProblem, check_values: bool) -> torch.Tensor:
        """u ``(*batch, T, D, R)`` for the right-hand sides of ``problem`` (same left-hand
        side)."""
        T, D, R = problem.n_steps, problem.n_dims, problem.n_orders
        batch = tuple(problem.batch_shape)
        folding = BatchFolding(batch, tuple(self.lhs_batch_shape))
        rhs_eq, init = fold_rhs_inputs(problem, folding, problem.rhs_equation, problem.init_vars)
        x = _FactorSolve.apply(rhs_eq, init, self)
        if check_values and self.factor.bad_input:
            check_finite("rhs_equation", problem.rhs_equation)
            check_finite("init_vars", problem.init_vars)
        return folding.unfold(x).reshape(*batch, T, D, R)


def lane_factorize(
    problem: OdeProblem,
    weights: tuple[float, float, float],
    check_pivots: bool,
    central: bool = False,
    threads: int | None = None,
) -> LaneLeftHandSide:
    """Factorize the left-hand side of ``problem`` (its values checked by the caller) on the
    lane engine; the right-hand sides of ``problem`` are not used. ``threads``: the kernels'
    threads in the factorization and every later solve (None: torch's count at each call)."""
    lhs_batch = tuple(problem.lhs_batch_shape)
    coef, steps = (x.detach().contiguous() for x in fold_lhs_inputs(problem, lhs_batch))
    sizes = _sizes(problem, weights, central, threads)
    N, E, m, dtype = coef.shape[0], coef.shape[2], coef.shape[3], coef.dtype
    no_rhs = (_empty(dtype, N, 1, E, 0), _empty(dtype, N, 1, 0, 0))
    factor = _factor_kernel(coef, steps, *no_rhs, sizes, _empty(dtype, N, problem.n_steps, m, 0))
    if check_pivots:
        raise_if_failed(factor, lhs_batch)
    return LaneLeftHandSide(factor, coef, sizes, problem.lhs_batch_shape)
