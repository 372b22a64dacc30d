"""The GPU engine: the sequential block factorization and its substitutions as Triton kernels
(docs/solver.md, "Solving M u = r in O(T)", "Backward pass" and "Reusing a factorization"; user
guide: docs/gpu.md).

Launches per call (:mod:`smnn.solver.triton_kernels`; one lane per system, the sweep over T
inside the kernel, every block of the normal equations assembled in the kernel from the
coefficients, steps and weights and never stored):

- ``ode_forward``: forward **1** launch of
  :func:`~smnn.solver.triton_kernels.ode_sweep_kernel` (assemble M_t, M_{t+1,t} and r_t,
  factorize, forward substitution in the same step, then back substitution); backward **1**
  launch of :func:`~smnn.solver.triton_kernels.ode_backward_kernel` (lambda = M^{-1} g with the
  stored factor, then the gradients of the coefficients, steps, right-hand sides and initial
  values per system), plus a few fixed-order torch reductions over shared inputs (a step axis of
  size 1, the batch dims the inputs broadcast over: autograd's sums of the expanded inputs);
- ``factorize``: **1** launch (the same kernel without right-hand sides); each ``solve``:
  **1** launch forward (the right-hand sides assembled in the kernel, the same operations as
  ``ode_forward``: the same bits), **1** backward; :meth:`TritonFactor.solve` (assembled
  right-hand sides, lanes = columns): **1** launch of
  :func:`~smnn.solver.triton_kernels.block_solve_kernel`;
- calls whose offsets would pass 2**31 elements (:func:`_fits_one_launch`), and
  ``ode_forward`` calls with many columns per system (:func:`_columns_in_lanes`), take the
  blocks path: blocks assembled by torch (:mod:`smnn.solver.blocks`), **2** launches forward
  (:func:`~smnn.solver.triton_kernels.block_cholesky_kernel`, ``block_solve_kernel``), **1**
  backward plus the block gradients through torch autograd.

- ``method='qr'`` (and 'auto' in float32, :func:`resolve_triton_method`): the orthogonal
  sweep of :mod:`smnn.solver.triton_qr` (rows built by torch, **1** launch forward and **1**
  backward, one more each in float32 for the refinement; ``factorize`` 1, each solve 2 in
  float64, 3 in float32).

A lane carries its system's P right-hand-side columns one after another; a left-hand side
shared by many right-hand sides (P > 8 and P > N, the Lorenz pattern: one system, P = batch)
would leave most lanes idle, so such ``ode_forward`` calls take the blocks path, whose solve
puts each column in its own lane (:func:`_columns_in_lanes`).

Every sum is a fixed-order per-lane loop or a fixed-order torch reduction: the same inputs give
the same bits (no atomics). Weights and Gram constants reach the kernels in a tensor of the
inputs' dtype (a python float argument would be float32).

``import smnn`` does not import triton; this module imports it only inside the functions that
launch kernels (:func:`triton_available` tries the import).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from smnn.solver.autograd import solve_with_factor
from smnn.solver.banded import pivot_tolerance, raise_if_failed
from smnn.solver.blocks import build_lhs_blocks, build_rhs, taylor_gram_matrices
from smnn.solver.inputs import OdeProblem, check_finite, check_values_of
from smnn.solver.layout import (
    BatchFolding,
    EngineSizes,
    fold_lhs_inputs,
    fold_rhs_inputs,
    pair_rhs,
    pair_steps,
    unpair_solution,
)

__all__ = [
    "TRITON_METHODS",
    "TritonFactor",
    "TritonLeftHandSide",
    "interpreter_on",
    "resolve_triton_method",
    "triton_available",
    "triton_factorize",
    "triton_ode_forward",
    "triton_path_applies",
    "triton_unavailable_reason",
]

# methods the Triton engine runs ('auto': the sequential block factorization in float64, the
# QR sweep in float32, as smnn.solver.api.choose_method; resolve_triton_method)
TRITON_METHODS = ("auto", "sequential", "qr")
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


def resolve_triton_method(method: str, dtype: torch.dtype) -> str:
    """'sequential' or 'qr': what ``method`` (one of :data:`TRITON_METHODS`) runs on Triton.
    'auto' means the QR sweep in float32 (the normal equations square cond(A) and lose every
    digit there on stiff or long problems, :func:`smnn.solver.api.choose_method`) and the
    sequential block factorization in float64 (cheaper, and nothing lost at cond(A)^2 * 1e-16)."""
    if method == "auto":
        return "qr" if dtype == torch.float32 else "sequential"
    return method


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
      tensors neither on CUDA nor on CPU under the interpreter, a method other than 'auto',
      'sequential' or 'qr', weights that need gradients, a CUDA-graph pool given). 'auto'
      then means the QR sweep in float32 and the sequential sweep in float64
      (:func:`resolve_triton_method`).
    - ``backend='auto'``: CUDA tensors, triton importable, plain-number weights, no CUDA-graph
      pool, and a method of :data:`TRITON_METHODS` ('auto', 'sequential' or 'qr'; not
      'cyclic'). ``method='auto'`` on CUDA thus means Triton's sequential sweep in float64
      (1 launch forward, 1 backward, whatever T) instead of the torch path's sequential
      sweep replayed from CUDA graphs, and Triton's QR sweep in float32
      (:mod:`smnn.solver.triton_qr`) instead of the torch path's QR: a documented rule until
      a GPU has measured it (docs/gpu.md).
      Everything else keeps the torch path. (``dtype`` is accepted for callers that pass it;
      the rule no longer depends on it.)
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


def _check_method(method: str) -> None:
    if method not in TRITON_METHODS:
        raise ValueError(
            f"method={method!r} is not implemented on Triton (it runs {TRITON_METHODS})"
        )


def _check_device(problem: OdeProblem) -> None:
    why = triton_unavailable_reason(problem.coefficients.device)
    if why is not None:
        raise ValueError(f"backend='triton' cannot run this call: {why}")


# ------------------------------------------------------------------ fused: assembly in the kernel


@dataclass(frozen=True)
class _Sizes(EngineSizes):
    """What the fused kernels need besides the tensors (T, D, R, S, K, weights, central;
    :class:`~smnn.solver.layout.EngineSizes`)."""

    @property
    def pair(self) -> int:
        return 2 if self.central else 1

    @property
    def block_size(self) -> int:
        """m = D*R, the unknowns of one step."""
        return self.n_dims * self.n_orders

    @property
    def super_steps(self) -> int:
        """T2: the steps of the canonical block-tridiagonal system (ceil(T/2) with pairs)."""
        return -(-self.n_steps // self.pair)

    def constants(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``(3*R*R + 3,)``: G0, G1, G2 of :func:`smnn.solver.blocks.taylor_gram_matrices`
        (Taylor orders 0..R-1, or 0..R-2 with central rows), then w_eq^2, w_in^2, w_s^2, in
        ``dtype`` (Triton passes python floats as float32)."""
        R = self.n_orders
        n_taylor = R - 1 if self.central else R
        grams = torch.stack(taylor_gram_matrices(R, n_taylor, dtype, device)).reshape(-1)
        w2 = torch.tensor([w * w for w in self.weights], dtype=dtype, device=device)
        return torch.cat([grams, w2])


