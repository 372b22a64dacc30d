"""Triton kernels of the GPU engine (:mod:`smnn.solver.triton_engine`): block Cholesky of a
block-tridiagonal SPD matrix and its substitutions, one lane per system (docs/solver.md 4, 11).

Importing this module imports triton; :mod:`smnn.solver.triton_engine` imports it only when a
call runs on Triton, so ``import smnn`` never needs triton.

Layout (batch last, so that neighbouring lanes read neighbouring addresses):

- ``diag`` ``(T, n, n, N)``: diagonal blocks M_t; ``sub`` ``(T-1, n, n, N)``: M_{t+1,t}.
- the factor: ``cinv`` ``(T, n, n, N)``, the inverse of the lower Cholesky factor C_t of each
  pivot D_t (D_0 = M_0, D_t = M_t - W_t W_t^T), and ``wmul`` ``(T, n, n, N)``,
  W_t = M_{t,t-1} C_{t-1}^{-T} (W_0 = 0). Then M = L L^T with L block lower bidiagonal
  (diagonal C_t, sub-diagonal W_t), so a solve is two sweeps of small matrix-vector products:
  y_t = C_t^{-1} (r_t - W_t y_{t-1}) forward, x_t = C_t^{-T} (y_t - W_{t+1}^T x_{t+1}) backward.
- right-hand sides ``(T, n, L)`` with lane l = system * P + column (P columns per system).

A program owns ``BLOCK`` lanes; each step holds its lanes' n x n blocks as one padded tile
``[BLOCK, NP, NP]`` (NP = n rounded up to a power of two; entries past n are masked to zero).
Everything a lane computes depends on that lane's data only, in a fixed order: no atomics, the
same inputs give the same bits.

Only long-stable Triton features are used (``tl.load``/``tl.store`` with masks, ``tl.where``,
``tl.sum``, ``tl.debug_barrier``, loops with ``range``: not unrolled, so a kernel compiles in
seconds at every block size), for triton 3.x.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["block_cholesky_kernel", "block_solve_kernel"]


@triton.jit
def block_cholesky_kernel(
    diag_ptr,
    sub_ptr,
    cinv_ptr,
    wmul_ptr,
    failed_ptr,
    N,
    T,
    pivot_scale,
    NB: tl.constexpr,
    NP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Factorize N block-tridiagonal systems (one lane each); see the module docstring.

    failed_ptr ``(N,)`` int64 receives 1 + the first step with a failed pivot (0 where none):
    a pivot that is not finite or not above ``pivot_scale`` times its diagonal entry of M_t
    (:func:`smnn.solver.banded.pivot_tolerance`, the torch path's criterion); from there on the
    lane's factor is NaN, so its solutions come back NaN.
    """
    pid = tl.program_id(0)
    lane = pid * BLOCK + tl.arange(0, BLOCK)
    lane_ok = lane < N
    r = tl.arange(0, NP)
    rows = r[None, :, None]
    cols = r[None, None, :]
    vec = r[None, :]
    # offsets inside one step (< n * n * N); the step pointers below advance in 64 bits
    ent = (rows * NB + cols) * N + lane[:, None, None]
    mask = lane_ok[:, None, None] & (rows < NB) & (cols < NB)
    step = N * (NB * NB)
    zero = tl.zeros([BLOCK, NP, NP], dtype=diag_ptr.dtype.element_ty)
    wmul = zero
    failed = tl.zeros([BLOCK], dtype=tl.int64)
    diag_t = diag_ptr
    sub_t = sub_ptr
    cinv_t = cinv_ptr
    wmul_next = wmul_ptr + step
    for t in range(T):
        a = tl.load(diag_t + ent, mask=mask, other=0.0)
        floor = pivot_scale * tl.sum(tl.where(rows == cols, a, 0.0), axis=2)  # [BLOCK, NP]
        # a -= W_t W_t^T (W_0 = 0)
        for k in range(NB):
            wk = tl.sum(tl.where(cols == k, wmul, 0.0), axis=2)
            a = a - wk[:, :, None] * wk[:, None, :]
        # lower Cholesky factor c of a, column by column (right-looking)
        c = zero
        for j in range(NB):
            colj = tl.sum(tl.where(cols == j, a, 0.0), axis=2)
            d = tl.sum(tl.where(vec == j, colj, 0.0), axis=1)
            ok = (d > tl.sum(tl.where(vec == j, floor, 0.0), axis=1)) & (d < float("inf"))
            failed = tl.where((failed == 0) & (ok == 0) & lane_ok, t + 1, failed)
            d = tl.where(ok, d, float("nan"))
            lj = tl.where(vec >= j, colj / tl.sqrt(d)[:, None], 0.0)
            c = tl.where(cols == j, lj[:, :, None], c)
            a = a - lj[:, :, None] * lj[:, None, :]
        # x = c^{-1}, row by row (forward substitution on the identity)
        x = zero
        for i in range(NB):
            crow = tl.sum(tl.where(rows == i, c, 0.0), axis=1)
            cii = tl.sum(tl.where(vec == i, crow, 0.0), axis=1)
            acc = tl.sum(crow[:, :, None] * x, axis=1)
            new = (tl.where(vec == i, 1.0, 0.0) - acc) / cii[:, None]
            new = tl.where(vec <= i, new, 0.0)
            x = tl.where(rows == i, new[:, None, :], x)
        tl.store(cinv_t + ent, x, mask=mask)
        # W_{t+1} = M_{t+1,t} x^T (a zero tile past the last step)
        has_next = mask & ((lane * 0 + t + 1) < T)[:, None, None]
        b = tl.load(sub_t + ent, mask=has_next, other=0.0)
        wmul = zero
        for k in range(NB):
            bk = tl.sum(tl.where(cols == k, b, 0.0), axis=2)
            xk = tl.sum(tl.where(cols == k, x, 0.0), axis=2)
            wmul = wmul + bk[:, :, None] * xk[:, None, :]
        tl.store(wmul_next + ent, wmul, mask=has_next)
        diag_t += step
        sub_t += step
        cinv_t += step
        wmul_next += step
    tl.store(failed_ptr + lane, failed, mask=lane_ok)


