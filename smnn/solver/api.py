"""Public solver entry points: :func:`ode_forward` and :func:`factorize` (docs/solver.md 1-8).

``ode_forward`` is a drop-in replacement for the authors' published function (same positional
arguments, same order, same meaning): switching is a change of import. Our own options (method,
backend, checks) are keyword-only and come after.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from smnn.solver.autograd import solve_with_factor
from smnn.solver.banded import (
    NonPositivePivotError,
    factorize_block_tridiagonal,
    raise_if_failed,
    resolve_backend,
)
from smnn.solver.blocks import build_lhs_blocks, build_rhs
from smnn.solver.cuda_graphs import CudaGraphPool
from smnn.solver.cyclic import factorize_cyclic
from smnn.solver.factor import Factor
from smnn.solver.frozen import FROZEN_LHS_CACHE
from smnn.solver.inputs import (
    OdeProblem,
    check_finite,
    check_values_of,
    check_weight,
    prepare_problem,
)
from smnn.solver.layout import BatchFolding, pair_rhs, pair_steps, unpair_solution
from smnn.solver.qr import qr_factorize_problem, qr_ode_forward

__all__ = ["ode_forward", "factorize", "OdeFactorization", "METHODS"]

METHODS = ("auto", "sequential", "cyclic", "qr")
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _check_options(method: str, dtype: torch.dtype) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"inputs must be float32 or float64, got {dtype}")


def choose_method(
    method: str, n_steps: int, cuda_graphs=None, dtype: torch.dtype | None = None
) -> str:
    """Resolve ``method='auto'``.

    - An explicit ``cuda_graphs`` pool: 'sequential' (the only method it replays).
    - float32 (``dtype``): 'qr', always. The normal equations square cond(A): in float32 they
      lose every digit on stiff, long or growing problems (docs/solver.md, "The orthogonal
      (QR) solve", accuracy table), where the QR sweep keeps about 1e-6.
    - float64: the normal equations (LDL^T), because they cost less than QR everywhere it was
      measured and lose nothing that matters at cond(A)^2 * 1e-16 on these problems. QR would
      be chosen where it costs at most 1.3x the LDL^T time; it costs more at every named shape
      (docs/solver.md, "The orthogonal (QR) solve", time table, forward + backward on the CPU torch
      path, SST and long scaled down: QR / best torch LDL^T = 2.9x Lorenz, 2.8x KdV, 3.7x SST, 12.7x
      long, 3.5x coupled; 31x-75x the LDL^T lane engine, the CPU default).
    - Among the LDL^T methods: 'sequential' on every engine. Cyclic reduction (ceil(log2 T)
      dependent levels instead of T) is faster on the torch path beyond a handful of steps
      (docs/performance.md), but its pivots, taken in odd-even order, can all pass the pivot
      check where the problem is too ill-conditioned for the normal equations: on
      u^(4) + u = b with steps of 0.01 and T = 200 (tests/test_auto_fallback.py) it returned
      a 20 % error without a word, where the sequential sweep's pivot check fails (and
      'auto' then retries by QR, :func:`ode_forward`). Ask for 'cyclic' where the problems
      are known to be well conditioned.
    """
    if method != "auto":
        return method
    if cuda_graphs is not None:
        return "sequential"
    if dtype == torch.float32:
        return "qr"
    return "sequential"


def _runs_qr(method: str, problem: OdeProblem, cuda_graphs=None) -> bool:
    """Whether this call runs the QR sweep (:mod:`smnn.solver.qr`)."""
    dtype = problem.coefficients.dtype
    if method == "qr" and cuda_graphs is not None:
        raise ValueError(
            "cuda_graphs replays the sequential LDL^T path only; method='qr' does not use it "
            "(pass cuda_graphs=None)"
        )
    return choose_method(method, problem.n_steps, cuda_graphs, dtype) == "qr"


def _torch_factor(diag: torch.Tensor, sub: torch.Tensor, method: str, cuda_graphs=None) -> Factor:
    if cuda_graphs is not None:
        cuda_graphs.check_device(diag)
        if method != "sequential":
            raise ValueError(
                "cuda_graphs captures the sequential torch path only; use method='sequential' "
                f"(or 'auto') with CUDA tensors, got method={method!r}"
            )
        return cuda_graphs.factorize(diag, sub)
    if method == "cyclic":
        return factorize_cyclic(diag, sub)
    return factorize_block_tridiagonal(diag, sub)


@dataclass
class _TorchLeftHandSide:
    """A factorized left-hand side on the torch path, in canonical layout (see
    :mod:`smnn.solver.banded`): the factor and the (differentiable) blocks it was made from,
    ``diag`` (N, T', n, n) and ``sub`` (N, T'-1, n, n), T' = ceil(T/2) with central rows."""

    factor: Factor
    central: bool
    lhs_batch_shape: torch.Size
    diag: torch.Tensor
    sub: torch.Tensor
    weights: tuple

    def solve(self, problem: OdeProblem, check_values: bool) -> torch.Tensor:
        """u ``(*batch, T, D, R)`` for the right-hand sides of ``problem``."""
        if check_values:
            check_finite("rhs_equation", problem.rhs_equation)
            check_finite("init_vars", problem.init_vars)
        rhs = build_rhs(
            problem,
            problem.rhs_equation,
            problem.init_vars,
            weight_equation=self.weights[0],
            weight_init_var=self.weights[1],
        )
        T, D, R = problem.n_steps, problem.n_dims, problem.n_orders
        if self.central:
            rhs = pair_rhs(rhs)
        folding = BatchFolding(tuple(problem.batch_shape), tuple(self.lhs_batch_shape))
        x = solve_with_factor(self.diag, self.sub, folding.fold_rhs(rhs).contiguous(), self.factor)
        x = folding.unfold(x)
        if self.central:
            x = unpair_solution(x, T)
        return x.reshape(*problem.batch_shape, T, D, R)