def _sizes(problem: OdeProblem, weights, central: bool) -> _Sizes:
    return _Sizes.of(problem, weights, central)


def _pointer(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a one-element tensor in its place when it is empty (a kernel argument must be a
    valid pointer even where every load of it is masked)."""
    return x if x.numel() > 0 else x.new_zeros(1)


@dataclass
class _LaneInputs:
    """The fused kernels' inputs, batch last (see :mod:`smnn.solver.triton_kernels`), and the
    stride of each step axis (0 for a size-1 axis shared by every step)."""

    coef: torch.Tensor  # (Tc, E, m, N)
    steps: torch.Tensor  # (Th, N)
    rhs: torch.Tensor  # (Tb, E, N*P)
    init: torch.Tensor  # (Su, D*K, N*P)
    n_systems: int
    n_columns: int

    @property
    def strides(self) -> tuple[int, int, int, int]:
        """(sc, sh, sb, su): elements per step of coef, steps, rhs and init."""
        N, P = self.n_systems, self.n_columns
        Tc, E, m = self.coef.shape[:3]
        Tb, Su, DK = self.rhs.shape[0], self.init.shape[0], self.init.shape[1]
        return (
            E * m * N if Tc > 1 else 0,
            N if self.steps.shape[0] > 1 else 0,
            E * N * P if Tb > 1 else 0,
            DK * N * P if Su > 1 else 0,
        )


def _lane_lhs(coef: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """coef ``(N, Tc, E, m)`` -> ``(Tc, E, m, N)``, steps ``(N, Th)`` -> ``(Th, N)``."""
    return coef.detach().permute(1, 2, 3, 0).contiguous(), steps.detach().t().contiguous()


def _lane_rhs(rhs_eq: torch.Tensor, init: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rhs_eq ``(N, Tb, E, P)`` -> ``(Tb, E, N*P)``, init ``(N, Su, D*K, P)`` ->
    ``(Su, D*K, N*P)``."""

    def lanes(x: torch.Tensor) -> torch.Tensor:
        N, Ts, A, P = x.shape
        return x.detach().permute(1, 2, 0, 3).reshape(Ts, A, N * P).contiguous()

    return lanes(rhs_eq), lanes(init)


# right-hand-side columns a lane of the fused kernels carries before a call moves its columns
# into lanes (the blocks path's solve, one lane per column)
_MAX_COLUMNS_PER_LANE = 8


def _columns_in_lanes(n_systems: int, n_columns: int) -> bool:
    """Few systems shared by many right-hand sides (the Lorenz pattern: N = 1, P = batch): a
    lane of the fused kernels would substitute its P columns one after another, so such calls
    take the blocks path, whose solve puts each column in its own lane."""
    return n_columns > _MAX_COLUMNS_PER_LANE and n_columns > n_systems


def _fits_one_launch(sizes: _Sizes, N: int, P: int, E: int) -> bool:
    """Whether every offset of the fused kernels fits in 32 bits (they index whole arrays from
    their base pointers); larger calls take the blocks path."""
    T2, nb, m = sizes.super_steps, sizes.pair * sizes.block_size, sizes.block_size
    largest = max(
        (T2 + 1) * nb * nb * N,
        (T2 + 1) * nb * N * max(P, 1),
        sizes.n_steps * E * m * N,
        sizes.n_steps * E * N * max(P, 1),
        sizes.n_steps * N,
    )
    return largest < 2**31


def _sweep(lanes: _LaneInputs, sizes: _Sizes, factor: TritonFactor | None):
    """One launch of :func:`~smnn.solver.triton_kernels.ode_sweep_kernel`: factorize (when
    ``factor`` is None) and solve the ``n_columns`` right-hand sides it assembles.

    Returns (x ``(T2, NB, N*P)`` in super-steps, the factor)."""
    from smnn.solver.triton_kernels import ode_sweep_kernel

    N, P = lanes.n_systems, lanes.n_columns
    coef = lanes.coef
    E, m, dtype, device = coef.shape[1], coef.shape[2], coef.dtype, coef.device
    T2, nb = sizes.super_steps, sizes.pair * m
    factorize = factor is None
    if factorize:
        factor = TritonFactor(
            cinv=torch.empty((T2, nb, nb, N), dtype=dtype, device=device),
            wmul=torch.zeros((T2, nb, nb, N), dtype=dtype, device=device),
            failed_at=torch.zeros(N, dtype=torch.int64, device=device),
        )
    out = torch.empty((T2, nb, N * P), dtype=dtype, device=device)
    if N > 0 and (factorize or P > 0):
        NP, BLOCK = _block_config(nb)
        with _launching():
            ode_sweep_kernel[(triton_cdiv(N, BLOCK),)](
                _pointer(coef),
                _pointer(lanes.steps),
                _pointer(lanes.rhs),
                _pointer(lanes.init),
                sizes.constants(dtype, device),
                factor.cinv,
                factor.wmul,
                _pointer(out),
                factor.failed_at,
                N,
                P,
                sizes.n_steps,
                T2,
                sizes.n_init_steps,
                *lanes.strides,
                E,
                pivot_tolerance(nb, dtype),
                M=m,
                R=sizes.n_orders,
                K=sizes.n_init_orders,
                PAIR=sizes.pair,
                CENTRAL=sizes.central,
                FACTORIZE=factorize,
                NP=NP,
                BLOCK=BLOCK,
            )
    return out, factor


def _unpair_lanes(out: torch.Tensor, sizes: _Sizes, N: int, P: int) -> torch.Tensor:
    """``(T2, NB, N*P)`` in super-steps -> ``(N, T, m, P)``."""
    m = sizes.block_size
    x = out.reshape(sizes.super_steps * sizes.pair, m, N, P)[: sizes.n_steps]
    return x.permute(2, 0, 1, 3)


def _pair_lanes(x: torch.Tensor, sizes: _Sizes) -> torch.Tensor:
    """``(N, T, m, P)`` -> ``(T2, NB, N*P)``: inverse of :func:`_unpair_lanes` (zero at the
    padding step)."""
    N, T, m, P = x.shape
    lanes = x.permute(1, 2, 0, 3)
    pad = sizes.super_steps * sizes.pair - T
    if pad:
        lanes = torch.cat([lanes, lanes.new_zeros(pad, m, N, P)])
    return lanes.reshape(sizes.super_steps, sizes.pair * m, N * P).contiguous()


def _backward(grad_x, out, lanes: _LaneInputs, sizes: _Sizes, factor: TritonFactor, lhs: bool):
    """One launch of :func:`~smnn.solver.triton_kernels.ode_backward_kernel`; returns the
    gradients of coef ``(N, Tc, E, m)``, steps ``(N, Th)`` (None unless ``lhs``), rhs_eq
    ``(N, Tb, E, P)`` and init ``(N, Su, D*K, P)``, each step axis of size 1 summed over the
    steps (fixed-order torch sums)."""
    from smnn.solver.triton_kernels import ode_backward_kernel

    N, P = lanes.n_systems, lanes.n_columns
    coef = lanes.coef
    E, m, dtype, device = coef.shape[1], coef.shape[2], coef.dtype, coef.device
    T, S, K, D = sizes.n_steps, sizes.n_init_steps, sizes.n_init_orders, sizes.n_dims
    T2, nb = sizes.super_steps, sizes.pair * m
    g = _pair_lanes(grad_x.detach().to(dtype), sizes)
    lam = torch.empty_like(g)
    gcoef = torch.zeros((T, E, m, N), dtype=dtype, device=device)
    gsteps = torch.zeros((max(T - 1, 0), N), dtype=dtype, device=device)
    gcent = torch.zeros((max(T - 2, 0), N), dtype=dtype, device=device)
    grhs = torch.zeros((T, E, N * P), dtype=dtype, device=device)
    ginit = torch.zeros((S, D * K, N * P), dtype=dtype, device=device)
    if N > 0 and P > 0:
        NP, BLOCK = _block_config(nb)
        MP = max(2, 1 << (m - 1).bit_length())
        sc, sh, sb, _ = lanes.strides
        with _launching():
            ode_backward_kernel[(triton_cdiv(N, BLOCK),)](
                g,
                out,
                lam,
                factor.cinv,
                factor.wmul,
                _pointer(coef),
                _pointer(lanes.steps),
                _pointer(lanes.rhs),
                sizes.constants(dtype, device),
                gcoef,
                _pointer(gsteps),
                _pointer(gcent),
                grhs,
                _pointer(ginit),
                N,
                P,
                T,
                T2,
                S,
                sc,
                sh,
                sb,
                E,
                M=m,
                R=sizes.n_orders,
                K=K,
                PAIR=sizes.pair,
                CENTRAL=sizes.central,
                LHS_GRADS=lhs,
                NP=NP,
                MP=MP,
                BLOCK=BLOCK,
            )

    def per_system(x: torch.Tensor, shared: bool) -> torch.Tensor:
        Ts, A = x.shape[0], x.shape[1]
        x = x.reshape(Ts, A, N, P).permute(2, 0, 1, 3)
        return x.sum(1, keepdim=True) if shared else x

    grad_rhs = per_system(grhs, lanes.rhs.shape[0] == 1 and T > 1)
    Su, DK = lanes.init.shape[0], lanes.init.shape[1]
    if S == 0 or Su == 0 or DK == 0:
        grad_init = torch.zeros((N, Su, DK, P), dtype=dtype, device=device)
    else:
        grad_init = per_system(ginit, Su == 1 and S > 1)
    if not lhs:
        return None, None, grad_rhs, grad_init
    grad_coef = gcoef.permute(3, 0, 1, 2)
    if coef.shape[0] == 1 and T > 1:
        grad_coef = grad_coef.sum(1, keepdim=True)
    if sizes.central and T > 2:  # central row q reaches h_q and h_{q+1}
        gsteps[:-1] += gcent
        gsteps[1:] += gcent
    grad_steps = gsteps.t()
    if lanes.steps.shape[0] == 1:
        grad_steps = grad_steps.sum(1, keepdim=True)
    return grad_coef, grad_steps, grad_rhs, grad_init


class _FusedSolve(torch.autograd.Function):
    """u = M(c, h)^{-1} r(c, b, u0): one forward launch, one backward launch.

    forward(coef (N, Tc, E, m), steps (N, Th), rhs_eq (N, Tb, E, P), init (N, Su, D*K, P),
    sizes, holder) -> x (N, T, m, P); ``holder["factor"]`` receives the factor (for the pivot
    check). Saved: the inputs in lanes, x and the factor (O(T) memory, no second
    factorization). The backward pass is not itself differentiable.
    """

    @staticmethod
    def forward(ctx, coef, steps, rhs_eq, init, sizes: _Sizes, holder: dict):
        N, P = coef.shape[0], rhs_eq.shape[3]
        lanes = _LaneInputs(*_lane_lhs(coef, steps), *_lane_rhs(rhs_eq, init), N, P)
        out, factor = _sweep(lanes, sizes, None)
        holder["factor"] = factor
        ctx.lanes, ctx.sizes, ctx.factor = lanes, sizes, factor
        ctx.save_for_backward(out)
        return _unpair_lanes(out, sizes, N, P)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x):
        (out,) = ctx.saved_tensors
        lhs = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grads = _backward(grad_x, out, ctx.lanes, ctx.sizes, ctx.factor, lhs)
        needed = ctx.needs_input_grad[:4]
        return (*(g if need else None for g, need in zip(grads, needed, strict=True)), None, None)