@triton.jit
def block_solve_kernel(
    cinv_ptr,
    wmul_ptr,
    rhs_ptr,
    out_ptr,
    N,
    P,
    T,
    NB: tl.constexpr,
    NP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """x = M^{-1} rhs for rhs ``(T, n, N*P)`` (lane = system * P + column) with the factor of
    :func:`block_cholesky_kernel`; writes x into out ``(T, n, N*P)`` (y of the forward sweep
    is kept there in between)."""
    pid = tl.program_id(0)
    n_lanes = N * P
    lane = pid * BLOCK + tl.arange(0, BLOCK)
    lane_ok = lane < n_lanes
    system = lane // P
    r = tl.arange(0, NP)
    rows = r[None, :, None]
    cols = r[None, None, :]
    ent = (rows * NB + cols) * N + system[:, None, None]
    mask = lane_ok[:, None, None] & (rows < NB) & (cols < NB)
    step = N * (NB * NB)
    vofs = r[None, :] * n_lanes + lane[:, None]
    vmask = lane_ok[:, None] & (r[None, :] < NB)
    vstep = n_lanes * NB
    y = tl.zeros([BLOCK, NP], dtype=rhs_ptr.dtype.element_ty)
    rhs_t = rhs_ptr
    out_t = out_ptr
    cinv_t = cinv_ptr
    wmul_t = wmul_ptr
    for t in range(T):
        v = tl.load(rhs_t + vofs, mask=vmask, other=0.0)
        w = tl.load(wmul_t + ent, mask=mask & ((lane * 0 + t) > 0)[:, None, None], other=0.0)
        v = v - tl.sum(w * y[:, None, :], axis=2)
        x = tl.load(cinv_t + ent, mask=mask, other=0.0)
        y = tl.sum(x * v[:, None, :], axis=2)
        tl.store(out_t + vofs, y, mask=vmask)
        rhs_t += vstep
        out_t += vstep
        cinv_t += step
        wmul_t += step
    tl.debug_barrier()
    # back from the last step: out_t, cinv_t, wmul_t now point one step past it
    u = tl.zeros([BLOCK, NP], dtype=rhs_ptr.dtype.element_ty)
    for tt in range(T):
        out_t -= vstep
        cinv_t -= step
        yt = tl.load(out_t + vofs, mask=vmask, other=0.0)
        w = tl.load(wmul_t + ent, mask=mask & ((lane * 0 + tt) > 0)[:, None, None], other=0.0)
        v = yt - tl.sum(w * u[:, :, None], axis=1)
        x = tl.load(cinv_t + ent, mask=mask, other=0.0)
        u = tl.sum(x * v[:, :, None], axis=1)
        tl.store(out_t + vofs, u, mask=vmask)
        wmul_t -= step
