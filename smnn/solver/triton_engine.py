"""The GPU engine: the sequential block factorization and its substitutions as Triton kernels
(docs/solver.md sections 4, 5, 8 and 11; user guide: docs/gpu.md).

What runs where, per call of :func:`triton_ode_forward`:

1. the blocks of the normal equations (docs/solver.md section 3: ``diag`` M_t, ``sub``
   M_{t+1,t}, with central rows paired into super-blocks of 2m as in
   :mod:`smnn.solver.layout`) and the right-hand side are assembled by the torch formulas of
   :mod:`smnn.solver.blocks`: a fixed number of batched ops over all steps at once, with no
   loop over T, so autograd carries the gradients of the blocks to the coefficients, steps,
   right-hand sides and initial values;
2. one launch of :func:`~smnn.solver.triton_kernels.block_cholesky_kernel` factorizes every
   system (one lane per system, the sweep over T inside the kernel), one launch of
   :func:`~smnn.solver.triton_kernels.block_solve_kernel` substitutes every right-hand-side
   column (one lane per column);
3. backward: one more launch of the solve kernel (lambda = M^{-1} g with the stored factor,
   no second factorization), then the block gradients -lambda_t u_t^T and
   -(lambda_{t+1} u_t^T + u_{t+1} lambda_t^T) as batched ops (:mod:`smnn.solver.autograd`).

The sequential dependency over T lives in the kernels only, so a call costs a fixed number of
launches instead of a few per step (the torch path). Every sum is a fixed-order torch reduction
or a per-lane loop: the same inputs give the same bits (no atomics).

``import smnn`` does not import triton; this module imports it only inside the functions that
launch kernels (:func:`triton_available` tries the import).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from smnn.solver.autograd import solve_with_factor
from smnn.solver.banded import pivot_tolerance, raise_if_failed
from smnn.solver.blocks import build_lhs_blocks, build_rhs
from smnn.solver.inputs import OdeProblem, check_finite, check_values_of
from smnn.solver.layout import BatchFolding, pair_rhs, pair_steps, unpair_solution

__all__ = [
    "TRITON_METHODS",
    "TritonFactor",
    "TritonLeftHandSide",
    "interpreter_on",
    "triton_available",
    "triton_factorize",
    "triton_ode_forward",
    "triton_path_applies",
    "triton_unavailable_reason",
]

# methods the Triton engine runs ('auto' means the sequential block factorization)
TRITON_METHODS = ("auto", "sequential")
# elements of one [BLOCK, NP, NP] tile a program holds per step (4 per thread of 4 warps):
# small tiles make many programs, and the sweep over T is latency-bound (not yet tuned on a GPU)
_TILE_ELEMENTS = 512


def interpreter_on() -> bool:
    """Whether Triton's interpreter is requested (``TRITON_INTERPRET=1``): kernels then run
    on CPU tensors. Triton reads the variable when it is first imported."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> tuple[bool, str]:
    """(True, '') when Triton kernels can run here, else (False, why): triton must import,
    and either a CUDA device must be present or the interpreter be on."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return False, (
            f"the triton package cannot be imported ({err}); install it with "
            "`pip install triton` (or the extra `smnn[gpu]`)"
        )
    if interpreter_on() and not torch.cuda.is_available() and not _interpreter_loaded():
        return False, (
            "TRITON_INTERPRET=1 was set after triton was imported, so triton's own library "
            "functions are compiled-only and the interpreter cannot run the kernels; set the "
            "variable before anything imports triton (e.g. in the shell)"
        )
    if interpreter_on() or torch.cuda.is_available():
        return True, ""
    return False, "no CUDA device is available and TRITON_INTERPRET=1 is not set"


def _interpreter_loaded() -> bool:
    """Whether triton's language library was defined under the interpreter: triton decides
    per function, when it is defined, so TRITON_INTERPRET set after ``import triton`` leaves
    the library compiled-only and every interpreted launch fails inside it."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton engine cannot run on tensors of ``device`` (None when it can)."""
    ok, why = triton_available()
    if not ok:
        return why
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_on():
        return None
    return (
        f"the tensors are on {device}; Triton kernels run on CUDA tensors (or on CPU tensors "
        "under Triton's interpreter, TRITON_INTERPRET=1 set before triton is imported)"
    )