def _plain_weights(weights: tuple) -> tuple[float, float, float] | None:
    """The weights as floats, or None when one of them needs a gradient."""
    out = []
    for w in weights:
        if isinstance(w, torch.Tensor):
            if w.requires_grad:
                return None
            w = w.item()
        out.append(float(w))
    return tuple(out)


def _check_central(problem: OdeProblem, central: bool) -> None:
    if central and problem.n_orders < 2:
        raise ValueError(
            "enable_central_smoothness needs n_orders R >= 2 (it constrains orders R-2, R-1), "
            f"got R={problem.n_orders}"
        )


def _uses_lanes(problem, weights, central, method, backend, cuda_graphs) -> bool:
    """Whether the lane engine (:mod:`smnn.solver.fused`) serves this problem. Resolving the
    backend imports nothing heavy; the lane engine itself is imported only when it serves."""
    device = problem.coefficients.device
    if resolve_backend(backend, device) != "numba":
        return False
    from smnn.solver.fused import fused_path_applies

    return fused_path_applies(device, "numba", method, _plain_weights(weights), cuda_graphs)


def _uses_triton(problem, weights, method, backend, cuda_graphs) -> bool:
    """Whether the Triton engine (:mod:`smnn.solver.triton_engine`, docs/gpu.md) serves this
    problem: CUDA tensors with backend 'auto', or backend='triton' (a ValueError saying why
    when it cannot run). Triton is imported only when it serves."""
    device = problem.coefficients.device
    if backend not in ("auto", "triton") or (backend == "auto" and device.type != "cuda"):
        return False
    from smnn.solver.triton_engine import triton_path_applies

    plain, dtype = _plain_weights(weights), problem.coefficients.dtype
    return triton_path_applies(device, backend, method, plain, cuda_graphs, dtype=dtype)


def _qr_uses_lanes(problem, weights, backend, cuda_graphs) -> bool:
    """Whether the QR sweep runs on the CPU lane engine (:mod:`smnn.solver.qr_lanes`): CPU
    tensors, the numba backend, plain-number weights; otherwise the torch QR
    (:mod:`smnn.solver.qr`) serves, on any device."""
    device = problem.coefficients.device
    return (
        resolve_backend(backend, device) == "numba"
        and _plain_weights(weights) is not None
        and cuda_graphs is None
    )


