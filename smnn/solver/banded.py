"""Sequential block LDL^T as batched torch ops, backends and pivot errors (docs/solver.md 4, 7).

Canonical layout, shared by every method:

- ``diag`` ``(N, T, n, n)``: diagonal blocks; ``sub`` ``(N, T-1, n, n)``: blocks M_{t+1,t}.
- ``rhs`` ``(N, T, n, P)``: P right-hand sides for each of the N systems (a batch that shares its
  left-hand side is folded into P, so its factorization is computed once).

This is the sequential method of the torch path (any device; the CUDA path, and the CPU path
without numba). It stores the multipliers L_{t+1} = M_{t+1,t} D_t^{-1} and the lower Cholesky
factors of the pivots D_t. On CPU with numba the lane engine (:mod:`smnn.solver.fused`) runs the
same recurrence instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "NonPositivePivotError",
    "BlockTridiagonalFactor",
    "pivot_tolerance",
    "factorize_block_tridiagonal",
    "numba_available",
    "resolve_backend",
]

BACKENDS = ("auto", "numba", "torch", "triton")


class NonPositivePivotError(ValueError):
    """The normal matrix of some batch entries is not numerically positive definite (an LDL^T
    pivot below :func:`pivot_tolerance` of its diagonal entry), or, for ``method='qr'``, their
    least-squares problem is numerically rank deficient (a diagonal of R negligible against its
    column, :func:`smnn.solver.qr.rank_tolerance`)."""


# a pivot at or below PIVOT_FACTOR * n * eps times its diagonal entry fails (every LDL^T path)
PIVOT_FACTOR = 1000.0


def pivot_tolerance(n: int, dtype: torch.dtype) -> float:
    """Relative pivot threshold of every LDL^T path (torch and the lane engine) for blocks of
    size ``n``: a scalar pivot at or below ``PIVOT_FACTOR * n * eps`` times the original
    diagonal entry M_jj of its unknown is a failure.

    A pivot is M_jj minus the eliminated part; computed in working precision it carries an
    error of about n * eps * M_jj, so with the factor 1000 every accepted pivot is right to
    about 1e-3, and a smaller one is rounding noise on which the solution would be garbage
    (float32 normal equations of stiff, long or growing problems: measured pivot/diagonal
    ratios 4e-7 to 1.5e-4 where the float32 solutions were 1 % to 100 % wrong, against 5e-3
    and more on well-conditioned R = 3 problems; docs/solver.md, "Accuracy bars"). A pivot
    p_j equals R_jj^2 of the QR factor, so this is a criterion on |R_jj| / ||a_j|| of about
    sqrt(1000 n eps): stricter than the QR path's, as it must be for a method whose errors
    scale with cond(A)^2.
    """
    return PIVOT_FACTOR * n * torch.finfo(dtype).eps


def numba_available() -> bool:
    """Whether numba imports (it is an optional speed-up: without it everything runs on the
    torch path)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'numba' on CPU when numba imports, 'torch' otherwise. 'numba' without numba,
    or for tensors not on the CPU, is a ValueError. 'triton' is returned as is: whether it can
    run is decided by :func:`smnn.solver.triton_engine.triton_path_applies` (and on CUDA,
    'auto' may run on Triton too: see there)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "numba" if device.type == "cpu" and numba_available() else "torch"
    if backend == "numba":
        if device.type != "cpu":
            raise ValueError(f"backend='numba' runs on CPU tensors only, got device {device}")
        if not numba_available():
            raise ValueError(
                "backend='numba' needs the numba package, which cannot be imported here; "
                "install numba or use backend='torch' (or 'auto', which falls back to torch)"
            )
    return backend


@dataclass
class BlockTridiagonalFactor:
    """Sequential block LDL^T factors of N block-tridiagonal systems (torch ops).

    Attributes:
        lmul: ``(N, T-1, n, n)``, lmul[:, t] = M_{t+1,t} D_t^{-1}.
        dchol: ``(N, T, n, n)``, lower Cholesky factor of each pivot block D_t.
        failed_at: ``(N,)`` int64, 1 + first step with a non-positive pivot (or one below
            :func:`pivot_tolerance`), 0 where none.
        graphs: a :class:`~smnn.solver.cuda_graphs.CudaGraphPool` that replays the
            substitutions, or None.
    """

    lmul: torch.Tensor
    dchol: torch.Tensor
    failed_at: torch.Tensor
    graphs: object | None = None

    @property
    def n_systems(self) -> int:
        return self.dchol.shape[0]

    @property
    def n_steps(self) -> int:
        return self.dchol.shape[1]

    @property
    def block_size(self) -> int:
        return self.dchol.shape[-1]

    def failed(self) -> torch.Tensor:
        """``(N,)`` bool: systems whose factorization met a non-positive pivot."""
        return self.failed_at > 0

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """Solve M x = rhs for ``rhs`` ``(N, T, n, P)``; returns ``(N, T, n, P)``."""
        N, T, n = self.n_systems, self.n_steps, self.block_size
        if rhs.dim() != 4 or rhs.shape[0] != N or rhs.shape[1] != T or rhs.shape[2] != n:
            raise ValueError(
                f"rhs must have shape (N={N}, T={T}, n={n}, P), got {tuple(rhs.shape)}"
            )
        if self.graphs is not None:
            return self.graphs.solve(self, rhs)
        return _solve_torch(self, rhs)


