"""Triton kernels of the GPU engine (:mod:`smnn.solver.triton_engine`): block Cholesky of a
block-tridiagonal SPD matrix and its substitutions, one lane per system (docs/solver.md 4, 11);
and the orthogonal solve of :mod:`smnn.solver.triton_qr` (:func:`qr_sweep_kernel`, and
:func:`qr_normal_solve_kernel` for (R^T R)^{-1} g).

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

__all__ = [
    "block_cholesky_kernel",
    "block_solve_kernel",
    "ode_backward_kernel",
    "ode_sweep_kernel",
    "qr_normal_solve_kernel",
    "qr_sweep_kernel",
]


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


# ------------------------------------------------------------------ fused: assembly in the kernel
#
# The kernels below read the inputs themselves (docs/solver.md, "Structure of M"; docs/gpu.md): no
# block of M is ever stored. Input layouts (batch last; a step axis of size 1 has stride 0, so one
# value serves every step):
#
# - ``coef`` ``(Tc, E, m, N)``, ``steps`` ``(Th, N)``, ``rhs`` ``(Tb, E, N*P)``,
#   ``init`` ``(Su, D*K, N*P)`` (lane of column p of system i: i * P + p), ``grams``
#   ``(3, R, R)``: the Taylor Gram matrices G0, G1, G2 of :func:`smnn.solver.blocks.
#   taylor_gram_matrices`.
# - with central smoothness (PAIR = 2) steps 2k and 2k+1 form super-step k (blocks of
#   NB = 2m, :mod:`smnn.solver.layout`); an odd T gets a padding step T (identity block).
#   Without, PAIR = 1 and NB = m. Index i of a tile axis is (half s, state d, order k):
#   i = s*m + d*R + k, its step a = PAIR * super-step + s.
# - solutions, gradients of the solution: ``(T2, NB, N*P)`` in super-steps.


@triton.jit
def _powers(h, k, R: tl.constexpr):
    """h^k for integer orders 0 <= k < R, by repeated multiplication (as the CPU lane engine);
    the shape is that of h and k broadcast."""
    p = h * 0.0 + tl.where(k >= 0, 1.0, 1.0)
    for kk in range(1, R):
        p = tl.where(k >= kk, p * h, p)
    return p


@triton.jit
def _int_power(s, n: tl.constexpr):
    """s^n for a compile-time integer n (negative: 1 / s^-n)."""
    p = s * 0.0 + 1.0
    if n >= 0:
        for _ in range(n):
            p = p * s
    else:
        for _ in range(-n):
            p = p * s
        p = 1.0 / p
    return p


@triton.jit
def _step_powers(steps_ptr, sh, a, k, lane, lane_ok, ok, T, R: tl.constexpr):
    """(h_a^k, h_{a-1}^k) ``[BLOCK, NP]`` for the steps a ``[NP]`` of a tile axis: the powers
    of interval a (zero past the last interval) and of interval a-1 (zero before the first)."""
    lane2 = lane[:, None]
    base = lane_ok[:, None] & ok[None, :]
    cur = base & (a < T - 1)[None, :]
    prev = base & (a >= 1)[None, :] & (a <= T - 1)[None, :]
    h_cur = tl.load(steps_ptr + (a * sh)[None, :] + lane2, mask=cur, other=0.0)
    h_prev = tl.load(steps_ptr + ((a - 1) * sh)[None, :] + lane2, mask=prev, other=0.0)
    kk = k[None, :]
    p_cur = tl.where(cur, _powers(h_cur, kk, R), 0.0)
    p_prev = tl.where(prev, _powers(h_prev, kk, R), 0.0)
    return p_cur, p_prev


@triton.jit
def _lhs_tile(
    coef_ptr,
    steps_ptr,
    g_ptr,
    lane,
    lane_ok,
    t_row,
    t_col,
    N,
    T,
    S,
    sc,
    sh,
    E,
    weq2,
    win2,
    ws2,
    M: tl.constexpr,
    R: tl.constexpr,
    K: tl.constexpr,
    PAIR: tl.constexpr,
    CENTRAL: tl.constexpr,
    DIAG: tl.constexpr,
    NP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The block of M at rows of super-step ``t_row`` and columns of super-step ``t_col``
    (``DIAG``: t_row == t_col, the diagonal block; else t_row = t_col + 1), ``[BLOCK, NP, NP]``,
    zero past NB (docs/solver.md, "Structure of M", entry by entry):

    - equation rows (diagonal blocks): w_eq^2 sum_e C_a[e, i] C_a[e, j];
    - initial rows: w_in^2 on the diagonal at orders k < K of steps a < S;
    - Taylor rows of interval a (powers e = h_a^k): w_s^2 e_i e_j G0 on M_a, G1 on M_{a+1},
      G2 on M_{a+1,a} (and its transpose above the diagonal), within a state;
    - central rows q (``CENTRAL``): w_s^2 v_q v_q^T, v_q = a_q e(q, R-2) + b_q e(q+1, R-1) -
      a_q e(q+2, R-2) with a_q = s^(R-3), b_q = s^(R-2), s = h_q + h_{q+1}, within a state;
    - the padding step T (odd T with pairs): the identity.
    """
    r = tl.arange(0, NP)
    ok = r < PAIR * M
    half = r // M
    w = r % M
    d = w // R
    k = w % R
    a = t_row * PAIR + half
    b = t_col * PAIR + half
    lane2 = lane[:, None]
    lok2 = lane_ok[:, None]
    a_r = a[None, :, None]
    b_c = b[None, None, :]
    k_r = k[None, :, None]
    k_c = k[None, None, :]
    w_r = w[None, :, None]
    w_c = w[None, None, :]
    ok_rc = ok[None, :, None] & ok[None, None, :]
    same = (d[None, :, None] == d[None, None, :]) & ok_rc
    tile = tl.zeros([BLOCK, NP, NP], dtype=coef_ptr.dtype.element_ty)
    if DIAG:
        valid_a = lok2 & (ok & (a < T))[None, :]
        for e in range(E):
            cv = tl.load(coef_ptr + (a * sc + e * M * N + w * N)[None, :] + lane2, mask=valid_a)
            tile = tile + cv[:, :, None] * cv[:, None, :]
        tile = tl.where(a_r == b_c, tile * weq2, 0.0)  # equation rows couple no two steps
        init = (a_r == b_c) & (w_r == w_c) & (a_r < S) & (k_r < K) & ok_rc
        tile = tile + tl.where(init, win2, 0.0)
    pc_r, pp_r = _step_powers(steps_ptr, sh, a, k, lane, lane_ok, ok, T, R)
    pc_c, pp_c = _step_powers(steps_ptr, sh, b, k, lane, lane_ok, ok, T, R)
    g0 = tl.load(g_ptr + k_r * R + k_c, mask=ok_rc, other=0.0)
    g1 = tl.load(g_ptr + R * R + k_r * R + k_c, mask=ok_rc, other=0.0)
    g2 = tl.load(g_ptr + 2 * R * R + k_r * R + k_c, mask=ok_rc, other=0.0)
    g2t = tl.load(g_ptr + 2 * R * R + k_c * R + k_r, mask=ok_rc, other=0.0)
    smooth = tl.where(a_r == b_c, pc_r[:, :, None] * pc_c[:, None, :] * g0, 0.0)
    smooth += tl.where(a_r == b_c, pp_r[:, :, None] * pp_c[:, None, :] * g1, 0.0)
    smooth += tl.where(a_r == b_c + 1, pp_r[:, :, None] * pc_c[:, None, :] * g2, 0.0)
    smooth += tl.where(a_r + 1 == b_c, pc_r[:, :, None] * pp_c[:, None, :] * g2t, 0.0)
    if CENTRAL:
        lane3 = lane[:, None, None]
        lok3 = lane_ok[:, None, None]
        top = tl.maximum(a_r, b_c)
        low = tl.minimum(a_r, b_c)
        for o in range(3):
            q = top - 2 + o
            on = same & (q >= 0) & (q <= low) & (q <= T - 3) & lok3
            s = tl.load(steps_ptr + q * sh + lane3, mask=on, other=1.0)
            s += tl.load(steps_ptr + (q + 1) * sh + lane3, mask=on, other=1.0)
            av = _int_power(s, R - 3)
            bv = av * s
            v_r = tl.where((a_r == q) & (k_r == R - 2), av, 0.0)
            v_r = tl.where((a_r == q + 1) & (k_r == R - 1), bv, v_r)
            v_r = tl.where((a_r == q + 2) & (k_r == R - 2), -av, v_r)
            v_c = tl.where((b_c == q) & (k_c == R - 2), av, 0.0)
            v_c = tl.where((b_c == q + 1) & (k_c == R - 1), bv, v_c)
            v_c = tl.where((b_c == q + 2) & (k_c == R - 2), -av, v_c)
            smooth += tl.where(on, v_r * v_c, 0.0)
    tile = tile + tl.where(same, smooth * ws2, 0.0)
    pad = (a_r >= T) | (b_c >= T)
    tile = tl.where(pad, tl.where((a_r == b_c) & (w_r == w_c), 1.0, 0.0), tile)
    return tl.where(ok_rc, tile, 0.0)