def triton_path_applies(
    device: torch.device,
    backend: str,
    method: str,
    plain_weights,
    cuda_graphs,
    dtype: torch.dtype | None = None,
) -> bool:
    """Whether the Triton engine serves a call (the dispatch rule, docs/gpu.md).

    - ``backend='triton'``: always, or a ValueError saying why it cannot (triton missing, the
      tensors neither on CUDA nor on CPU under the interpreter, a method other than 'auto' or
      'sequential', weights that need gradients, a CUDA-graph pool given). 'auto' then means
      the sequential sweep (the normal equations) in either dtype.
    - ``backend='auto'``: CUDA tensors, triton importable, plain-number weights, no CUDA-graph
      pool, and a method that resolves to the normal equations: 'sequential', or 'auto' in
      float64 (``dtype``; in float32 'auto' means the QR sweep,
      :func:`smnn.solver.api.choose_method`, which runs on the torch path).
      ``method='auto'`` in float64 on CUDA thus means Triton's sequential sweep (2 launches
      forward, 1 backward, whatever T) instead of the torch path's cyclic reduction: a
      documented rule until a GPU has measured it (docs/gpu.md).
      Everything else keeps the torch path.
    - any other backend: never.
    """
    if backend == "triton":
        why = triton_unavailable_reason(device)
        if why is None and method not in TRITON_METHODS:
            why = f"method={method!r} is not implemented on Triton (it runs {TRITON_METHODS})"
        if why is None and plain_weights is None:
            why = (
                "weights that need gradients are not supported on Triton; pass numbers or "
                "tensors without requires_grad, or use backend='torch'"
            )
        if why is None and cuda_graphs is not None:
            why = "cuda_graphs replays the torch path; do not pass it with backend='triton'"
        if why is not None:
            raise ValueError(f"backend='triton' cannot run this call: {why}")
        return True
    if backend != "auto" or device.type != "cuda":
        return False
    if method == "auto" and dtype == torch.float32:
        return False
    return (
        method in TRITON_METHODS
        and plain_weights is not None
        and cuda_graphs is None
        and triton_available()[0]
    )


def _launching():
    """Context of a kernel launch: under the interpreter, numpy's warnings for the NaN of a
    failed pivot are silenced (a compiled kernel makes the same NaN silently)."""
    if not interpreter_on():
        return contextlib.nullcontext()
    import numpy as np

    return np.errstate(invalid="ignore", divide="ignore")