def _factorize_torch(
    problem: OdeProblem,
    weights: tuple,
    central: bool,
    method: str,
    check_pivots: bool,
    cuda_graphs=None,
) -> _TorchLeftHandSide:
    w_eq, w_in, w_s = weights
    blocks = build_lhs_blocks(problem, w_eq, w_in, w_s, central)
    diag, sub = blocks.diag, blocks.sub
    if central:
        diag, sub = pair_steps(diag, sub, blocks.sub2)
    folding = BatchFolding(tuple(problem.batch_shape), tuple(problem.lhs_batch_shape))
    diag_c = folding.fold_lhs(diag)
    sub_c = folding.fold_lhs(sub)
    method = choose_method(method, diag_c.shape[1], cuda_graphs)
    with torch.no_grad():
        factor = _torch_factor(diag_c.detach(), sub_c.detach(), method, cuda_graphs)
    if check_pivots:
        raise_if_failed(factor, tuple(problem.lhs_batch_shape))
    return _TorchLeftHandSide(factor, central, problem.lhs_batch_shape, diag_c, sub_c, weights)


def _check_weights(weight_equation, weight_init_var, weight_smooth) -> tuple:
    check_weight("weight_equation", weight_equation)
    check_weight("weight_init_var", weight_init_var)
    check_weight("weight_smooth", weight_smooth)
    return weight_equation, weight_init_var, weight_smooth


_STEP_AXIS = {"coefficients": 4, "rhs_equation": 2, "init_vars": 3, "steps": 1}


def _steps_last(coefficients, rhs_equation, init_vars, steps):
    """``is_step_dim_first`` inputs -> the usual layout (views; autograd flows through).

    Inputs of too low a rank (or not tensors) are passed on unchanged, so that
    :func:`~smnn.solver.inputs.prepare_problem` refuses them with its usual message.
    """
    moved = []
    for i, x in zip(
        _STEP_AXIS.values(), (coefficients, rhs_equation, init_vars, steps), strict=True
    ):
        if isinstance(x, torch.Tensor) and x.dim() >= i:
            x = x.movedim(0, -i)
        moved.append(x)
    return moved


def _frozen_version(value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"frozen_lhs_cache_version must be an int >= 0, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"frozen_lhs_cache_version must be an int >= 0, got {value!r}") from None
    if v < 0:
        raise ValueError(f"frozen_lhs_cache_version must be an int >= 0, got {v}")
    return v


def _check_threads(threads) -> int | None:
    """``threads`` as given (None, or an int >= 1); a ValueError naming it otherwise."""
    if threads is None:
        return None
    if isinstance(threads, bool):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    try:
        n = operator.index(threads)
    except TypeError:
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}") from None
    if n < 1:
        raise ValueError(f"threads must be None or an int >= 1, got {n}")
    return n


def _frozen_key(version, problem, weights, central, method, backend, threads) -> tuple:
    c, h = problem.coefficients, problem.steps
    return (
        version,
        tuple(c.shape),
        tuple(h.shape),
        problem.n_steps,
        problem.n_init_var_steps,
        problem.n_init_orders,
        c.dtype,
        c.device,
        tuple(float(w) for w in weights),
        central,
        method,
        backend,
        threads,
    )