def factorize_block_tridiagonal(diag: torch.Tensor, sub: torch.Tensor) -> BlockTridiagonalFactor:
    """Sequential block LDL^T of ``diag`` ``(N, T, n, n)`` and ``sub`` ``(N, T-1, n, n)``.

    Pivot failures are recorded in ``failed_at``, not raised; see :func:`raise_if_failed`.
    """
    return _factor_torch(diag, sub)


def raise_if_failed(factor, batch_shape: tuple[int, ...], rank: bool = False) -> None:
    """Raise :class:`NonPositivePivotError` naming the failed entries of ``batch_shape``.

    Args:
        factor: a :class:`~smnn.solver.factor.Factor`, or its ``failed_at`` tensor ``(N,)``.
        rank: word the message for the QR path (rank deficiency) instead of the normal
            equations (a pivot that is not positive).
    """
    failed_at = factor if isinstance(factor, torch.Tensor) else factor.failed_at
    failed = failed_at > 0
    if not bool(failed.any()):
        return
    idx = torch.nonzero(failed).flatten().cpu()
    steps = failed_at[failed].cpu() - 1
    entries = []
    for flat, step in zip(idx[:10].tolist(), steps[:10].tolist(), strict=False):
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), batch_shape))
        entries.append(f"batch index {pos} at block {step}")
    more = f" (and {len(idx) - 10} more)" if len(idx) > 10 else ""
    if rank:
        what = (
            f"the least-squares problem is numerically rank deficient for {len(idx)} of "
            f"{failed.numel()} batch entries: negligible diagonal of R in"
        )
    else:
        what = (
            f"the normal matrix is not positive definite for {len(idx)} of {failed.numel()} "
            "batch entries: non-positive (or negligible) pivot in"
        )
    raise NonPositivePivotError(
        f"{what} {', '.join(entries)}{more}. Check for all-zero "
        "coefficients, huge or tiny steps, or zero weights; pass check_pivots=False to skip "
        "this check (those entries then come back as NaN)."
    )


# ---------------------------------------------------------------- torch backend (any device)


def _factor_torch(diag: torch.Tensor, sub: torch.Tensor) -> BlockTridiagonalFactor:
    diag = diag.detach()
    sub = sub.detach()
    N, T, n, _ = diag.shape
    lmul = diag.new_empty(N, T - 1, n, n)
    dchol = diag.new_empty(N, T, n, n)
    failed_at = torch.zeros(N, dtype=torch.int64, device=diag.device)
    # a pivot below n * eps of its original diagonal entry is rounding noise: a failure
    floor = pivot_tolerance(n, diag.dtype) * diag.diagonal(dim1=-2, dim2=-1)  # (N, T, n)
    pivot = diag[:, 0]
    for t in range(T):
        chol, info = torch.linalg.cholesky_ex(pivot)
        small = ~(chol.diagonal(dim1=-2, dim2=-1).square() > floor[:, t]).all(dim=-1)
        bad = ((info > 0) | small) & (failed_at == 0)
        failed_at = torch.where(bad, torch.full_like(failed_at, t + 1), failed_at)
        dchol[:, t] = chol
        if t == T - 1:
            break
        m_next = sub[:, t]
        # L = M_{t+1,t} D_t^{-1}  <=>  L^T = D_t^{-1} M_{t+1,t}^T
        lt = torch.cholesky_solve(m_next.transpose(-1, -2), chol).transpose(-1, -2)
        lmul[:, t] = lt
        pivot = diag[:, t + 1] - lt @ m_next.transpose(-1, -2)
    # make failures visible as NaN from the failing step on, like the lane kernels (no host
    # synchronisation here, so the loop can be captured in a CUDA graph)
    steps = torch.arange(T, device=diag.device)
    dead = (failed_at[:, None] > 0) & (steps[None, :] >= failed_at[:, None] - 1)
    dchol = dchol.masked_fill(dead[:, :, None, None], float("nan"))
    lmul = lmul.masked_fill(dead[:, :-1, None, None], float("nan"))
    return BlockTridiagonalFactor(lmul, dchol, failed_at)


def _solve_torch(factor: BlockTridiagonalFactor, rhs: torch.Tensor) -> torch.Tensor:
    lmul, dchol = factor.lmul, factor.dchol
    T = dchol.shape[1]
    z = torch.empty_like(rhs)
    z[:, 0] = rhs[:, 0]
    for t in range(1, T):
        z[:, t] = rhs[:, t] - lmul[:, t - 1] @ z[:, t - 1]
    y = torch.cholesky_solve(z, dchol)
    x = torch.empty_like(rhs)
    x[:, T - 1] = y[:, T - 1]
    for t in range(T - 2, -1, -1):
        x[:, t] = y[:, t] - lmul[:, t].transpose(-1, -2) @ x[:, t + 1]
    return x