def _block_config(n: int) -> tuple[int, int]:
    """(NP, BLOCK): the padded tile size (a power of two >= n) and the lanes per program."""
    NP = max(2, 1 << (n - 1).bit_length())
    return NP, max(1, _TILE_ELEMENTS // (NP * NP))


@dataclass
class TritonFactor:
    """Block Cholesky factor of N block-tridiagonal SPD systems, made by the Triton kernels.

    Attributes:
        cinv: ``(T, n, n, N)``, C_t^{-1} (C_t the lower Cholesky factor of pivot D_t).
        wmul: ``(T, n, n, N)``, W_t = M_{t,t-1} C_{t-1}^{-T} (slot 0 unused).
        failed_at: ``(N,)`` int64, 1 + the first step with a non-positive pivot, 0 where none.
    """

    cinv: torch.Tensor
    wmul: torch.Tensor
    failed_at: torch.Tensor

    @property
    def n_systems(self) -> int:
        return self.cinv.shape[3]

    @property
    def n_steps(self) -> int:
        return self.cinv.shape[0]

    @property
    def block_size(self) -> int:
        return self.cinv.shape[1]

    def failed(self) -> torch.Tensor:
        """``(N,)`` bool: systems whose factorization met a non-positive pivot."""
        return self.failed_at > 0

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """Solve M x = rhs for ``rhs`` ``(N, T, n, P)``; returns ``(N, T, n, P)`` (one launch)."""
        from smnn.solver.triton_kernels import block_solve_kernel

        N, T, n = self.n_systems, self.n_steps, self.block_size
        if rhs.dim() != 4 or tuple(rhs.shape[:3]) != (N, T, n):
            raise ValueError(
                f"rhs must have shape (N={N}, T={T}, n={n}, P), got {tuple(rhs.shape)}"
            )
        P = rhs.shape[3]
        if N * P >= 2**31 // max(n, 1):
            raise ValueError(f"too many right-hand sides for one launch: N*P*n = {N * P * n}")
        lanes = rhs.detach().to(self.cinv.dtype).permute(1, 2, 0, 3).contiguous()  # (T, n, N, P)
        out = torch.empty_like(lanes)
        if N * P > 0:
            NP, BLOCK = _block_config(n)
            grid = (triton_cdiv(N * P, BLOCK),)
            with _launching():
                block_solve_kernel[grid](
                    self.cinv, self.wmul, lanes, out, N, P, T, NB=n, NP=NP, BLOCK=BLOCK
                )
        return out.permute(2, 0, 1, 3)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def factorize_blocks(diag: torch.Tensor, sub: torch.Tensor) -> TritonFactor:
    """Factorize ``diag`` ``(N, T, n, n)`` and ``sub`` ``(N, T-1, n, n)`` in one launch.

    A pivot fails as on the torch path (not finite, or not above
    :func:`~smnn.solver.banded.pivot_tolerance` times its diagonal entry of M_t); failures are
    recorded in ``failed_at``, not raised
    (see :func:`~smnn.solver.banded.raise_if_failed`)."""
    from smnn.solver.triton_kernels import block_cholesky_kernel

    N, T, n, _ = diag.shape
    if N * n * n >= 2**31:
        raise ValueError(f"too many systems for one launch: N*n*n = {N * n * n}")
    d = diag.detach().permute(1, 2, 3, 0).contiguous()
    s = sub.detach().permute(1, 2, 3, 0).contiguous()
    if s.numel() == 0:  # T = 1: the kernel never reads it, but needs a valid pointer
        s = d.new_zeros(1, n, n, max(N, 1))
    cinv = torch.empty_like(d)
    wmul = torch.empty_like(d)
    scale = pivot_tolerance(n, d.dtype)
    failed_at = torch.zeros(N, dtype=torch.int64, device=d.device)
    if N > 0:
        NP, BLOCK = _block_config(n)
        grid = (triton_cdiv(N, BLOCK),)
        with _launching():
            block_cholesky_kernel[grid](
                d, s, cinv, wmul, failed_at, N, T, scale, NB=n, NP=NP, BLOCK=BLOCK
            )
    return TritonFactor(cinv, wmul, failed_at)


@dataclass
class TritonLeftHandSide:
    """A factorized left-hand side on the Triton engine (what :func:`triton_factorize` returns):
    the factor and the (differentiable) canonical blocks it was made from, ``diag``
    ``(N, T', n, n)`` and ``sub`` ``(N, T'-1, n, n)`` (T' = ceil(T/2), n = 2m with central
    rows)."""

    factor: TritonFactor
    central: bool
    lhs_batch_shape: torch.Size
    diag: torch.Tensor
    sub: torch.Tensor
    weights: tuple

    def solve(self, problem: OdeProblem, check_values: bool) -> torch.Tensor:
        """u ``(*batch, T, D, R)`` for the right-hand sides of ``problem`` (same left-hand
        side); differentiable in the right-hand sides (and in the blocks when they carry
        gradients, as in :func:`triton_ode_forward`)."""
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
        x = solve_with_factor(self.diag, self.sub, folding.fold_rhs(rhs), self.factor)
        x = folding.unfold(x)
        if self.central:
            x = unpair_solution(x, T)
        return x.reshape(*problem.batch_shape, T, D, R)


def _check_method(method: str) -> None:
    if method not in TRITON_METHODS:
        raise ValueError(
            f"method={method!r} is not implemented on Triton (it runs {TRITON_METHODS})"
        )


def _check_device(problem: OdeProblem) -> None:
    why = triton_unavailable_reason(problem.coefficients.device)
    if why is not None:
        raise ValueError(f"backend='triton' cannot run this call: {why}")


def _lhs(problem: OdeProblem, weights, central: bool, check_pivots: bool) -> TritonLeftHandSide:
    w_eq, w_in, w_s = weights
    blocks = build_lhs_blocks(problem, w_eq, w_in, w_s, central)
    diag, sub = blocks.diag, blocks.sub
    if central:
        diag, sub = pair_steps(diag, sub, blocks.sub2)
    folding = BatchFolding(tuple(problem.batch_shape), tuple(problem.lhs_batch_shape))
    diag_c, sub_c = folding.fold_lhs(diag), folding.fold_lhs(sub)
    factor = factorize_blocks(diag_c, sub_c)
    if check_pivots:
        raise_if_failed(factor, tuple(problem.lhs_batch_shape))
    return TritonLeftHandSide(factor, central, problem.lhs_batch_shape, diag_c, sub_c, weights)


def triton_ode_forward(
    problem: OdeProblem,
    plain_weights: tuple[float, float, float],
    check_inputs: bool,
    check_pivots: bool,
    central: bool,
    method: str = "auto",
) -> torch.Tensor:
    """u ``(*batch, T, D, R)`` on the Triton engine for a problem whose shapes are checked
    (:func:`~smnn.solver.inputs.prepare_problem`); differentiable in the coefficients,
    right-hand sides, initial values and steps.

    Args:
        plain_weights: (w_eq, w_in, w_s) as python floats.
        check_inputs: raise the usual ValueError for non-finite values or steps <= 0.
        check_pivots: raise :class:`~smnn.solver.banded.NonPositivePivotError` naming the
            systems whose normal matrix is not positive definite (else those come back NaN).
        central: central smoothness rows (steps paired into super-blocks of 2m).
        method: 'auto' or 'sequential' (the block Cholesky sweep).
    """
    _check_method(method)
    _check_device(problem)
    if check_inputs:
        check_values_of(
            problem.coefficients, problem.rhs_equation, problem.init_vars, problem.steps
        )
    lhs = _lhs(problem, plain_weights, central, check_pivots)
    return lhs.solve(problem, check_values=False)


def triton_factorize(
    problem: OdeProblem,
    plain_weights: tuple[float, float, float],
    check_pivots: bool,
    central: bool,
    method: str = "auto",
) -> TritonLeftHandSide:
    """Factorize the left-hand side of ``problem`` (values checked by the caller) once; the
    returned object's ``.solve(problem, check_values)`` substitutes new right-hand sides
    (gradients reach those only) and ``.factor`` is the :class:`TritonFactor`."""
    _check_method(method)
    _check_device(problem)
    with torch.no_grad():
        return _lhs(problem, plain_weights, central, check_pivots)