class _FactorSolve(torch.autograd.Function):
    """x = M^{-1} r(b, u0) with a factor kept by :func:`triton_factorize` (coefficients and
    steps frozen): one launch forward (the right-hand sides assembled in the kernel), one
    backward (gradients of b and u0 only)."""

    @staticmethod
    def forward(ctx, rhs_eq, init, lhs: TritonLeftHandSide):
        N, P = rhs_eq.shape[0], rhs_eq.shape[3]
        lanes = _LaneInputs(lhs.coef, lhs.steps, *_lane_rhs(rhs_eq, init), N, P)
        out, _ = _sweep(lanes, lhs.sizes, lhs.factor)
        ctx.lanes, ctx.lhs = lanes, lhs
        ctx.save_for_backward(out)
        return _unpair_lanes(out, lhs.sizes, N, P)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x):
        (out,) = ctx.saved_tensors
        lhs = ctx.lhs
        _, _, grad_rhs, grad_init = _backward(grad_x, out, ctx.lanes, lhs.sizes, lhs.factor, False)
        return grad_rhs, grad_init, None


@dataclass
class TritonLeftHandSide:
    """A factorized left-hand side on the Triton engine (what :func:`triton_factorize` returns):
    the factor (one launch of the fused kernel without right-hand sides), the coefficients and
    steps it was made from in the kernels' layout (``coef`` ``(Tc, E, m, N)``, ``steps``
    ``(Th, N)``), the sizes and the left-hand side's batch shape. Every ``solve`` is one launch
    that assembles the right-hand sides and substitutes with the same operations as
    :func:`triton_ode_forward`, so both give the same bits."""

    factor: TritonFactor
    coef: torch.Tensor
    steps: torch.Tensor
    sizes: _Sizes
    lhs_batch_shape: torch.Size

    @property
    def central(self) -> bool:
        return self.sizes.central

    def solve(self, problem: OdeProblem, check_values: bool) -> torch.Tensor:
        """u ``(*batch, T, D, R)`` for the right-hand sides of ``problem`` (same left-hand
        side); differentiable in the right-hand sides and initial values."""
        if check_values:
            check_finite("rhs_equation", problem.rhs_equation)
            check_finite("init_vars", problem.init_vars)
        T, D, R = problem.n_steps, problem.n_dims, problem.n_orders
        batch = tuple(problem.batch_shape)
        folding = BatchFolding(batch, tuple(self.lhs_batch_shape))
        rhs_eq, init = fold_rhs_inputs(problem, folding, problem.rhs_equation, problem.init_vars)
        x = _FactorSolve.apply(rhs_eq, init, self)
        return folding.unfold(x).reshape(*batch, T, D, R)


