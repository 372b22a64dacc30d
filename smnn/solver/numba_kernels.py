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

# floating-point licences for the hot loops: contraction and reassociation (vectorised sums),
# but no "no-NaN" assumptions, so the pivot checks stay meaningful
_FAST = {"contract", "reassoc", "nsz", "arcp"}


@njit(cache=True, inline="always")
def _cholesky_lower(a, out, rdiag):
    """Lower Cholesky factor of the symmetric (n, n) ``a`` (lower triangle read) into ``out``,
    reciprocals of its diagonal into ``rdiag``.

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
        r = 1.0 / d
        out[j, j] = d
        rdiag[j] = r
        for i in range(j + 1, n):
            s2 = a[i, j]
            for k in range(j):
                s2 -= out[i, k] * out[j, k]
            out[i, j] = s2 * r
        for i in range(j):
            out[i, j] = 0.0
    return True


@njit(cache=True, parallel=True, fastmath=_FAST)
def factor_sequential(diag, sub, lmul, dchol, rdiag, failed_at):
    """Block LDL^T of a block-tridiagonal SPD matrix, one system per parallel iteration.

    D_0 = M_0; L_t = M_{t,t-1} D_{t-1}^{-1}; D_t = M_t - L_t M_{t,t-1}^T. Writes the multipliers
    ``lmul``, the Cholesky factors of D_t (``dchol``) and the reciprocals of their diagonals
    (``rdiag`` (N, T, n)). ``failed_at[b]`` is set to 1 + the step of the first non-positive pivot
    (0 if none); the factors of a failed system are NaN from that step on.
    """
    N, T, n, _ = diag.shape
    for b in prange(N):
        work = np.empty((n, n), dtype=diag.dtype)
        row = np.empty(n, dtype=diag.dtype)
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
            lc = dchol[b, t]
            rd = rdiag[b, t]
            if not _cholesky_lower(work, lc, rd):
                failed_at[b] = t + 1
                for tt in range(t, T):
                    dchol[b, tt, :, :] = np.nan
                    rdiag[b, tt, :] = np.nan
                for tt in range(t, T - 1):
                    lmul[b, tt, :, :] = np.nan
                break
            if t < T - 1:
                # row i of L_{t+1} = D_t^{-1} (row i of M_{t+1,t})  (D_t symmetric)
                for i in range(n):
                    for j in range(n):
                        s = sub[b, t, i, j]
                        for k in range(j):
                            s -= lc[j, k] * row[k]
                        row[j] = s * rd[j]
                    for j in range(n - 1, -1, -1):
                        s = row[j]
                        for k in range(j + 1, n):
                            s -= lc[k, j] * row[k]
                        row[j] = s * rd[j]
                    for j in range(n):
                        lmul[b, t, i, j] = row[j]


@njit(cache=True, parallel=True, fastmath=_FAST)
def solve_sequential(lmul, dchol, rdiag, rhs, out):
    """Solve M x = rhs with the factors of :func:`factor_sequential`; x is written to ``out``.

    z_t = r_t - L_t z_{t-1};  y_t = D_t^{-1} z_t;  x_t = y_t - L_{t+1}^T x_{t+1}.
    One parallel job per (system, right-hand-side column); each runs the recurrence on a local
    copy of its column.
    """
    N, T, n, P = rhs.shape
    for job in prange(N * P):
        b = job // P
        p = job % P
        col = np.empty((T, n), dtype=out.dtype)
        for t in range(T):
            for i in range(n):
                col[t, i] = rhs[b, t, i, p]
        # forward substitution
        for t in range(1, T):
            for i in range(n):
                acc = col[t, i]
                for k in range(n):
                    acc -= lmul[b, t - 1, i, k] * col[t - 1, k]
                col[t, i] = acc
        # diagonal solves with the Cholesky factors
        for t in range(T):
            for j in range(n):
                acc = col[t, j]
                for k in range(j):
                    acc -= dchol[b, t, j, k] * col[t, k]
                col[t, j] = acc * rdiag[b, t, j]
            for j in range(n - 1, -1, -1):
                acc = col[t, j]
                for k in range(j + 1, n):
                    acc -= dchol[b, t, k, j] * col[t, k]
                col[t, j] = acc * rdiag[b, t, j]
        # backward substitution
        for t in range(T - 2, -1, -1):
            for i in range(n):
                acc = col[t, i]
                for k in range(n):
                    acc -= lmul[b, t, k, i] * col[t + 1, k]
                col[t, i] = acc
        for t in range(T):
            for i in range(n):
                out[b, t, i, p] = col[t, i]


# ------------------------------------------------------------------ fused block assembly
#
# The left-hand side of the ODE problem is assembled straight from the coefficients and steps
# (SOLVER_SPEC section 3), and in the backward pass the chain rule through that assembly is applied
# in the same compiled loop, so no (N, T, m, m) gradient tensor and no autograd graph over the
# blocks is ever built. Layout:
# - ``coef`` (N, Tc, E, m): coefficients with (d, k) flattened, Tc in {1, T}.
# - ``steps`` (N, Th): step sizes, Th in {1, T-1}.
# - ``g0``, ``g1``, ``g2`` (R, R): the constant Taylor Gram matrices (blocks.taylor_gram_matrices).
# - ``weights`` (3,): squared weights (w_eq^2, w_in^2, w_s^2).


@njit(cache=True, parallel=True, fastmath=_FAST)
def assemble_blocks(
    coef, steps, n_steps, n_dims, n_init_steps, n_init_orders, g0, g1, g2, weights, central,
    diag, sub, sub2,
):
    """Write M_t into ``diag`` (N, T, m, m), M_{t+1,t} into ``sub`` (N, T-1, m, m) and, with
    central rows, M_{t+2,t} into ``sub2`` (N, T-2, m, m)."""
    N, Tc, E, m = coef.shape
    Th = steps.shape[1]
    T, D = n_steps, n_dims
    R = m // D
    weq2, win2, ws2 = weights[0], weights[1], weights[2]
    for b in prange(N):
        pw = np.empty(R, dtype=diag.dtype)
        for t in range(T):
            tc = t if Tc > 1 else 0
            for i in range(m):
                for j in range(m):
                    acc = 0.0
                    for e in range(E):
                        acc += coef[b, tc, e, i] * coef[b, tc, e, j]
                    diag[b, t, i, j] = weq2 * acc
            if t < n_init_steps:
                for d in range(D):
                    for k in range(n_init_orders):
                        diag[b, t, d * R + k, d * R + k] += win2
        for t in range(T - 1):
            hv = steps[b, t if Th > 1 else 0]
            p = 1.0
            for k in range(R):
                pw[k] = p
                p *= hv
            for i in range(m):
                for j in range(m):
                    sub[b, t, i, j] = 0.0
            for d in range(D):
                o = d * R
                for i in range(R):
                    for j in range(R):
                        val = ws2 * pw[i] * pw[j]
                        diag[b, t, o + i, o + j] += val * g0[i, j]
                        diag[b, t + 1, o + i, o + j] += val * g1[i, j]
                        sub[b, t, o + i, o + j] = val * g2[i, j]
        if central:
            for q in range(T - 2):
                s = steps[b, q if Th > 1 else 0] + steps[b, q + 1 if Th > 1 else 0]
                a = s ** (R - 3)
                bb = s ** (R - 2)
                for i in range(m):
                    for j in range(m):
                        sub2[b, q, i, j] = 0.0
                for d in range(D):
                    i2 = d * R + R - 2
                    i1 = d * R + R - 1
                    diag[b, q, i2, i2] += ws2 * a * a
                    diag[b, q + 1, i1, i1] += ws2 * bb * bb
                    diag[b, q + 2, i2, i2] += ws2 * a * a
                    sub[b, q, i1, i2] += ws2 * a * bb
                    sub[b, q + 1, i2, i1] -= ws2 * a * bb
                    sub2[b, q, i2, i2] = -ws2 * a * a


@njit(cache=True, inline="always")
def _block_grad(lam, x, b, t_row, t_col, i, j):
    """-(lam[t_row,i] . x[t_col,j] + x[t_row,i] . lam[t_col,j]) summed over the P columns."""
    P = lam.shape[3]
    acc = 0.0
    for p in range(P):
        acc += lam[b, t_row, i, p] * x[b, t_col, j, p] + x[b, t_row, i, p] * lam[b, t_col, j, p]
    return -acc


@njit(cache=True, parallel=True, fastmath=_FAST)
def assemble_blocks_backward(
    lam, x, coef, steps, n_steps, n_dims, g0, g1, g2, weights, central, grad_coef, grad_steps,
):
    """Chain rule through :func:`assemble_blocks` for dl/dM = the section-5 block gradients.

    ``lam``, ``x`` (N, >=T, m, P): M^{-1} g and the solution. Writes dl/dcoef (N, Tc, E, m) and
    dl/dsteps (N, Th) (summed over steps when the input had a size-1 step axis). The blocks'
    gradients are dl/dM_t = -sym(lam_t x_t^T), dl/dM_{t+1,t} = -(lam_{t+1} x_t^T + x_{t+1} lam_t^T),
    and the same form for M_{t+2,t}; each entry is formed on the fly from lam and x.
    """
    N, Tc, E, m = coef.shape
    Th = steps.shape[1]
    T, D = n_steps, n_dims
    R = m // D
    weq2, ws2 = weights[0], weights[2]
    for b in prange(N):
        gd = np.empty((m, m), dtype=coef.dtype)
        pw = np.empty(R, dtype=coef.dtype)
        dpw = np.empty(R, dtype=coef.dtype)
        for tc in range(Tc):
            for e in range(E):
                for i in range(m):
                    grad_coef[b, tc, e, i] = 0.0
        for th in range(Th):
            grad_steps[b, th] = 0.0
        for t in range(T):
            tc = t if Tc > 1 else 0
            # dl/dM_t (symmetric): -(lam x^T + x lam^T)/2
            for i in range(m):
                for j in range(m):
                    gd[i, j] = 0.5 * _block_grad(lam, x, b, t, t, i, j)
            # M_t contains w_eq^2 C^T C  ->  dl/dC = 2 w_eq^2 C gd
            for e in range(E):
                for j in range(m):
                    acc = 0.0
                    for i in range(m):
                        acc += coef[b, tc, e, i] * gd[i, j]
                    grad_coef[b, tc, e, j] += 2.0 * weq2 * acc
            if t < T - 1:
                # interval t: outer(e, e) * (G0 -> M_t, G1 -> M_{t+1}, G2 -> M_{t+1,t}), e_k = h^k
                hv = steps[b, t if Th > 1 else 0]
                p = 1.0
                for k in range(R):
                    pw[k] = p
                    dpw[k] = k * (p / hv) if k > 0 else 0.0
                    p *= hv
                gh = 0.0
                for d in range(D):
                    o = d * R
                    for i in range(R):
                        for j in range(R):
                            g_next = 0.5 * _block_grad(lam, x, b, t + 1, t + 1, o + i, o + j)
                            g_sub = _block_grad(lam, x, b, t + 1, t, o + i, o + j)
                            w = gd[o + i, o + j] * g0[i, j] + g_next * g1[i, j] + g_sub * g2[i, j]
                            gh += w * (dpw[i] * pw[j] + pw[i] * dpw[j])
                grad_steps[b, t if Th > 1 else 0] += ws2 * gh
        if central:
            for q in range(T - 2):
                s = steps[b, q if Th > 1 else 0] + steps[b, q + 1 if Th > 1 else 0]
                a = s ** (R - 3)
                bb = s ** (R - 2)
                da = (R - 3) * s ** (R - 4) if R != 3 else 0.0
                dbb = (R - 2) * s ** (R - 3) if R != 2 else 0.0
                g_aa = 0.0
                g_bb = 0.0
                g_ab = 0.0
                for d in range(D):
                    i2 = d * R + R - 2
                    i1 = d * R + R - 1
                    g_aa += 0.5 * _block_grad(lam, x, b, q, q, i2, i2)
                    g_aa += 0.5 * _block_grad(lam, x, b, q + 2, q + 2, i2, i2)
                    g_aa -= _block_grad(lam, x, b, q + 2, q, i2, i2)
                    g_bb += 0.5 * _block_grad(lam, x, b, q + 1, q + 1, i1, i1)
                    g_ab += _block_grad(lam, x, b, q + 1, q, i1, i2)
                    g_ab -= _block_grad(lam, x, b, q + 2, q + 1, i2, i1)
                ds = ws2 * (
                    2.0 * a * da * g_aa + 2.0 * bb * dbb * g_bb + (da * bb + a * dbb) * g_ab
                )
                grad_steps[b, q if Th > 1 else 0] += ds
                grad_steps[b, q + 1 if Th > 1 else 0] += ds