def ode_forward(
    coefficients: torch.Tensor,
    rhs_equation: torch.Tensor,
    init_vars: torch.Tensor,
    steps: torch.Tensor,
    n_steps: int | None = None,
    n_init_var_steps: int | None = None,
    is_step_dim_first: bool = False,
    weight_equation: float | torch.Tensor = 1.0,
    weight_init_var: float | torch.Tensor = 1.0,
    weight_smooth: float | torch.Tensor = 1.0,
    enable_central_smoothness: bool = False,
    prefer_cuda_graph: bool = True,
    frozen_lhs_cache_version: int = 0,
    *,
    method: str = "auto",
    backend: str = "auto",
    check_inputs: bool = True,
    check_pivots: bool = True,
    cuda_graphs: CudaGraphPool | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """Least-squares solution of a batch of linear ODEs (docs/solver.md, "Inputs, shapes,
    broadcasting" to "Backward pass").

    A drop-in replacement for the authors' published ``ode_forward``: the same positional
    arguments in the same order and with the same meaning; our own options are keyword-only.

    Args:
        coefficients: ``(..., T or 1, E, D, R)``; c[t,e,d,k] multiplies the k-th derivative of
            state d in equation e at step t.
        rhs_equation: ``(..., T or 1, E)``.
        init_vars: ``(..., S or 1, D, K)``: values of orders k < K on the first S steps.
            S = 0 or K = 0 (e.g. shape ``(..., 0, D, 0)``) means no initial-value rows: the
            system is then fixed by the equation and smoothness rows alone.
        steps: ``(..., T-1 or 1)``, step sizes > 0.
        n_steps: T, when ``steps`` has a size-1 step axis (default ``steps.shape[-1] + 1``).
        n_init_var_steps: S (default ``init_vars.shape[-3]``).
        is_step_dim_first: every input has its step axis first: ``(T or 1, ..., E, D, R)``,
            ``(T or 1, ..., E)``, ``(S or 1, ..., D, K)``, ``(T-1 or 1, ...)``; so has the output,
            ``(T, ..., D, R)``.
        weight_equation, weight_init_var, weight_smooth: positive scalar row weights (python
            numbers or 0-dim tensors; tensors receive gradients).
        enable_central_smoothness: add the central rows on the two top orders and drop the top
            order's Taylor rows (block pentadiagonal normal matrix).
        prefer_cuda_graph: on a CUDA device, when the call runs the sequential method on the
            torch path and ``cuda_graphs`` is None, replay it from CUDA graphs kept in a
            bounded default pool (:func:`smnn.solver.cuda_graphs.default_pool`). No effect on
            CPU, or when another method is chosen.
        frozen_lhs_cache_version: ``v > 0``: the caller promises that the coefficients, steps
            and weights are the same in every call with this ``v``. The first such call
            factorizes the left-hand side (:func:`factorize`) and stores the factorization in
            a bounded LRU cache (:mod:`smnn.solver.frozen`: 8 entries, keyed by ``v`` with the
            shapes of the coefficients and steps, T, S, K, dtype, device, weights, central flag,
            method, backend and threads; :func:`~smnn.solver.frozen.clear_frozen_lhs_cache` empties
            it); later calls only substitute. Gradients then reach ``rhs_equation`` and
            ``init_vars`` only, in every call with ``v > 0``. ``0`` (default): no caching.
        method: 'sequential' (block LDL^T, T dependent steps), 'cyclic' (block cyclic
            reduction, ceil(log2 T) dependent levels), 'qr' (the orthogonal solve of
            :mod:`smnn.solver.qr`: never forms A^T A, error grows with cond(A) instead of
            cond(A)^2; on CUDA the Triton kernels of :mod:`smnn.solver.triton_qr` where
            Triton serves the call, docs/gpu.md) or 'auto' (see :func:`choose_method`: 'qr'
            for float32, the sequential LDL^T sweep for float64, whose failed pivots, with
            ``check_pivots``, are retried by 'qr': the normal equations square cond(A)).
        backend: 'auto' (compiled numba kernels on CPU when numba imports; on CUDA the Triton
            kernels when triton imports and they serve the call, docs/gpu.md; batched torch
            ops otherwise), 'numba', 'torch' or 'triton'.
        check_inputs: validate values (finite, steps > 0); shapes are always checked.
        check_pivots: raise :class:`~smnn.solver.banded.NonPositivePivotError` naming the batch
            entries whose normal matrix is not numerically positive definite (an LDL^T pivot
            below n * eps of its diagonal entry) or, with 'qr', whose problem is numerically
            rank deficient; off: those come back NaN.
        cuda_graphs: a caller-owned :class:`~smnn.solver.cuda_graphs.CudaGraphPool`: replay
            the sequential torch path from captured CUDA graphs (CUDA tensors only).
        threads: the number of threads of the CPU lane engines' compiled kernels (the numba
            paths, LDL^T and QR): an int >= 1, or None (default) for torch's own count,
            ``torch.get_num_threads()``, read at each call. Passing it leaves torch's count as
            it was; the same thread count gives the same bits either way. The torch and Triton
            paths ignore it (torch ops use torch's count).

    Returns:
        u: ``(*batch, T, D, R)`` (``(T, *batch, D, R)`` with ``is_step_dim_first``),
        u[t,d,k] ~ k-th derivative of state d at step t, where ``batch`` is the broadcast of all
        inputs' batch dims.

    Gradients flow to every tensor input through a custom backward pass that reuses the
    factorization (one extra pair of substitutions, O(T) memory).
    """
    if is_step_dim_first:
        coefficients, rhs_equation, init_vars, steps = _steps_last(
            coefficients, rhs_equation, init_vars, steps
        )
    version = _frozen_version(frozen_lhs_cache_version)
    problem = prepare_problem(
        coefficients, rhs_equation, init_vars, steps, n_steps, n_init_var_steps, False
    )
    weights = _check_weights(weight_equation, weight_init_var, weight_smooth)
    central = bool(enable_central_smoothness)
    _check_options(method, problem.coefficients.dtype)
    threads = _check_threads(threads)
    if version > 0:
        u = _frozen_solve(
            version, problem, weights, central, method, backend, check_inputs, check_pivots,
            threads,
        )  # fmt: skip
    else:
        u = _solve_problem(
            problem, weights, central, method, backend, check_inputs, check_pivots, cuda_graphs,
            threads, prefer_cuda_graph,
        )  # fmt: skip
    return u.movedim(-3, 0) if is_step_dim_first else u


def _default_graphs(problem, weights, central, method, backend):
    """The default CUDA-graph pool when ``prefer_cuda_graph`` applies (see ode_forward)."""
    device = problem.coefficients.device
    if device.type != "cuda" or resolve_backend(backend, device) != "torch":
        return None
    if _uses_triton(problem, weights, method, backend, None):
        return None
    T = problem.n_steps
    T_canonical = (T + 1) // 2 if central else T
    if choose_method(method, T_canonical, dtype=problem.coefficients.dtype) != "sequential":
        return None
    from smnn.solver.cuda_graphs import default_pool

    return default_pool()


def _frozen_solve(
    version, problem, weights, central, method, backend, check_inputs, check_pivots, threads
):
    key = _frozen_key(version, problem, weights, central, method, backend, threads)

    def make() -> OdeFactorization:
        return factorize(
            problem.coefficients,
            problem.steps,
            n_init_orders=problem.n_init_orders,
            n_steps=problem.n_steps,
            n_init_var_steps=problem.n_init_var_steps,
            weight_equation=weights[0],
            weight_init_var=weights[1],
            weight_smooth=weights[2],
            enable_central_smoothness=central,
            method=method,
            backend=backend,
            check_inputs=check_inputs,
            check_pivots=check_pivots,
            threads=threads,
        )

    factorization = FROZEN_LHS_CACHE.get_or_create(key, make)
    return factorization.solve(problem.rhs_equation, problem.init_vars, check_inputs=check_inputs)


def _falls_back_to_qr(method: str, problem: OdeProblem, check_pivots: bool, cuda_graphs) -> bool:
    """Whether a failed pivot of this call is retried by QR: ``method='auto'`` resolved to the
    normal equations (float64), pivots checked, and no CUDA-graph pool passed by the caller
    (a pool replays the sequential LDL^T path only; the default pool of ``prefer_cuda_graph``
    does not count). A pivot fails where cond(A)^2 * eps is too large for the normal
    equations; the QR sweep needs only cond(A) * eps (docs/solver.md, "The orthogonal (QR)
    solve"). QR's own rank check then decides: a truly rank-deficient problem still raises."""
    return (
        method == "auto" and check_pivots and cuda_graphs is None and not _runs_qr(method, problem)
    )


def _solve_problem(
    problem, weights, central, method, backend, check_inputs, check_pivots, cuda_graphs,
    threads=None, prefer_cuda_graph=False,
):  # fmt: skip
    """u of ``problem`` by the method and engine the options pick (with ``prefer_cuda_graph``
    and no pool given, the default CUDA-graph pool where it applies); with ``method='auto'``
    a failed LDL^T pivot is retried by QR (:func:`_falls_back_to_qr`)."""
    graphs = cuda_graphs
    if graphs is None and prefer_cuda_graph:
        graphs = _default_graphs(problem, weights, central, method, backend)
    try:
        return _solve_problem_by(
            problem, weights, central, method, backend, check_inputs, check_pivots, graphs,
            threads,
        )  # fmt: skip
    except NonPositivePivotError:
        if not _falls_back_to_qr(method, problem, check_pivots, cuda_graphs):
            raise
        return _solve_problem_by(
            problem, weights, central, "qr", backend, check_inputs, check_pivots, None, threads
        )


def _solve_problem_by(
    problem, weights, central, method, backend, check_inputs, check_pivots, cuda_graphs,
    threads=None,
):  # fmt: skip
    _check_central(problem, central)
    if _uses_triton(problem, weights, method, backend, cuda_graphs):
        from smnn.solver.triton_engine import triton_ode_forward

        plain = _plain_weights(weights)
        return triton_ode_forward(problem, plain, check_inputs, check_pivots, central, method)
    if _runs_qr(method, problem, cuda_graphs):
        resolve_backend(backend, problem.coefficients.device)  # validates the name
        if _qr_uses_lanes(problem, weights, backend, cuda_graphs):
            from smnn.solver.qr_lanes import qr_lane_ode_forward

            plain = _plain_weights(weights)
            return qr_lane_ode_forward(problem, plain, check_inputs, check_pivots, central, threads)
        if check_inputs:
            check_values_of(
                problem.coefficients, problem.rhs_equation, problem.init_vars, problem.steps
            )
        return qr_ode_forward(problem, weights, central, check_pivots)
    if _uses_lanes(problem, weights, central, method, backend, cuda_graphs):
        from smnn.solver.fused import fused_ode_forward

        plain = _plain_weights(weights)
        return fused_ode_forward(problem, plain, check_inputs, check_pivots, central, threads)
    if check_inputs:
        check_values_of(
            problem.coefficients, problem.rhs_equation, problem.init_vars, problem.steps
        )
    lhs = _factorize_torch(problem, weights, central, method, check_pivots, cuda_graphs)
    return lhs.solve(problem, check_values=False)


class OdeFactorization:
    """A factorized left-hand side, reusable for many right-hand sides (docs/solver.md, "Reusing a
    factorization").

    Create with :func:`factorize`; call :meth:`solve` with ``rhs_equation`` and ``init_vars``.
    The object is owned by the caller (no hidden cache). The coefficients and steps are frozen
    (detached) at factorization time: gradients flow to ``rhs_equation`` and ``init_vars`` only.
    """

    def __init__(self, problem: OdeProblem, lhs):
        self._problem = problem
        self._lhs = lhs

    @property
    def factor(self) -> Factor:
        """The factorization (a :class:`~smnn.solver.factor.Factor`)."""
        return self._lhs.factor

    @property
    def n_steps(self) -> int:
        return self._problem.n_steps

    @property
    def lhs_batch_shape(self) -> torch.Size:
        return self._problem.lhs_batch_shape

    def solve(
        self, rhs_equation: torch.Tensor, init_vars: torch.Tensor, check_inputs: bool = True
    ) -> torch.Tensor:
        """u ``(*batch, T, D, R)`` for ``rhs_equation`` ``(..., T or 1, E)`` and ``init_vars``
        ``(..., S or 1, D, K)`` with the factorized coefficients and steps."""
        p = self._problem
        problem = prepare_problem(
            p.coefficients,
            rhs_equation,
            init_vars,
            p.steps,
            p.n_steps,
            p.n_init_var_steps,
            check_values=False,
        )
        if problem.n_init_orders != p.n_init_orders:
            raise ValueError(
                f"init_vars fixes K={problem.n_init_orders} orders but the factorization was "
                f"made for n_init_orders={p.n_init_orders}"
            )
        return self._lhs.solve(problem, check_values=check_inputs)


def factorize(
    coefficients: torch.Tensor,
    steps: torch.Tensor,
    *,
    n_init_orders: int,
    n_steps: int | None = None,
    n_init_var_steps: int = 1,
    weight_equation: float | torch.Tensor = 1.0,
    weight_init_var: float | torch.Tensor = 1.0,
    weight_smooth: float | torch.Tensor = 1.0,
    enable_central_smoothness: bool = False,
    method: str = "auto",
    backend: str = "auto",
    check_inputs: bool = True,
    check_pivots: bool = True,
    threads: int | None = None,
) -> OdeFactorization:
    """Factorize the normal matrix of fixed coefficients and steps once (docs/solver.md, "Reusing a
    factorization").

    Args:
        coefficients: ``(..., T or 1, E, D, R)``.
        steps: ``(..., T-1 or 1)``.
        n_init_orders: K, the number of derivative orders fixed by ``init_vars`` (K <= R).
        n_init_var_steps: S, the number of initial-value steps.
        threads: the lane engines' threads in the factorization and in every ``solve`` of the
            result (None: torch's count at each call), as in :func:`ode_forward`.
        Other arguments as in :func:`ode_forward`.

    Returns:
        An :class:`OdeFactorization`; ``fac.solve(rhs_equation, init_vars)`` equals
        ``ode_forward(coefficients, rhs_equation, init_vars, steps, ...)`` but skips the
        factorization (on the CPU lane engine to the bit: the same kernels assemble the
        right-hand side and substitute). Gradients reach ``rhs_equation`` and ``init_vars``
        only. The factorization runs where ``ode_forward`` with the same options would run (the
        lane engine on CPU with numba, the torch path otherwise; ``method='qr'``, and 'auto'
        in float32, keeps the Householder reflectors of every step and rotates each new
        right-hand side by them: QR accuracy, no normal equations).
    """
    if not isinstance(n_init_orders, int) or n_init_orders < 0:
        raise ValueError(f"n_init_orders must be an int >= 0, got {n_init_orders!r}")
    if not isinstance(n_init_var_steps, int) or n_init_var_steps < 0:
        raise ValueError(f"n_init_var_steps must be an int >= 0, got {n_init_var_steps!r}")
    if not isinstance(coefficients, torch.Tensor) or coefficients.dim() < 4:
        raise ValueError(
            "coefficients must be a tensor of shape (..., T or 1, E, D, R), got "
            f"{getattr(coefficients, 'shape', type(coefficients).__name__)}"
        )
    c = coefficients.detach()
    h = steps.detach() if isinstance(steps, torch.Tensor) else steps
    E, D = c.shape[-3], c.shape[-2]
    placeholder_b = c.new_zeros(1, E)
    placeholder_u0 = c.new_zeros(1, D, n_init_orders)
    problem = prepare_problem(
        c, placeholder_b, placeholder_u0, h, n_steps, n_init_var_steps, check_inputs
    )
    weights = tuple(
        w.detach() if isinstance(w, torch.Tensor) else w
        for w in _check_weights(weight_equation, weight_init_var, weight_smooth)
    )
    central = bool(enable_central_smoothness)
    _check_options(method, problem.coefficients.dtype)
    threads = _check_threads(threads)
    _check_central(problem, central)
    try:
        return _factorize_problem(problem, weights, central, method, backend, check_pivots, threads)
    except NonPositivePivotError:
        if not _falls_back_to_qr(method, problem, check_pivots, None):
            raise
        return _factorize_problem(problem, weights, central, "qr", backend, check_pivots, threads)


def _factorize_problem(
    problem, weights, central, method, backend, check_pivots, threads
) -> OdeFactorization:
    """The factorization of :func:`factorize` (arguments checked) by the method and engine
    the options pick."""
    if _uses_triton(problem, weights, method, backend, None):
        from smnn.solver.triton_engine import triton_factorize

        plain = _plain_weights(weights)
        return OdeFactorization(
            problem, triton_factorize(problem, plain, check_pivots, central, method)
        )
    if _runs_qr(method, problem):
        resolve_backend(backend, problem.coefficients.device)  # validates the name
        if _qr_uses_lanes(problem, weights, backend, None):
            from smnn.solver.qr_lanes import qr_lane_factorize

            plain = _plain_weights(weights)
            return OdeFactorization(
                problem, qr_lane_factorize(problem, plain, check_pivots, central, threads)
            )
        return OdeFactorization(
            problem, qr_factorize_problem(problem, weights, central, check_pivots)
        )
    if _uses_lanes(problem, weights, central, method, backend, None):
        from smnn.solver.fused import lane_factorize

        lhs = lane_factorize(problem, _plain_weights(weights), check_pivots, central, threads)
    else:
        with torch.no_grad():
            lhs = _factorize_torch(problem, weights, central, method, check_pivots)
    return OdeFactorization(problem, lhs)