# ------------------------------------------------------------------ blocks path (huge calls)


def _blocks_forward(
    problem: OdeProblem, weights, central: bool, check_pivots: bool
) -> torch.Tensor:
    """The blocks path, for calls whose offsets exceed 32 bits (:func:`_fits_one_launch`):
    blocks assembled by torch (:mod:`smnn.solver.blocks`), one factorize launch, one solve
    launch; backward: one solve launch and the block gradients through torch autograd."""
    w_eq, w_in, w_s = weights
    blocks = build_lhs_blocks(problem, w_eq, w_in, w_s, central)
    diag, sub = blocks.diag, blocks.sub
    if central:
        diag, sub = pair_steps(diag, sub, blocks.sub2)
    batch, lhs_batch = tuple(problem.batch_shape), tuple(problem.lhs_batch_shape)
    folding = BatchFolding(batch, lhs_batch)
    diag_c, sub_c = folding.fold_lhs(diag), folding.fold_lhs(sub)
    factor = factorize_blocks(diag_c, sub_c)
    if check_pivots:
        raise_if_failed(factor, lhs_batch)
    rhs = build_rhs(problem, problem.rhs_equation, problem.init_vars, None, w_eq, w_in)
    T, D, R = problem.n_steps, problem.n_dims, problem.n_orders
    if central:
        rhs = pair_rhs(rhs)
    x = folding.unfold(solve_with_factor(diag_c, sub_c, folding.fold_rhs(rhs), factor))
    if central:
        x = unpair_solution(x, T)
    return x.reshape(*batch, T, D, R)