@triton.jit
def _rhs_vector(
    coef_ptr,
    rhs_ptr,
    init_ptr,
    lane,
    lane_ok,
    t2,
    p,
    N,
    P,
    T,
    S,
    sc,
    sb,
    su,
    E,
    weq2,
    win2,
    M: tl.constexpr,
    R: tl.constexpr,
    K: tl.constexpr,
    PAIR: tl.constexpr,
    NP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """r at super-step ``t2`` for column ``p`` of the lanes' systems ``[BLOCK, NP]``:
    w_eq^2 C_a^T b_a + w_in^2 [u0_a; 0] (zero at the padding step)."""
    r = tl.arange(0, NP)
    ok = r < PAIR * M
    half = r // M
    w = r % M
    d = w // R
    k = w % R
    a = t2 * PAIR + half
    valid = lane_ok[:, None] & (ok & (a < T))[None, :]
    col = (lane * P + p)[:, None]
    acc = tl.zeros([BLOCK, NP], dtype=coef_ptr.dtype.element_ty)
    for e in range(E):
        cv = tl.load(coef_ptr + (a * sc + e * M * N + w * N)[None, :] + lane[:, None], mask=valid)
        bv = tl.load(rhs_ptr + (a * sb + e * N * P)[None, :] + col, mask=valid)
        acc += cv * bv
    acc = acc * weq2
    at_init = valid & ((a < S) & (k < K))[None, :]
    u0 = tl.load(init_ptr + (a * su + (d * K + k) * N * P)[None, :] + col, mask=at_init)
    return acc + tl.where(at_init, u0 * win2, 0.0)


@triton.jit
def _back_sweep(
    cinv_ptr, wmul_ptr, out_ptr, lane, lane_ok, N, P, T2, NB: tl.constexpr, NP: tl.constexpr
):
    """In place on ``out`` ``(T2, NB, N*P)`` (every column of the lanes' systems): y on entry,
    x on exit, x_t = C_t^{-T} (y_t - W_{t+1}^T x_{t+1}) from the last step back."""
    r = tl.arange(0, NP)
    rows = r[None, :, None]
    cols = r[None, None, :]
    ent = (rows * NB + cols) * N + lane[:, None, None]
    mask = lane_ok[:, None, None] & (rows < NB) & (cols < NB)
    vmask = lane_ok[:, None] & (r[None, :] < NB)
    step = N * (NB * NB)
    vstep = N * P * NB
    for tt in range(T2):
        t = T2 - 1 - tt
        x = tl.load(cinv_ptr + t * step + ent, mask=mask, other=0.0)
        has_next = mask & ((lane * 0 + t + 1) < T2)[:, None, None]
        w = tl.load(wmul_ptr + (t + 1) * step + ent, mask=has_next, other=0.0)
        for p in range(P):
            vofs = r[None, :] * (N * P) + (lane * P + p)[:, None]
            yt = tl.load(out_ptr + t * vstep + vofs, mask=vmask, other=0.0)
            nxt = vmask & ((lane * 0 + t + 1) < T2)[:, None]
            un = tl.load(out_ptr + (t + 1) * vstep + vofs, mask=nxt, other=0.0)
            v = yt - tl.sum(w * un[:, :, None], axis=1)
            u = tl.sum(x * v[:, :, None], axis=1)
            # u_t overwrites y_t: every thread has read y_t first (a thread may hold a copy)
            tl.debug_barrier()
            tl.store(out_ptr + t * vstep + vofs, u, mask=vmask)
        tl.debug_barrier()


@triton.jit
def ode_sweep_kernel(
    coef_ptr,
    steps_ptr,
    rhs_ptr,
    init_ptr,
    g_ptr,
    cinv_ptr,
    wmul_ptr,
    out_ptr,
    failed_ptr,
    N,
    P,
    T,
    T2,
    S,
    sc,
    sh,
    sb,
    su,
    E,
    pivot_scale,
    M: tl.constexpr,
    R: tl.constexpr,
    K: tl.constexpr,
    PAIR: tl.constexpr,
    CENTRAL: tl.constexpr,
    FACTORIZE: tl.constexpr,
    NP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Assemble, factorize and solve N systems in one sweep, one lane per system (its P
    right-hand-side columns in turn); see the comment above :func:`_powers` for the layouts.

    ``FACTORIZE``: per super-step, assemble M_t and M_{t+1,t} (:func:`_lhs_tile`), factorize
    as :func:`block_cholesky_kernel` does (the same pivot rule and ``failed_ptr``), store
    ``cinv`` and ``wmul``; else read them (a factor made by this kernel). With P > 0 it then
    substitutes the right-hand sides it assembles (:func:`_rhs_vector`): forward
    y_t = C_t^{-1} (r_t - W_t y_{t-1}) in the same step, then :func:`_back_sweep`; x into
    ``out`` ``(T2, NB, N*P)``. The same operations in either mode, so a stored factor gives
    the bits of the one-launch call.
    """
    NB: tl.constexpr = PAIR * M
    # squared weights (w_eq^2, w_in^2, w_s^2) after the Gram matrices, in the inputs' dtype
    weq2 = tl.load(g_ptr + 3 * R * R)
    win2 = tl.load(g_ptr + 3 * R * R + 1)
    ws2 = tl.load(g_ptr + 3 * R * R + 2)
    pid = tl.program_id(0)
    lane = pid * BLOCK + tl.arange(0, BLOCK)
    lane_ok = lane < N
    r = tl.arange(0, NP)
    rows = r[None, :, None]
    cols = r[None, None, :]
    vec = r[None, :]
    ent = (rows * NB + cols) * N + lane[:, None, None]
    mask = lane_ok[:, None, None] & (rows < NB) & (cols < NB)
    vmask = lane_ok[:, None] & (vec < NB)
    step = N * (NB * NB)
    vstep = N * P * NB
    zero = tl.zeros([BLOCK, NP, NP], dtype=cinv_ptr.dtype.element_ty)
    wmul = zero
    failed = tl.zeros([BLOCK], dtype=tl.int64)
    for t in range(T2):
        if FACTORIZE:
            a = _lhs_tile(
                coef_ptr, steps_ptr, g_ptr, lane, lane_ok, t, t, N, T, S, sc, sh, E,
                weq2, win2, ws2, M, R, K, PAIR, CENTRAL, True, NP, BLOCK,
            )  # fmt: skip
            floor = pivot_scale * tl.sum(tl.where(rows == cols, a, 0.0), axis=2)
            for kk in range(NB):
                wk = tl.sum(tl.where(cols == kk, wmul, 0.0), axis=2)
                a = a - wk[:, :, None] * wk[:, None, :]
            c = zero
            for j in range(NB):
                colj = tl.sum(tl.where(cols == j, a, 0.0), axis=2)
                dj = tl.sum(tl.where(vec == j, colj, 0.0), axis=1)
                fl = tl.sum(tl.where(vec == j, floor, 0.0), axis=1)
                good = (dj > fl) & (dj < float("inf"))
                failed = tl.where((failed == 0) & (good == 0) & lane_ok, t + 1, failed)
                dj = tl.where(good, dj, float("nan"))
                lj = tl.where(vec >= j, colj / tl.sqrt(dj)[:, None], 0.0)
                c = tl.where(cols == j, lj[:, :, None], c)
                a = a - lj[:, :, None] * lj[:, None, :]
            x = zero
            for i in range(NB):
                crow = tl.sum(tl.where(rows == i, c, 0.0), axis=1)
                cii = tl.sum(tl.where(vec == i, crow, 0.0), axis=1)
                acc = tl.sum(crow[:, :, None] * x, axis=1)
                new = (tl.where(vec == i, 1.0, 0.0) - acc) / cii[:, None]
                new = tl.where(vec <= i, new, 0.0)
                x = tl.where(rows == i, new[:, None, :], x)
            tl.store(cinv_ptr + t * step + ent, x, mask=mask)
            w_now = wmul
            has_next = mask & ((lane * 0 + t + 1) < T2)[:, None, None]
            bsub = _lhs_tile(
                coef_ptr, steps_ptr, g_ptr, lane, lane_ok, t + 1, t, N, T, S, sc, sh, E,
                weq2, win2, ws2, M, R, K, PAIR, CENTRAL, False, NP, BLOCK,
            )  # fmt: skip
            bsub = tl.where(has_next, bsub, 0.0)
            wmul = zero
            for kk in range(NB):
                bk = tl.sum(tl.where(cols == kk, bsub, 0.0), axis=2)
                xk = tl.sum(tl.where(cols == kk, x, 0.0), axis=2)
                wmul = wmul + bk[:, :, None] * xk[:, None, :]
            tl.store(wmul_ptr + (t + 1) * step + ent, wmul, mask=has_next)
        else:
            x = tl.load(cinv_ptr + t * step + ent, mask=mask, other=0.0)
            after_first = mask & ((lane * 0 + t) > 0)[:, None, None]
            w_now = tl.load(wmul_ptr + t * step + ent, mask=after_first, other=0.0)
        for p in range(P):
            v = _rhs_vector(
                coef_ptr, rhs_ptr, init_ptr, lane, lane_ok, t, p, N, P, T, S, sc, sb, su, E,
                weq2, win2, M, R, K, PAIR, NP, BLOCK,
            )  # fmt: skip
            vofs = vec * (N * P) + (lane * P + p)[:, None]
            prev = vmask & ((lane * 0 + t) > 0)[:, None]
            y = tl.load(out_ptr + (t - 1) * vstep + vofs, mask=prev, other=0.0)
            v = v - tl.sum(w_now * y[:, None, :], axis=2)
            y = tl.sum(x * v[:, None, :], axis=2)
            tl.store(out_ptr + t * vstep + vofs, y, mask=vmask)
        tl.debug_barrier()
    if FACTORIZE:
        tl.store(failed_ptr + lane, failed, mask=lane_ok)
    if P > 0:
        _back_sweep(cinv_ptr, wmul_ptr, out_ptr, lane, lane_ok, N, P, T2, NB, NP)


@triton.jit
def _step_vector(buf_ptr, t, j, lane, lane_ok, p, N, P, T, M: tl.constexpr, NB: tl.constexpr):
    """Entries j ``[MP]`` of (unpaired) step t of column p of a ``(T2, NB, N*P)`` buffer,
    ``[BLOCK, MP]`` (zero past m or past the last step)."""
    PAIR: tl.constexpr = NB // M
    row = (t // PAIR) * NB + (t % PAIR) * M + j
    ok = lane_ok[:, None] & ((j < M) & (j >= 0) & ((j * 0 + t) < T))[None, :]
    return tl.load(buf_ptr + (row * (N * P))[None, :] + (lane * P + p)[:, None], mask=ok, other=0.0)


@triton.jit
def ode_backward_kernel(
    grad_ptr,
    x_ptr,
    lam_ptr,
    cinv_ptr,
    wmul_ptr,
    coef_ptr,
    steps_ptr,
    rhs_ptr,
    g_ptr,
    gcoef_ptr,
    gsteps_ptr,
    gcent_ptr,
    grhs_ptr,
    ginit_ptr,
    N,
    P,
    T,
    T2,
    S,
    sc,
    sh,
    sb,
    E,
    M: tl.constexpr,
    R: tl.constexpr,
    K: tl.constexpr,
    PAIR: tl.constexpr,
    CENTRAL: tl.constexpr,
    LHS_GRADS: tl.constexpr,
    NP: tl.constexpr,
    MP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Every gradient of :func:`ode_sweep_kernel`'s solve in one launch, one lane per system.

    lambda = M^{-1} g (``grad`` ``(T2, NB, N*P)``, with the factor ``cinv``, ``wmul``) into
    ``lam``; then per step t (docs/solver.md, "Backward pass"; the formulas of the CPU lane engine's
    backward kernel, :mod:`smnn.solver.lane_kernels_source`), summed over the P columns:

    - ``grhs`` ``(T, E, N*P)``: w_eq^2 C_t[e] . lambda_t;
    - ``ginit`` ``(S, D*K, N*P)``: w_in^2 lambda_t at orders k < K;
    - ``gcoef`` ``(T, E, m, N)``:
      w_eq^2 ((b_t[e] - C_t[e] . x_t) lambda_t - (C_t[e] . lambda_t) x_t);
    - ``gsteps`` ``(T-1, N)``: dl/dh_t of the Taylor rows of interval t;
    - ``gcent`` ``(T-2, N)`` (``CENTRAL``): dl/ds of central row q (s = h_q + h_{q+1}; the
      caller adds it to h_q and h_{q+1}).

    ``LHS_GRADS`` False: only ``grhs`` and ``ginit`` (a factor kept by ``factorize``). Each
    lane writes its own entries: no atomics; sums over shared inputs are the caller's.
    """
    NB: tl.constexpr = PAIR * M
    # squared weights (w_eq^2, w_in^2, w_s^2) after the Gram matrices, in the inputs' dtype
    weq2 = tl.load(g_ptr + 3 * R * R)
    win2 = tl.load(g_ptr + 3 * R * R + 1)
    ws2 = tl.load(g_ptr + 3 * R * R + 2)
    pid = tl.program_id(0)
    lane = pid * BLOCK + tl.arange(0, BLOCK)
    lane_ok = lane < N
    r = tl.arange(0, NP)
    rows = r[None, :, None]
    cols = r[None, None, :]
    vec = r[None, :]
    ent = (rows * NB + cols) * N + lane[:, None, None]
    mask = lane_ok[:, None, None] & (rows < NB) & (cols < NB)
    vmask = lane_ok[:, None] & (vec < NB)
    step = N * (NB * NB)
    vstep = N * P * NB
    # ---- lambda = M^{-1} g: forward sweep, then back
    for t in range(T2):
        x = tl.load(cinv_ptr + t * step + ent, mask=mask, other=0.0)
        after_first = mask & ((lane * 0 + t) > 0)[:, None, None]
        w = tl.load(wmul_ptr + t * step + ent, mask=after_first, other=0.0)
        for p in range(P):
            vofs = vec * (N * P) + (lane * P + p)[:, None]
            v = tl.load(grad_ptr + t * vstep + vofs, mask=vmask, other=0.0)
            prev = vmask & ((lane * 0 + t) > 0)[:, None]
            y = tl.load(lam_ptr + (t - 1) * vstep + vofs, mask=prev, other=0.0)
            v = v - tl.sum(w * y[:, None, :], axis=2)
            y = tl.sum(x * v[:, None, :], axis=2)
            tl.store(lam_ptr + t * vstep + vofs, y, mask=vmask)
        tl.debug_barrier()
    _back_sweep(cinv_ptr, wmul_ptr, lam_ptr, lane, lane_ok, N, P, T2, NB, NP)
    # ---- gradients per step
    j = tl.arange(0, MP)
    jok = j < M
    jd = j // R
    jk = j % R
    DK = (M // R) * K
    col_ok = lane_ok[:, None] & jok[None, :]
    j_r = j[None, :, None]
    j_c = j[None, None, :]
    same = (jd[None, :, None] == jd[None, None, :]) & (j_r < M) & (j_c < M)
    if LHS_GRADS:
        k_r = jk[None, :, None]
        k_c = jk[None, None, :]
        g0 = tl.load(g_ptr + k_r * R + k_c, mask=same, other=0.0)
        g1 = tl.load(g_ptr + R * R + k_r * R + k_c, mask=same, other=0.0)
        g2 = tl.load(g_ptr + 2 * R * R + k_r * R + k_c, mask=same, other=0.0)
    for t in range(T):
        # equation rows: right-hand sides and coefficients
        for e in range(E):
            cv = tl.load(coef_ptr + t * sc + e * M * N + (j * N)[None, :] + lane[:, None],
                         mask=col_ok, other=0.0)  # fmt: skip
            gce = tl.zeros([BLOCK, MP], dtype=cv.dtype)
            for p in range(P):
                lt = _step_vector(lam_ptr, t, j, lane, lane_ok, p, N, P, T, M, NB)
                xt = _step_vector(x_ptr, t, j, lane, lane_ok, p, N, P, T, M, NB)
                beta = tl.sum(cv * lt, axis=1)
                bofs = t * sb + e * N * P + lane * P + p
                alpha = tl.load(rhs_ptr + bofs, mask=lane_ok, other=0.0) - tl.sum(cv * xt, axis=1)
                gofs = (t * E + e) * N * P + lane * P + p
                tl.store(grhs_ptr + gofs, weq2 * beta, mask=lane_ok)
                gce += weq2 * (alpha[:, None] * lt - beta[:, None] * xt)
            if LHS_GRADS:
                tl.store(gcoef_ptr + (t * E + e) * M * N + (j * N)[None, :] + lane[:, None],
                         gce, mask=col_ok)  # fmt: skip
        # initial-value rows
        at_init = col_ok & ((jk < K) & ((j * 0 + t) < S))[None, :]
        for p in range(P):
            lt = _step_vector(lam_ptr, t, j, lane, lane_ok, p, N, P, T, M, NB)
            iofs = ((t * DK + jd * K + jk) * N * P)[None, :] + (lane * P + p)[:, None]
            tl.store(ginit_ptr + iofs, win2 * lt, mask=at_init)
        if LHS_GRADS:
            # Taylor rows of interval t: d(e_i e_j)/dh = dpw_i pw_j + pw_i dpw_j
            has_interval = lane_ok & ((lane * 0 + t) < T - 1)
            h = tl.load(steps_ptr + t * sh + lane, mask=has_interval, other=1.0)
            pw = _powers(h[:, None], jk[None, :], R)
            dpw = jk[None, :] * _powers(h[:, None], jk[None, :] - 1, R)
            dpw = tl.where(jk[None, :] >= 1, dpw, 0.0)
            qq = dpw[:, :, None] * pw[:, None, :] + pw[:, :, None] * dpw[:, None, :]
            sv = tl.zeros([BLOCK, MP, MP], dtype=h.dtype)
            for p in range(P):
                lt = _step_vector(lam_ptr, t, j, lane, lane_ok, p, N, P, T, M, NB)
                xt = _step_vector(x_ptr, t, j, lane, lane_ok, p, N, P, T, M, NB)
                l1 = _step_vector(lam_ptr, t + 1, j, lane, lane_ok, p, N, P, T, M, NB)
                x1 = _step_vector(x_ptr, t + 1, j, lane, lane_ok, p, N, P, T, M, NB)
                sv += g0 * lt[:, :, None] * xt[:, None, :]
                sv += g1 * l1[:, :, None] * x1[:, None, :]
                sv += g2 * l1[:, :, None] * xt[:, None, :]
                sv += g2 * x1[:, :, None] * lt[:, None, :]
            gh = -tl.sum(tl.sum(tl.where(same, qq * sv, 0.0), axis=2), axis=1)
            tl.store(gsteps_ptr + t * N + lane, ws2 * gh, mask=has_interval)
            if CENTRAL:
                # central row q = t: s = h_t + h_{t+1}, a = s^(R-3), b = s^(R-2)
                has_row = lane_ok & ((lane * 0 + t) < T - 2)
                s = tl.load(steps_ptr + t * sh + lane, mask=has_row, other=1.0)
                s += tl.load(steps_ptr + (t + 1) * sh + lane, mask=has_row, other=1.0)
                av = _int_power(s, R - 3)
                bv = av * s
                da = (R - 3) * _int_power(s, R - 4)
                db = (R - 2) * av
                m2 = (jk == R - 2) & jok
                g_aa = tl.zeros([BLOCK], dtype=s.dtype)
                g_bb = tl.zeros([BLOCK], dtype=s.dtype)
                g_ab = tl.zeros([BLOCK], dtype=s.dtype)
                for p in range(P):
                    l0 = _step_vector(lam_ptr, t, j, lane, lane_ok, p, N, P, T, M, NB)
                    x0 = _step_vector(x_ptr, t, j, lane, lane_ok, p, N, P, T, M, NB)
                    l2 = _step_vector(lam_ptr, t + 2, j, lane, lane_ok, p, N, P, T, M, NB)
                    x2 = _step_vector(x_ptr, t + 2, j, lane, lane_ok, p, N, P, T, M, NB)
                    l1 = _step_vector(lam_ptr, t + 1, j + 1, lane, lane_ok, p, N, P, T, M, NB)
                    x1 = _step_vector(x_ptr, t + 1, j + 1, lane, lane_ok, p, N, P, T, M, NB)
                    aa = -(l0 * x0) - (l2 * x2) + (l2 * x0 + x2 * l0)
                    ab = -(l1 * x0 + x1 * l0) + (l2 * x1 + x2 * l1)
                    g_aa += tl.sum(tl.where(m2[None, :], aa, 0.0), axis=1)
                    g_bb += tl.sum(tl.where(m2[None, :], -(l1 * x1), 0.0), axis=1)
                    g_ab += tl.sum(tl.where(m2[None, :], ab, 0.0), axis=1)
                ds = 2.0 * av * da * g_aa + 2.0 * bv * db * g_bb + (da * bv + av * db) * g_ab
                tl.store(gcent_ptr + t * N + lane, ws2 * ds, mask=has_row)


# ------------------------------------------------------------------ the QR sweep


@triton.jit
def qr_sweep_kernel(
    x_ptr,
    y_ptr,
    beta_ptr,
    r_ptr,
    s_ptr,
    z_ptr,
    carried_ptr,
    u_ptr,
    failed_ptr,
    N,
    P,
    Ts,
    p,
    rank_tol,
    NB: tl.constexpr,
    RP: tl.constexpr,
    CP: tl.constexpr,
    NP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The QR sweep of docs/solver.md, "The orthogonal (QR) solve" (:mod:`smnn.solver.triton_qr`),
    one lane per system, in one launch: triangularise, then back-substitute.

    Layouts (batch last): ``x``, ``y`` ``(Ts, p, n, N)``, ``beta`` ``(Ts, p, P, N)``; out
    ``r``, ``s`` ``(Ts, n, n, N)``, ``z``, ``u`` ``(Ts, n, P', N)`` (P' = max(P, 1)),
    ``carried`` ``(n, CP, N)`` scratch, ``failed`` ``(N,)``. Per step the tile
    ``[BLOCK, RP, CP]`` holds rows [carried triangle | 0 | carried z ; x_t | y_t | beta_t]
    (columns u_t, u_{t+1}, right-hand sides), sorted by decreasing max-norm (stable, as the
    torch path); the Householder reflection of each of the first
    2n columns (n at the last step) is applied to every column (LAPACK's convention:
    H = I - tau v v^T, v_j = 1, R_jj = -sign(a_jj) ||a_j||).
    """
    pid = tl.program_id(0)
    lane = pid * BLOCK + tl.arange(0, BLOCK)
    lane_ok = lane < N
    rr = tl.arange(0, RP)
    cc = tl.arange(0, CP)
    rows = rr[None, :, None]
    cols = cc[None, None, :]
    lane3 = lane[:, None, None]
    lok3 = lane_ok[:, None, None]
    PP = tl.maximum(P, 1)
    in_x = lok3 & (rows >= NB) & (rows < NB + p) & (cols < NB)
    in_y = lok3 & (rows >= NB) & (rows < NB + p) & (cols >= NB) & (cols < 2 * NB)
    in_b = lok3 & (rows >= NB) & (rows < NB + p) & (cols >= 2 * NB) & (cols < 2 * NB + P)
    in_c = lok3 & (rows < NB) & ((cols < NB) | ((cols >= 2 * NB) & (cols < 2 * NB + P)))
    xofs = ((rows - NB) * NB + cols) * N + lane3
    yofs = ((rows - NB) * NB + cols - NB) * N + lane3
    bofs = ((rows - NB) * P + cols - 2 * NB) * N + lane3
    cofs = (rows * CP + cols) * N + lane3
    xstep = p * NB * N
    bstep = p * P * N
    failed = tl.zeros([BLOCK], dtype=tl.int64)
    for t in range(Ts):
        a = tl.load(x_ptr + t * xstep + xofs, mask=in_x, other=0.0)
        a += tl.load(y_ptr + t * xstep + yofs, mask=in_y, other=0.0)
        a += tl.load(beta_ptr + t * bstep + bofs, mask=in_b, other=0.0)
        a += tl.load(carried_ptr + cofs, mask=in_c & ((lane3 * 0 + t) > 0), other=0.0)
        # ||column j of A||^2: this step's rows of u_t and the previous step's coupling rows
        col_sq = tl.sum(tl.where(in_x, a * a, 0.0), axis=1)  # [BLOCK, CP]
        prev = in_x & ((lane3 * 0 + t) > 0)
        yp = tl.load(y_ptr + (t - 1) * xstep + xofs, mask=prev, other=0.0)
        col_sq += tl.sum(yp * yp, axis=1)
        # rows by decreasing max-norm over the 2n columns, stable (the torch path's row
        # order, smnn.solver.qr._row_order): rank_i = #(keys above) + #(equal keys before i)
        key = tl.max(tl.where(cols < 2 * NB, tl.abs(a), 0.0), axis=2)  # [BLOCK, RP]
        k_i = key[:, :, None]
        k_j = key[:, None, :]
        before = (k_j > k_i) | ((k_j == k_i) & (rr[None, None, :] < rows))
        rank = tl.sum(tl.where(before, 1, 0), axis=2)  # [BLOCK, RP]
        sorted_a = tl.zeros_like(a)
        for i in range(RP):
            row = tl.sum(tl.where(rows == i, a, 0.0), axis=1)  # [BLOCK, CP]
            sorted_a = tl.where(rank[:, :, None] == i, row[:, None, :], sorted_a)
        a = sorted_a
        n_cols = tl.where(t == Ts - 1, NB, 2 * NB)
        for j in range(2 * NB):
            colj = tl.sum(tl.where(cols == j, a, 0.0), axis=2)  # [BLOCK, RP]
            ajj = tl.sum(tl.where(rr[None, :] == j, colj, 0.0), axis=1)
            below = tl.where(rr[None, :] > j, colj, 0.0)
            sigma = tl.sum(below * below, axis=1)
            norm = tl.sqrt(ajj * ajj + sigma)
            beta_h = tl.where(ajj >= 0, -norm, norm)
            act = (sigma > 0) & (j < n_cols)
            safe = tl.where(act, beta_h, 1.0)
            tau = tl.where(act, (beta_h - ajj) / safe, 0.0)
            scale = tl.where(act, 1.0 / (ajj - beta_h), 0.0)
            v = tl.where(rr[None, :] == j, 1.0, below * scale[:, None])
            w = tl.sum(v[:, :, None] * a, axis=1)  # v^T A, [BLOCK, CP]
            a = a - tau[:, None, None] * v[:, :, None] * w[:, None, :]
            # column j is exactly (.., beta_h, 0, ..) below row j-1
            new_col = tl.where(rr[None, :] == j, tl.where(act, beta_h, ajj)[:, None], 0.0)
            new_col = tl.where(rr[None, :] < j, colj, new_col)
            a = tl.where((cols == j) & (j < n_cols), new_col[:, :, None], a)
        # rank: |R_jj| against the column's norm
        diag = tl.sum(tl.where((rows == cols) & (rows < NB), a, 0.0), axis=1)  # [BLOCK, CP]
        ok = (tl.abs(diag) > rank_tol * tl.sqrt(col_sq)) | (cc[None, :] >= NB)
        bad = tl.sum(tl.where(ok, 0, 1), axis=1) > 0
        failed = tl.where((failed == 0) & bad & lane_ok, t + 1, failed)
        top = lok3 & (rows < NB)
        rofs = (rows * NB + cols) * N + lane3
        tl.store(r_ptr + t * NB * NB * N + rofs, a, mask=top & (cols < NB) & (cols >= rows))
        sofs = (rows * NB + cols - NB) * N + lane3
        tl.store(s_ptr + t * NB * NB * N + sofs, a, mask=top & (cols >= NB) & (cols < 2 * NB))
        zofs = (rows * PP + cols - 2 * NB) * N + lane3
        zmask = top & (cols >= 2 * NB) & (cols < 2 * NB + P)
        tl.store(z_ptr + t * NB * PP * N + zofs, a, mask=zmask)
        # the next step's carried rows: rows n..2n-1, columns of u_{t+1} and the right-hand
        # sides (over this step's carried rows: every thread has read them first)
        tl.debug_barrier()
        mid = lok3 & (rows >= NB) & (rows < 2 * NB)
        tofs = ((rows - NB) * CP + cols - NB) * N + lane3
        tl.store(carried_ptr + tofs, a, mask=mid & (cols >= NB) & (cols < 2 * NB) & (cols >= rows))
        lower = mid & (cols >= NB) & (cols < 2 * NB) & (cols < rows)
        tl.store(carried_ptr + tofs, tl.zeros_like(a), mask=lower)
        kofs = ((rows - NB) * CP + cols) * N + lane3
        tl.store(carried_ptr + kofs, a, mask=mid & (cols >= 2 * NB) & (cols < 2 * NB + P))
        tl.debug_barrier()
    tl.store(failed_ptr + lane, failed, mask=lane_ok)
    # back substitution: u_t = R_t^{-1} (z_t - S_t u_{t+1})
    _qr_back_sweep(r_ptr, s_ptr, z_ptr, u_ptr, lane, lane_ok, N, P, Ts, NB, NP)


@triton.jit
def _qr_tile(ptr, t, lane, lane_ok, N, Ts, NB: tl.constexpr, NP: tl.constexpr):
    """The ``[BLOCK, NP, NP]`` tile of block t of a ``(Ts, NB, NB, N)`` array (zero past NB
    and where t is outside 0..Ts-1)."""
    q = tl.arange(0, NP)
    rows = q[None, :, None]
    cols = q[None, None, :]
    inside = ((lane * 0 + t) >= 0) & ((lane * 0 + t) < Ts) & lane_ok
    mask = inside[:, None, None] & (rows < NB) & (cols < NB)
    ofs = (rows * NB + cols) * N + lane[:, None, None]
    return tl.load(ptr + t * NB * NB * N + ofs, mask=mask, other=0.0)


@triton.jit
def _qr_back_sweep(
    r_ptr, s_ptr, in_ptr, out_ptr, lane, lane_ok, N, P, Ts, NB: tl.constexpr, NP: tl.constexpr
):
    """out_t = R_t^{-1} (in_t - S_t out_{t+1}) from the last step back, every column.

    ``r``, ``s`` ``(Ts, NB, NB, N)`` (R_t upper triangular, S_{Ts-1} unused); ``in``, ``out``
    ``(Ts, NB, P', N)`` with P' = max(P, 1); ``in`` may be ``out`` (in place)."""
    PP = tl.maximum(P, 1)
    q = tl.arange(0, NP)
    qr_ = q[None, :, None]
    qvec = q[None, :]
    vmask = lane_ok[:, None] & (qvec < NB)
    for tt in range(Ts):
        t = Ts - 1 - tt
        rt = _qr_tile(r_ptr, t, lane, lane_ok, N, Ts, NB, NP)
        st = _qr_tile(s_ptr, t, lane, lane_ok, N, Ts - 1, NB, NP)
        for c in range(P):
            vofs = (qvec * PP + c) * N + lane[:, None]
            zt = tl.load(in_ptr + t * NB * PP * N + vofs, mask=vmask, other=0.0)
            nxt = vmask & ((lane[:, None] * 0 + t + 1) < Ts)
            un = tl.load(out_ptr + (t + 1) * NB * PP * N + vofs, mask=nxt, other=0.0)
            rhs = zt - tl.sum(st * un[:, None, :], axis=2)
            ut = tl.zeros_like(rhs)
            for ii in range(NB):
                i = NB - 1 - ii
                row = tl.sum(tl.where(qr_ == i, rt, 0.0), axis=1)
                rii = tl.sum(tl.where(qvec == i, row, 0.0), axis=1)
                acc = tl.sum(row * ut, axis=1)
                vi = tl.sum(tl.where(qvec == i, rhs, 0.0), axis=1)
                ut = tl.where(qvec == i, ((vi - acc) / rii)[:, None], ut)
            # in place: every thread has read in_t first
            tl.debug_barrier()
            tl.store(out_ptr + t * NB * PP * N + vofs, ut, mask=vmask)
        tl.debug_barrier()


@triton.jit
def _qr_forward_sweep(
    r_ptr, s_ptr, in_ptr, out_ptr, lane, lane_ok, N, P, Ts, NB: tl.constexpr, NP: tl.constexpr
):
    """out_t = R_t^{-T} (in_t - S_{t-1}^T out_{t-1}) from the first step on, every column
    (layouts as :func:`_qr_back_sweep`; ``in`` may be ``out``)."""
    PP = tl.maximum(P, 1)
    q = tl.arange(0, NP)
    qc = q[None, None, :]
    qvec = q[None, :]
    vmask = lane_ok[:, None] & (qvec < NB)
    for t in range(Ts):
        rt = _qr_tile(r_ptr, t, lane, lane_ok, N, Ts, NB, NP)
        sp = _qr_tile(s_ptr, t - 1, lane, lane_ok, N, Ts - 1, NB, NP)
        for c in range(P):
            vofs = (qvec * PP + c) * N + lane[:, None]
            gt = tl.load(in_ptr + t * NB * PP * N + vofs, mask=vmask, other=0.0)
            prv = vmask & ((lane[:, None] * 0 + t) > 0)
            wp = tl.load(out_ptr + (t - 1) * NB * PP * N + vofs, mask=prv, other=0.0)
            rhs = gt - tl.sum(sp * wp[:, :, None], axis=1)  # S_{t-1}^T w_{t-1}
            wt = tl.zeros_like(rhs)
            for i in range(NB):
                col = tl.sum(tl.where(qc == i, rt, 0.0), axis=2)  # column i of R_t
                rii = tl.sum(tl.where(qvec == i, col, 0.0), axis=1)
                acc = tl.sum(col * wt, axis=1)  # rows k < i only: wt is zero from i on
                vi = tl.sum(tl.where(qvec == i, rhs, 0.0), axis=1)
                wt = tl.where(qvec == i, ((vi - acc) / rii)[:, None], wt)
            tl.debug_barrier()
            tl.store(out_ptr + t * NB * PP * N + vofs, wt, mask=vmask)
        tl.debug_barrier()


@triton.jit
def qr_normal_solve_kernel(
    r_ptr,
    s_ptr,
    g_ptr,
    out_ptr,
    N,
    P,
    Ts,
    NB: tl.constexpr,
    NP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out = (R^T R)^{-1} g for the block-bidiagonal R of the QR sweep
    (:func:`qr_sweep_kernel`), one lane per system, one launch: the forward substitution
    R_t^T w_t = g_t - S_{t-1}^T w_{t-1}, then the back substitution
    R_t x_t = w_t - S_t x_{t+1} (in place on ``out``).

    Layouts (batch last): ``r``, ``s`` ``(Ts, n, n, N)`` as the sweep stores them; ``g``,
    ``out`` ``(Ts, n, P', N)`` (P' = max(P, 1), P columns per system).
    """
    pid = tl.program_id(0)
    lane = pid * BLOCK + tl.arange(0, BLOCK)
    lane_ok = lane < N
    _qr_forward_sweep(r_ptr, s_ptr, g_ptr, out_ptr, lane, lane_ok, N, P, Ts, NB, NP)
    _qr_back_sweep(r_ptr, s_ptr, out_ptr, out_ptr, lane, lane_ok, N, P, Ts, NB, NP)
