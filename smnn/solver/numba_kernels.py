"""Compiled CPU kernels for the sequential block LDL^T factorization and substitution.

The sequential algorithm (SOLVER_SPEC section 4) has T dependent steps on blocks of size n = 2..30.
Written as torch ops, every step costs several tiny dispatches (and, on CPU, one LAPACK call per
block), so the per-step overhead dominates. These kernels run the whole recurrence in compiled
loops instead: one parallel loop over independent systems (and right-hand-side chunks), the time
recurrence inside, explicit small-block Cholesky and triangular solves. They compute exactly what
:mod:`smnn.solver.banded`'s torch twin computes (used on CUDA and when numba is missing); the tests
hold both to the dense reference.

Array layout (all C-contiguous, float32 or float64):
- ``diag`` (N, T, n, n): diagonal blocks M_t (only the lower triangle is read).
- ``sub`` (N, T-1, n, n): sub-diagonal blocks M_{t+1,t}.
- ``lmul`` (N, T-1, n, n): multipliers L_{t+1} = M_{t+1,t} D_t^{-1} (stored at index t).
- ``dchol`` (N, T, n, n): lower Cholesky factors of the pivots D_t.
- ``rhs``/``out`` (N, T, n, P): P right-hand sides per system.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _cholesky_lower(a, out):
    """Lower Cholesky factor of the symmetric (n, n) ``a`` (lower triangle read) into ``out``.

    Returns False when a pivot is not positive (or not finite).
    """
    n = a.shape[0]
    for j in range(n):
        s = a[j, j]
        for k in range(j):
            s -= out[j, k] * out[j, k]
        if not (s > 0.0) or not np.isfinite(s):
            return False
        d = np.sqrt(s)
        out[j, j] = d
        for i in range(j + 1, n):
            s2 = a[i, j]
            for k in range(j):
                s2 -= out[i, k] * out[j, k]
            out[i, j] = s2 / d
        for i in range(j):
            out[i, j] = 0.0
    return True


@njit(cache=True, parallel=True)
def factor_sequential(diag, sub, lmul, dchol, failed_at):
    """Block LDL^T of a block-tridiagonal SPD matrix, one system per parallel iteration.

    D_0 = M_0; L_t = M_{t,t-1} D_{t-1}^{-1}; D_t = M_t - L_t M_{t,t-1}^T. ``failed_at[b]`` is set
    to 1 + the step of the first non-positive pivot (0 if none); the factors of a failed system
    are filled with NaN from that step on.
    """
    N, T, n, _ = diag.shape
    for b in prange(N):
        work = np.empty((n, n), dtype=diag.dtype)
        failed_at[b] = 0
        for t in range(T):
            for i in range(n):
                for j in range(i + 1):
                    work[i, j] = diag[b, t, i, j]
            if t > 0:
                for i in range(n):
                    for j in range(i + 1):
                        acc = 0.0
                        for k in range(n):
                            acc += lmul[b, t - 1, i, k] * sub[b, t - 1, j, k]
                        work[i, j] -= acc
            if not _cholesky_lower(work, dchol[b, t]):
                failed_at[b] = t + 1
                for tt in range(t, T):
                    dchol[b, tt, :, :] = np.nan
                for tt in range(max(t, 0), T - 1):
                    lmul[b, tt, :, :] = np.nan
                break
            if t < T - 1:
                # row i of L_{t+1} = D_t^{-1} (row i of M_{t+1,t})  (D_t symmetric)
                for i in range(n):
                    for j in range(n):
                        s = sub[b, t, i, j]
                        for k in range(j):
                            s -= dchol[b, t, j, k] * lmul[b, t, i, k]
                        lmul[b, t, i, j] = s / dchol[b, t, j, j]
                    for j in range(n - 1, -1, -1):
                        s = lmul[b, t, i, j]
                        for k in range(j + 1, n):
                            s -= dchol[b, t, k, j] * lmul[b, t, i, k]
                        lmul[b, t, i, j] = s / dchol[b, t, j, j]


@njit(cache=True, parallel=True)
def solve_sequential(lmul, dchol, rhs, out, n_chunks):
    """Solve M x = rhs with the factors of :func:`factor_sequential`; x is written to ``out``.

    z_t = r_t - L_t z_{t-1};  y_t = D_t^{-1} z_t;  x_t = y_t - L_{t+1}^T x_{t+1}.
    The parallel loop runs over (system, chunk of right-hand-side columns) pairs.
    """
    N, T, n, P = rhs.shape
    chunk = (P + n_chunks - 1) // n_chunks
    for job in prange(N * n_chunks):
        b = job // n_chunks
        p0 = (job % n_chunks) * chunk
        p1 = min(P, p0 + chunk)
        if p0 >= p1:
            continue
        # forward substitution
        for t in range(T):
            for i in range(n):
                for p in range(p0, p1):
                    out[b, t, i, p] = rhs[b, t, i, p]
            if t > 0:
                for i in range(n):
                    for k in range(n):
                        lik = lmul[b, t - 1, i, k]
                        for p in range(p0, p1):
                            out[b, t, i, p] -= lik * out[b, t - 1, k, p]
        # diagonal solves with the Cholesky factors
        for t in range(T):
            for j in range(n):
                for k in range(j):
                    ljk = dchol[b, t, j, k]
                    for p in range(p0, p1):
                        out[b, t, j, p] -= ljk * out[b, t, k, p]
                inv = 1.0 / dchol[b, t, j, j]
                for p in range(p0, p1):
                    out[b, t, j, p] *= inv
            for j in range(n - 1, -1, -1):
                for k in range(j + 1, n):
                    lkj = dchol[b, t, k, j]
                    for p in range(p0, p1):
                        out[b, t, j, p] -= lkj * out[b, t, k, p]
                inv = 1.0 / dchol[b, t, j, j]
                for p in range(p0, p1):
                    out[b, t, j, p] *= inv
        # backward substitution
        for t in range(T - 2, -1, -1):
            for i in range(n):
                for k in range(n):
                    lki = lmul[b, t, k, i]
                    for p in range(p0, p1):
                        out[b, t, i, p] -= lki * out[b, t + 1, k, p]