# ------------------------------------------------------------------ entry points


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

    One launch forward (:func:`~smnn.solver.triton_kernels.ode_sweep_kernel`: assembly,
    factorization, both substitutions), one launch backward
    (:func:`~smnn.solver.triton_kernels.ode_backward_kernel`: every gradient); calls too large
    for 32-bit offsets, or with more than 8 right-hand sides per system and more of them than
    systems, take the blocks path (2 launches forward, 1 backward).

    Args:
        plain_weights: (w_eq, w_in, w_s) as python floats.
        check_inputs: raise the usual ValueError for non-finite values or steps <= 0.
        check_pivots: raise :class:`~smnn.solver.banded.NonPositivePivotError` naming the
            systems whose normal matrix is not positive definite (else those come back NaN).
        central: central smoothness rows (steps paired into super-blocks of 2m).
        method: 'sequential' (the block Cholesky sweep), 'qr' (the orthogonal sweep,
            :func:`smnn.solver.triton_qr.triton_qr_ode_forward`: 1 launch forward, 1
            backward, one more each in float32) or 'auto' (:func:`resolve_triton_method`).
    """
    _check_method(method)
    _check_device(problem)
    if check_inputs:
        check_values_of(
            problem.coefficients, problem.rhs_equation, problem.init_vars, problem.steps
        )
    weights = tuple(float(w) for w in plain_weights)
    if resolve_triton_method(method, problem.coefficients.dtype) == "qr":
        from smnn.solver.triton_qr import triton_qr_ode_forward

        return triton_qr_ode_forward(problem, weights, central, check_pivots)
    sizes = _sizes(problem, weights, central)
    batch, lhs_batch = tuple(problem.batch_shape), tuple(problem.lhs_batch_shape)
    folding = BatchFolding(batch, lhs_batch)
    coef, steps = fold_lhs_inputs(problem, lhs_batch)
    rhs_eq, init = fold_rhs_inputs(problem, folding, problem.rhs_equation, problem.init_vars)
    N, P = coef.shape[0], rhs_eq.shape[3]
    if _columns_in_lanes(N, P) or not _fits_one_launch(sizes, N, P, coef.shape[2]):
        return _blocks_forward(problem, weights, central, check_pivots)
    holder: dict = {}
    x = _FusedSolve.apply(coef, steps, rhs_eq, init, sizes, holder)
    if check_pivots:
        raise_if_failed(holder["factor"], lhs_batch)
    T, D, R = problem.n_steps, problem.n_dims, problem.n_orders
    return folding.unfold(x).reshape(*batch, T, D, R)


def triton_factorize(
    problem: OdeProblem,
    plain_weights: tuple[float, float, float],
    check_pivots: bool,
    central: bool,
    method: str = "auto",
) -> TritonLeftHandSide:
    """Factorize the left-hand side of ``problem`` (values checked by the caller) in one
    launch; the returned object's ``.solve(problem, check_values)`` substitutes new
    right-hand sides in one launch each (gradients reach those only) and ``.factor`` is the
    :class:`TritonFactor` (whose own ``solve`` takes assembled right-hand sides).

    With ``method='qr'`` (or 'auto' in float32, :func:`resolve_triton_method`):
    :func:`smnn.solver.triton_qr.triton_qr_factorize` (one launch; each solve by the
    corrected semi-normal equations, 2 launches in float64, 3 in float32)."""
    _check_method(method)
    _check_device(problem)
    weights = tuple(float(w) for w in plain_weights)
    if resolve_triton_method(method, problem.coefficients.dtype) == "qr":
        from smnn.solver.triton_qr import triton_qr_factorize

        return triton_qr_factorize(problem, weights, central, check_pivots)
    sizes = _sizes(problem, weights, central)
    lhs_batch = tuple(problem.lhs_batch_shape)
    coef, steps = fold_lhs_inputs(problem, lhs_batch)
    N, E = coef.shape[0], coef.shape[2]
    if not _fits_one_launch(sizes, N, 1, E):
        raise ValueError(
            f"too many systems and steps for one launch on Triton (N={N}, T={sizes.n_steps}, "
            f"m={sizes.block_size}): offsets past 2**31; use ode_forward or backend='torch'"
        )
    coef_l, steps_l = _lane_lhs(coef, steps)
    no_rhs = _LaneInputs(
        coef_l, steps_l, coef_l.new_zeros(1, E, 0), coef_l.new_zeros(1, 0, 0), N, 0
    )
    _, factor = _sweep(no_rhs, sizes, None)
    if check_pivots:
        raise_if_failed(factor, lhs_batch)
    return TritonLeftHandSide(factor, coef_l, steps_l, sizes, problem.lhs_batch_shape)
