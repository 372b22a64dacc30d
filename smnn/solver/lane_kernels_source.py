"""The lane kernels: the CPU engine of the S-MNN solver, vectorised across systems.

Kernels (each parallel over jobs; the torch side is :mod:`smnn.solver.fused`):

- :func:`forward`: for a group of ``LANES`` systems at a time and every step t in order, assemble
  M_t and M_{t+1,t} from the coefficients and steps (docs/solver.md, "Structure of M"), build the
  right-hand side r_t, factorize (block Cholesky, below) and forward-substitute; then
  back-substitute and write u. With no right-hand side (P = 0) it only factorizes.
- :func:`forward_central`: the same with central smoothness rows (block pentadiagonal M).
- :func:`solve`: substitutions with stored factors, for given right-hand sides or for ones it
  assembles from (coefficients, b, u0) exactly as :func:`forward` does.
- :func:`backward`: lambda = M^{-1} g with the stored factors and the chain rule of "Backward pass"
  through the assembly to the coefficients, steps, right-hand sides and initial values.

Neither the blocks of M, nor r, nor their gradients are ever stored: the only (N, T, ...) arrays
are the factors, u and the gradients.

Why lanes: the blocks are tiny (m = D*R = 2..15), so one system's recurrence is a chain of short
scalar loops that cannot use the vector units. Every operation of the recurrence is the same for
all systems, so each is done for ``LANES`` systems side by side, on arrays whose last axis is the
lane. The lane operations are the helpers that :mod:`smnn.solver.lane_ops` generates for the
width (``_add_product`` etc.), each written as one tuple assignment over the lanes so that all
loads come before all stores; LLVM's SLP vectoriser then
turns each into vector instructions (four AVX-512 registers in float64). Numba compiles with the
SLP vectoriser off by default, so the callers compile these kernels inside
:func:`slp_vectorization` (see :mod:`smnn.solver.fused`).

Why 32 lanes (4 vectors of 8 float64) rather than 8 (one vector): the recurrence is a chain of
dependent operations (each pivot's square root and division, then the column that needs it), and
every lane operation carries a dozen integer instructions of indexing. With 8 lanes the kernels
waited on the chain and on that bookkeeping; 32 lanes issue four independent vector operations
per index computation. Measured at the KdV shape (B=8192, T=10, R=5, float64, one thread):
forward kernel 11.3 -> 7.7 ms, backward 12.8 -> 9.1 ms (16 lanes: about half of that gain).
Calls with fewer than 64 systems (or columns) run this source compiled at 8 lanes
(:func:`smnn.solver.lane_kernels.kernels`).
A group's working set (its factors and right-hand sides) stays in cache from assembly to
substitution. The lanes of a job are either systems (each with all its P right-hand sides) or,
for few systems shared by many right-hand sides, P columns of one system (:func:`_job_lanes`).

Determinism: no fast-math licences (see :data:`smnn.solver.lane_ops.KERNEL_OPTIONS`), so the
results do not depend on how a kernel was compiled (cold or warm numba cache); jobs go to the
workers as they become free (:func:`_claim_job`), but each job's work does not depend on which
worker runs it or on the number of threads, and sums over jobs run in job order.

The factorization is the block LDL^T of docs/solver.md, "Solving M u = r in O(T)", with each pivot
block D_t kept as its Cholesky factor D_t = L_t L_t^T. With Y_t = L_t^{-1} M_{t+1,t}^T,

    D_0 = M_0,   D_{t+1} = M_{t+1} - Y_t^T Y_t      (= M_{t+1} - M_{t+1,t} D_t^{-1} M_{t+1,t}^T)
    forward:  z_t = r_t - M_{t,t-1} y_{t-1},   y_t = D_t^{-1} z_t
    backward: x_{T-1} = y_{T-1},   x_t = D_t^{-1} (z_t - M_{t+1,t}^T x_{t+1}).

Only L_t is stored: Y_t lives for one step of the factorization, and the substitutions apply the
coupling block M_{t+1,t} (w_s^2 h^i h^j G2[i, j] per state) straight from the step sizes, so a
solve reads 2.5x fewer bytes per step (m = 3) than with stored multipliers. The pivots are those of
the LDL^T recurrence, so pivot failures are the same. A non-positive (or non-finite) pivot becomes
NaN, which propagates to every later factor of that system; the kernel reads the failing step back.
(With central rows the off-diagonal blocks carry Schur corrections and are stored; see the
"central smoothness" section below.)

Layouts (C-contiguous, float32 or float64; G = ceil(N / LANES) groups, W = LANES):

- inputs: ``coef`` (N, Tc, E, m), ``steps`` (N, Th), ``rhs_eq`` (N, Tb, E, P),
  ``init`` (N, Su, D*K, P), with Tc, Tb in {1, T}, Th in {1, T-1}, Su in {1, S} (or 0 when
  S = 0); a size-1 axis is shared by all steps.
- factors: ``chol`` (G, T, m(m-1)/2, W): the strictly lower triangle of L_t, packed by rows
  (entry (i, k), k < i, at i(i-1)/2 + k); ``rdiag`` (G, T, m, W): the reciprocals of the diagonal of
  L_t (the diagonal itself is never needed). A solve also needs the ``steps`` they were made from.
  With lanes as columns the factors are replicated: ``(N, T, ., W)``, system n in every lane.
- ``out``, ``x``, ``grad_out`` (N, T, m, P).
- constants: ``g0``, ``g1``, ``g2`` (R, R) from :func:`smnn.solver.blocks.taylor_gram_matrices`,
  ``weights`` (3,) = (w_eq^2, w_in^2, w_s^2).

Lanes past the last system (or column) of the final group repeat it; their results are not
written.
"""
# ruff: noqa: F821  (LANES and the lane helpers are generated: smnn.solver.lane_ops)

import numpy as np
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

from smnn.solver.lane_kernels import (
    BackwardScratch,
    CentralScratch,
    ForwardScratch,
    SolveScratch,
)
from smnn.solver.lane_ops import KERNEL_OPTIONS, helper, inline_helper

# values per lane in one chunk of inputs loaded into lanes (:func:`_load_chunk`): 32 KiB in
# float64 for a group of lanes, so that a chunk stays in the L1 cache while its steps are processed
_CHUNK_VALUES = 4096 // LANES


@helper
def _rsqrt_pivot(x, floor):
    """1 / sqrt(x) for a finite pivot x above ``floor``, NaN otherwise (the failure marker).

    ``floor`` is ``pivot_floor`` (:class:`~smnn.solver.lane_kernels.Constants`) times the
    diagonal entry of the assembled block M_t, so a pivot that cancellation has reduced to
    rounding noise fails like a non-positive one (docs/solver.md, "Dense reference and accuracy
    bars").

    Computed for every x and then selected, without a branch, so that the lanes of
    :func:`_reciprocal_sqrt_pivot` vectorise (with a branch per lane they were scalar square
    roots and divisions, one lane at a time). The division is in float64 (``1.0`` is a float64)
    for float32 pivots too."""
    r = 1.0 / np.sqrt(x)
    return r if (x > floor) & (x < np.inf) else np.nan


@helper
def _tri(i, k):
    """Position of entry (i, k), k < i, of a strictly lower triangle packed by rows.

    Unsigned, so that indexing with it needs no wrap-around of negative indices (numba wraps
    signed indices that LLVM cannot prove non-negative: a compare and select per index)."""
    return np.uint64((i * (i - 1)) // 2 + k)


@intrinsic
def _claim_job(typingctx, next_job):
    """The next job for the calling worker: ``next_job[0]`` (an int64 (1,) array shared by the
    workers), incremented atomically (``atomicrmw add``), so every job goes to exactly one worker.

    Jobs go to whichever worker is free, one at a time: with a fixed contiguous share per worker
    the slower thread (the other thread busy with something else, or slower memory) decided the
    time of every kernel. Each job writes only its own outputs, so the results do not depend on
    which worker ran it."""
    if not (isinstance(next_job, types.Array) and next_job.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        one = context.get_constant(types.int64, 1)
        return builder.atomic_rmw("add", array.data, one, "monotonic")

    return types.int64(next_job), codegen


# ------------------------------------------------------------------ substitutions


@inline_helper
def _pivot_solve(lc, rd, v):
    """In place: v (m, W) = D_t^{-1} v = L_t^{-T} L_t^{-1} v (``lc`` packed, ``rd`` reciprocals)."""
    m = rd.shape[0]
    for i in range(m):
        acc = _value_of(v[i])
        for k in range(i):
            acc = _minus_products(acc, lc[_tri(i, k)], v[k])
        _store_value(v[i], _value_times(acc, rd[i]))
    for i in range(m - 1, -1, -1):
        acc = _value_of(v[i])
        for k in range(i + 1, m):
            acc = _minus_products(acc, lc[_tri(k, i)], v[k])
        _store_value(v[i], _value_times(acc, rd[i]))


@inline_helper
def _load_powers(hs, th, pw):
    """pw (R, W): pw[k] = h^k for the lanes' step sizes h = ``hs[th]`` (W,) of interval ``th``."""
    R = pw.shape[0]
    _fill(pw[0], 1.0)
    for k in range(1, R):
        _copy(pw[k], pw[k - 1])
        _multiply(pw[k], hs[th])


@helper
def _load_step_sizes(steps, b0, nl, hs):
    """hs (Th, W) = the step sizes of the lanes' systems (rows b0 .. b0 + nl - 1 of ``steps``
    (N, Th), the last repeated), each row read in order; True if one is not positive and finite.
    """
    Th = steps.shape[1]
    bad = False
    for l in range(LANES):
        r = b0 + min(l, nl - 1)
        for t in range(Th):
            h = steps[r, t]
            bad |= not ((h > 0.0) & (h < np.inf))
            hs[t, l] = h
    return bad


@helper
def _chunk_steps(n_steps, values_per_step):
    """Steps per chunk of inputs loaded into lanes at once (:func:`_load_chunk`): as many as keep
    a chunk within ``_CHUNK_VALUES`` values per lane, at least 1, at most ``n_steps``."""
    return max(1, min(n_steps, _CHUNK_VALUES // max(1, values_per_step)))


@helper
def _load_chunk(src, b0, nl, t0, t1, dst):
    """dst[t - t0] (A, B, W) = src[row, t] (src (N, T', A, B)) for t0 <= t < t1 and the lanes'
    rows b0 .. b0 + nl - 1 (the last repeated); with a size-1 step axis (T' = 1), its one step
    into dst[0]. True if a value is not finite.

    Each row's steps are read in order (one short sequential stream per lane, where loading one
    step at a time for all lanes jumps between rows and missed the cache at every step), as one
    flat loop over the (t, a, b) of the chunk: with the three nested loops, the innermost one
    (B = 1..5 values) ran as LLVM's scalar remainder loop, 8 % of the forward kernel at the KdV
    shape."""
    N, Ts, A, B = src.shape
    if Ts == 1:
        t0, t1 = 0, 1
    flat_src = src.reshape((N, Ts * A * B))
    flat_dst = dst.reshape((dst.shape[0] * A * B, LANES))
    j0, n = t0 * A * B, (t1 - t0) * A * B
    bad = False
    for l in range(LANES):
        row = flat_src[b0 + min(l, nl - 1)]
        for j in range(n):
            v = row[j0 + j]
            bad |= not np.isfinite(v)
            flat_dst[j, l] = v
    return bad


@helper
def _load_column_chunk(src, n, c0, nc, t0, t1, dst):
    """:func:`_load_chunk` with lanes as columns: dst[t - t0, a, 0, l] = src[n, t, a, c0 + l]
    (the last of the nc columns repeated)."""
    A = src.shape[2]
    if src.shape[1] == 1:
        t0, t1 = 0, 1
    bad = False
    for t in range(t0, t1):
        for a in range(A):
            for l in range(LANES):
                v = src[n, t, a, c0 + min(l, nc - 1)]
                bad |= not np.isfinite(v)
                dst[t - t0, a, 0, l] = v
    return bad


@inline_helper
def _subtract_coupling(dst, v, pw, g2, ws2, transpose, tmp):
    """dst (m, W) -= M_{t+1,t} v, or M_{t+1,t}^T v when ``transpose``, for the interval whose
    powers are ``pw`` (R, W): per state, M_{t+1,t}[i, j] = w_s^2 h^i h^j G2[i, j]. ``tmp``: (R, W).
    """
    R = pw.shape[0]
    D = dst.shape[0] // R
    for d in range(D):
        o = d * R
        for j in range(R):
            _copy(tmp[j], pw[j])
            _multiply(tmp[j], v[o + j])
        for i in range(R):
            acc = _value_of(dst[o + i])
            for j in range(R):
                c = -ws2 * (g2[j, i] if transpose else g2[i, j])
                acc = _plus_scaled_products(acc, c, pw[i], tmp[j])
            _store_value(dst[o + i], acc)


@inline_helper
def _forward_sweep_step(lc, rd, wsol, t, y_prev, pw_prev, g2, ws2, tmp):
    """One step of the forward sweep for every column p: z_t = r_t - M_{t,t-1} y_{t-1} in
    ``wsol[t]`` (T, P, m, W), then y_prev (P, m, W) = D_t^{-1} z_t. ``pw_prev``: powers of
    interval t-1 (unused when t = 0)."""
    P, m = wsol.shape[1], wsol.shape[2]
    for p in range(P):
        zt = wsol[t, p]
        if t > 0:
            _subtract_coupling(zt, y_prev[p], pw_prev, g2, ws2, False, tmp)
        for i in range(m):
            _copy(y_prev[p, i], zt[i])
        _pivot_solve(lc, rd, y_prev[p])


@helper
def _back_sweep(chol, rdiag, hs, g2, ws2, wsol, pw, tmp):
    """In place: ``wsol`` (T, P, m, W) holds z_t on entry and x_t on exit, where
    x_{T-1} = D_{T-1}^{-1} z_{T-1} and x_t = D_t^{-1} (z_t - M_{t+1,t}^T x_{t+1})."""
    T, P, m, _ = wsol.shape
    Th = hs.shape[0]
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            _load_powers(hs, t if Th > 1 else 0, pw)
        for p in range(P):
            xt = wsol[t, p]
            if t < T - 1:
                _subtract_coupling(xt, wsol[t + 1, p], pw, g2, ws2, True, tmp)
            _pivot_solve(chol[t], rdiag[t], xt)


@helper
def _solve_group(chol, rdiag, hs, g2, ws2, wsol, y_prev, pw_prev, pw, tmp):
    """In place: ``wsol`` (T, P, m, W) holds the right-hand sides on entry, M^{-1} of them on exit
    (one group's factors ``chol`` (T, m(m-1)/2, W), ``rdiag`` (T, m, W), made from the lanes'
    step sizes ``hs`` (Th, W))."""
    T = wsol.shape[0]
    Th = hs.shape[0]
    for t in range(T):
        _forward_sweep_step(chol[t], rdiag[t], wsol, t, y_prev, pw_prev, g2, ws2, tmp)
        if t < T - 1:
            _load_powers(hs, t if Th > 1 else 0, pw_prev)
    _back_sweep(chol, rdiag, hs, g2, ws2, wsol, pw, tmp)


@njit(cache=True)
def _solve_scratch(like, P, m, R):
    """Per-worker scratch of :func:`_solve_group`: y_prev (P, m, W), pw_prev, pw, tmp (R, W),
    of ``like``'s dtype."""
    dt = like.dtype
    y_prev = np.empty((P, m, LANES), dtype=dt)
    pw_prev = np.empty((R, LANES), dtype=dt)
    pw = np.empty((R, LANES), dtype=dt)
    tmp = np.empty((R, LANES), dtype=dt)
    return y_prev, pw_prev, pw, tmp


@helper
def _job_lanes(job, columns, N, P, n_column_groups):
    """What one parallel job covers: (factor group g, first system b0, real systems nl, first
    column c0, real columns nc).

    Lanes are systems (``columns`` False): job g is group g, lanes = systems b0 .. b0 + nl - 1
    (the last repeated), every lane with all P columns. Lanes are columns (``columns`` True): job
    = (system n, column group q), lanes = columns c0 .. c0 + nc - 1 of system n (the last
    repeated), one column per lane; the factor group is n (system n in every lane).
    """
    if columns:
        n = job // n_column_groups
        c0 = (job % n_column_groups) * LANES
        return n, n, 1, c0, min(LANES, P - c0)
    b0 = job * LANES
    return job, b0, min(LANES, N - b0), 0, P


@helper
def _load_lanes(src, b0, nl, c0, nc, columns, dst):
    """dst (T, Pl, m, W) = the lanes' columns of src (N, T, m, P) (see :func:`_job_lanes`).

    With lanes as columns each lane vector is gathered from its sources and stored at once
    (vector stores rather than strided scalar stores)."""
    T, Pl, m, _ = dst.shape
    if columns:
        c = _lane_rows(c0, nc)
        for t in range(T):
            for i in range(m):
                s = src[b0, t, i]
                d = dst[t, 0, i]
                _gather(d, s, c)
    else:
        # one lane (one system, a contiguous row of src) at a time: gathering each lane vector
        # from 32 rows (vgatherqpd) took a quarter of the backward kernel at the Lorenz shape
        for l in range(LANES):
            r = b0 + min(l, nl - 1)
            for t in range(T):
                for i in range(m):
                    for p in range(Pl):
                        dst[t, p, i, l] = src[r, t, i, p]


@helper
def _store_lanes(src, b0, nl, c0, nc, columns, dst):
    """The real lanes of src (T, Pl, m, W) into dst (N, T, m, P): inverse of :func:`_load_lanes`."""
    T, Pl, m, _ = src.shape
    if columns:
        for t in range(T):
            for i in range(m):
                s = src[t, 0, i]
                d = dst[b0, t, i]
                for l in range(nc):
                    d[c0 + l] = s[l]
    elif Pl == 1:
        # one system's row of dst at a time, written in order, as one flat loop over (t, i):
        # writing each (t, i) to all lanes' rows in turn (and the short loops over i) cost 8 %
        # of the forward kernel at the KdV shape
        flat_src = src.reshape((T * m, LANES))
        flat_dst = dst.reshape((dst.shape[0], T * m))
        for l in range(nl):
            row = flat_dst[b0 + l]
            for j in range(T * m):
                row[j] = flat_src[j, l]
    else:
        for t in range(T):
            for i in range(m):
                for p in range(Pl):
                    s = src[t, p, i]
                    for l in range(nl):
                        dst[b0 + l, t, i, p] = s[l]


@helper
def _load_step_rhs_inputs(coef, rhs_eq, init, b0, nl, c0, nc, columns, t, S, cl, bv, u0):
    """Step t's coefficients ``cl`` (E, m, W), right-hand sides ``bv`` (E, Pl, W) and, for t < S,
    initial values ``u0`` (D*K, Pl, W) into the lanes; True if a right-hand side or initial
    value is not finite (the coefficients were checked when the factor was made)."""
    Tc, E, m = coef.shape[1], coef.shape[2], coef.shape[3]
    Tb, Su, DK = rhs_eq.shape[1], init.shape[1], init.shape[2]
    Pl = bv.shape[1]
    tc = t if Tc > 1 else 0
    tb = t if Tb > 1 else 0
    su = t if Su > 1 else 0
    bad = False
    for l in range(LANES):
        bl = b0 + min(l, nl - 1)
        for e in range(E):
            for i in range(m):
                cl[e, i, l] = coef[bl, tc, e, i]
        for p in range(Pl):
            pc = c0 + min(l, nc - 1) if columns else p
            for e in range(E):
                v = rhs_eq[bl, tb, e, pc]
                bad |= not np.isfinite(v)
                bv[e, p, l] = v
            if t < S:
                for i in range(DK):
                    v = init[bl, su, i, pc]
                    bad |= not np.isfinite(v)
                    u0[i, p, l] = v
    return bad


@helper
def _rhs_step(cl, bv, u0, t, S, R, K, weq2, win2, wsol):
    """wsol[t] (Pl, m, W) = r_t = w_eq^2 C_t^T b_t + w_in^2 [u0_t; 0] for every column.

    :func:`forward` and :func:`forward_central` spell out the same operations in the same order
    (a call costs them ~15 %), so that :func:`solve` assembles bit-identical right-hand sides
    (``factorize(...).solve`` equals ``ode_forward`` to the bit; tests/test_dropin.py)."""
    E, m = cl.shape[0], cl.shape[1]
    Pl = wsol.shape[1]
    D = m // R
    for p in range(Pl):
        for i in range(m):
            wi = wsol[t, p, i]
            _fill(wi, 0.0)
            for e in range(E):
                _add_product(wi, cl[e, i], bv[e, p])
            _scale(wi, weq2)
        if t < S:
            for d in range(D):
                for k in range(K):
                    _add_scaled(wsol[t, p, d * R + k], win2, u0[d * K + k, p])


@njit(parallel=True, **KERNEL_OPTIONS)
def solve(factor, central, inputs, rhs, sizes, constants, columns, out, bad_input, n_workers):
    """x = M^{-1} r with stored factors and the steps they were made from; x into ``out``
    (N, T, m, P).

    r is ``rhs`` (N, T, m, P) when it has systems (``rhs.shape[0] > 0``); otherwise it is
    assembled from ``coef`` (N, Tc, E, m), ``rhs_eq`` (N, Tb, E, P) and ``init`` (N, Su, D*K, P)
    exactly as :func:`forward` assembles it, and ``bad_input[job] = 1`` flags a job that met a
    non-finite right-hand side or initial value. ``columns``: the lane layout of the jobs
    (:func:`_job_lanes`); with ``columns`` the factors are ``(N, T, ., W)`` with system n in every
    lane of group n. ``n_workers`` parallel jobs at most.
    """
    chol = factor.chol
    coef, steps, init = inputs.coef, inputs.steps, inputs.init
    N, T, m, P = out.shape
    R = constants.g2.shape[0]
    E, DK = coef.shape[2], init.shape[2]
    Q = (P + LANES - 1) // LANES
    n_jobs = N * Q if columns else chol.shape[0]
    Pl = 1 if columns else P
    dt = chol.dtype
    next_job = np.zeros(1, dtype=np.int64)  # the first job no worker has claimed
    for _worker in prange(n_workers):
        wsol = np.empty((T, Pl, m, LANES), dtype=dt)
        y_prev, pw_prev, pw, tmp = _solve_scratch(wsol, Pl, m, R)
        cl = np.empty((E, m, LANES), dtype=dt)
        bv = np.empty((E, Pl, LANES), dtype=dt)
        u0 = np.empty((DK, Pl, LANES), dtype=dt)
        hs = np.empty((steps.shape[1], LANES), dtype=dt)
        job = _claim_job(next_job)
        while job < n_jobs:
            scratch = SolveScratch(wsol, y_prev, pw_prev, pw, tmp, cl, bv, u0, hs)
            _solve_jobs(
                job,
                job + 1,
                factor,
                central,
                inputs,
                rhs,
                sizes,
                constants,
                columns,
                out,
                bad_input,
                scratch,
            )
            job = _claim_job(next_job)


@helper
def _solve_jobs(
    lo, hi, factor, central, inputs, rhs, sizes, constants, columns, out, bad_input, scratch
):
    """Jobs [lo, hi) of :func:`solve` on one worker's ``scratch`` (:class:`SolveScratch`)."""
    chol, rdiag, l1, l2 = factor
    coef, steps, rhs_eq, init = inputs
    g2, weights = constants.g2, constants.weights
    wsol, y_prev, pw_prev, pw, tmp, cl, bv, u0, hs = scratch
    N, T, m, P = out.shape
    R = g2.shape[0]
    S, K = sizes.n_init_steps, sizes.n_init_orders
    weq2, win2, ws2 = weights[0], weights[1], weights[2]
    raw = rhs.shape[0] > 0
    Q = (P + LANES - 1) // LANES
    for job in range(lo, hi):
        g, b0, nl, c0, nc = _job_lanes(job, columns, N, P, Q)
        if raw:
            _load_lanes(rhs, b0, nl, c0, nc, columns, wsol)
        else:
            bad = False
            for t in range(T):
                bad |= _load_step_rhs_inputs(
                    coef, rhs_eq, init, b0, nl, c0, nc, columns, t, S, cl, bv, u0
                )
                _rhs_step(cl, bv, u0, t, S, R, K, weq2, win2, wsol)
            if bad:
                bad_input[job] = 1
        if central:
            _central_solve_group(chol[g], rdiag[g], l1[g], l2[g], R, wsol)
        else:
            _load_step_sizes(steps, b0, nl, hs)  # checked when the factor was made
            _solve_group(chol[g], rdiag[g], hs, g2, ws2, wsol, y_prev, pw_prev, pw, tmp)
        _store_lanes(wsol, b0, nl, c0, nc, columns, out)


@helper
def _first_failed_steps(rdiag, b0, nl, failed_at):
    """``failed_at[b0 + l]`` = 1 + the first step whose pivot is NaN in lane l of one group's
    ``rdiag`` (T, m, W), 0 if none (a failed pivot is NaN from that step on)."""
    T, m, _ = rdiag.shape
    for l in range(nl):
        failed_at[b0 + l] = 0
        last_ok = True  # NaN propagates to every later factor: a clean last step is enough
        for i in range(m):
            last_ok &= not np.isnan(rdiag[T - 1, i, l])
        if last_ok:
            continue
        for t in range(T):
            hit = False
            for i in range(m):
                if np.isnan(rdiag[t, i, l]):
                    hit = True
            if hit:
                failed_at[b0 + l] = t + 1
                break


# ------------------------------------------------------------------ forward


@njit(parallel=True, **KERNEL_OPTIONS)
def forward(inputs, sizes, constants, factor, out, failed_at, bad_input, n_workers):
    """Assemble, factorize and solve (module docstring).

    Writes the factors, ``out`` (N, T, m, P), ``failed_at`` (N,) (1 + the first step with a
    failed pivot, 0 if none) and ``bad_input[g] = 1`` when group g met a non-finite input or
    a step <= 0. ``n_workers`` parallel jobs (at most the number of groups).
    """
    coef, steps, rhs_eq = inputs.coef, inputs.steps, inputs.rhs_eq
    chol = factor.chol
    E, m = coef.shape[2], coef.shape[3]
    P = rhs_eq.shape[3]
    T, D, K = sizes.n_steps, sizes.n_dims, sizes.n_init_orders
    R = m // D
    G = chol.shape[0]
    dt = chol.dtype
    TB = _chunk_steps(T, E * m + E * P)
    next_job = np.zeros(1, dtype=np.int64)  # the first job no worker has claimed
    for _worker in prange(n_workers):
        cl = np.empty((TB, E, m, LANES), dtype=dt)
        work = np.empty((m, m, LANES), dtype=dt)
        y_prev, pw_prev, pw, tmp = _solve_scratch(work, P, m, R)
        pw_cur = np.empty((R, LANES), dtype=dt)
        acc = np.empty(LANES, dtype=dt)
        bv = np.empty((TB, E, P, LANES), dtype=dt)
        u0 = np.empty((D * K, P, LANES), dtype=dt)
        wsol = np.empty((T, P, m, LANES), dtype=dt)
        y_cpl = np.empty((m, m, LANES), dtype=dt)
        hs = np.empty((steps.shape[1], LANES), dtype=dt)
        floor = np.empty((m, LANES), dtype=dt)
        job = _claim_job(next_job)
        while job < G:
            scratch = ForwardScratch(
                cl, work, y_prev, pw_prev, pw, tmp, pw_cur, acc, bv, u0, wsol, y_cpl, hs, floor
            )
            _forward_groups(
                job, job + 1, inputs, sizes, constants, factor, out, failed_at, bad_input, scratch
            )
            job = _claim_job(next_job)


@helper
def _forward_groups(lo, hi, inputs, sizes, constants, factor, out, failed_at, bad_input, scratch):
    """Groups [lo, hi) of :func:`forward` on one worker's ``scratch`` (:class:`ForwardScratch`):
    ``cl_chunk`` (TB, E, m, W) and ``bv_chunk`` (TB, E, P, W) hold chunks of TB steps
    of the coefficients and right-hand sides in lanes, ``hs`` (Th, W) the step sizes."""
    coef, steps, rhs_eq, init = inputs
    n_steps, n_dims, n_init_steps, n_init_orders = sizes
    g0, g1, g2, weights, pivot_floor = constants
    chol, rdiag = factor.chol, factor.rdiag
    (
        cl_chunk,
        work,
        y_prev,
        pw_prev,
        pw,
        tmp,
        pw_cur,
        acc,
        bv_chunk,
        u0,
        wsol,
        y_cpl,
        hs,
        floor,
    ) = scratch
    N, Tc, E, m = coef.shape
    Th = steps.shape[1]
    Tb, P = rhs_eq.shape[1], rhs_eq.shape[3]
    Su = init.shape[1]
    T, D, S, K = n_steps, n_dims, n_init_steps, n_init_orders
    R = m // D
    TB = cl_chunk.shape[0]
    weq2, win2, ws2 = weights[0], weights[1], weights[2]
    for g in range(lo, hi):
        b0 = g * LANES
        nl = min(LANES, N - b0)
        bad = _load_step_sizes(steps, b0, nl, hs)
        for t in range(T):
            # ---- inputs of step t into lanes (a chunk of steps at a time); powers h_t^k
            if t % TB == 0:
                bad |= _load_chunk(coef, b0, nl, t, min(t + TB, T), cl_chunk)
                bad |= _load_chunk(rhs_eq, b0, nl, t, min(t + TB, T), bv_chunk)
            cl = cl_chunk[t % TB if Tc > 1 else 0]
            bv = bv_chunk[t % TB if Tb > 1 else 0]
            if t < S:
                su = t if Su > 1 else 0
                for l in range(LANES):
                    bl = b0 + min(l, nl - 1)
                    for i in range(D * K):
                        for p in range(P):
                            v = init[bl, su, i, p]
                            bad |= not np.isfinite(v)
                            u0[i, p, l] = v
            if t < T - 1:
                _load_powers(hs, t if Th > 1 else 0, pw_cur)
            # ---- M_t (lower triangle): equation rows, initial rows, Taylor rows of t-1, t
            for i in range(m):
                for j in range(i + 1):
                    wij = work[i, j]
                    _fill(wij, 0.0)
                    for e in range(E):
                        _add_product(wij, cl[e, i], cl[e, j])
                    _scale(wij, weq2)
            if t < S:
                for d in range(D):
                    for k in range(K):
                        _add_scalar(work[d * R + k, d * R + k], win2)
            for d in range(D):
                o = d * R
                for i in range(R):
                    for j in range(i + 1):
                        if t < T - 1:
                            _add_scaled_product(
                                work[o + i, o + j], ws2 * g0[i, j], pw_cur[i], pw_cur[j]
                            )
                        if t > 0:
                            _add_scaled_product(
                                work[o + i, o + j], ws2 * g1[i, j], pw_prev[i], pw_prev[j]
                            )
            # ---- pivot floors: pivot_floor * M_t[j, j] (before the Schur complement)
            for j in range(m):
                _set_scaled(floor[j], pivot_floor, work[j, j])
            # ---- Schur complement D_t = M_t - Y_{t-1}^T Y_{t-1}
            if t > 0:
                y = y_cpl
                for i in range(m):
                    for j in range(i + 1):
                        v = _value_of(work[i, j])
                        for k in range(m):
                            v = _minus_products(v, y[k, i], y[k, j])
                        _store_value(work[i, j], v)
            # ---- Cholesky D_t = L L^T
            lc = chol[g, t]
            rd = rdiag[g, t]
            for j in range(m):
                v = _value_of(work[j, j])
                for k in range(j):
                    v = _minus_products(v, lc[_tri(j, k)], lc[_tri(j, k)])
                _store_value(acc, v)
                _reciprocal_sqrt_pivot(rd[j], acc, floor[j])
                for i in range(j + 1, m):
                    v = _value_of(work[i, j])
                    for k in range(j):
                        v = _minus_products(v, lc[_tri(i, k)], lc[_tri(j, k)])
                    _store_value(lc[_tri(i, j)], _value_times(v, rd[j]))
            # ---- right-hand side r_t (the operations of _rhs_step, written out: a call
            # here costs ~15 % of the kernel), forward sweep (z_t, y_t = D_t^{-1} z_t)
            for p in range(P):
                for i in range(m):
                    wi = wsol[t, p, i]
                    _fill(wi, 0.0)
                    for e in range(E):
                        _add_product(wi, cl[e, i], bv[e, p])
                    _scale(wi, weq2)
                if t < S:
                    for d in range(D):
                        for k in range(K):
                            _add_scaled(wsol[t, p, d * R + k], win2, u0[d * K + k, p])
            _forward_sweep_step(lc, rd, wsol, t, y_prev, pw_prev, g2, ws2, tmp)
            # ---- Y_t = L_t^{-1} M_{t+1,t}^T for the next Schur complement (row j of
            # M_{t+1,t} lives in state j // R)
            if t < T - 1:
                y = y_cpl
                for j in range(m):
                    o = (j // R) * R
                    a = j - o
                    for i in range(o):
                        _fill(y[i, j], 0.0)
                    for i in range(o, m):
                        yij = y[i, j]
                        if i < o + R:
                            _set_scaled_product(yij, ws2 * g2[a, i - o], pw_cur[a], pw_cur[i - o])
                        else:
                            _fill(yij, 0.0)
                        v = _value_of(yij)
                        for k in range(o, i):
                            v = _minus_products(v, lc[_tri(i, k)], y[k, j])
                        _store_value(yij, _value_times(v, rd[i]))
                for k in range(R):
                    _copy(pw_prev[k], pw_cur[k])
        _back_sweep(chol[g], rdiag[g], hs, g2, ws2, wsol, pw, tmp)
        _store_lanes(wsol, b0, nl, 0, P, False, out)
        _first_failed_steps(rdiag[g], b0, nl, failed_at)
        if bad:
            bad_input[g] = 1


# ------------------------------------------------------------------ central smoothness
#
# With central rows the normal matrix is block pentadiagonal (M_{t+2,t} holds -w_s^2 a^2 at the
# order R-2 of every state, a = s^(R-3), s = h_t + h_{t+1}). Its block Cholesky factor L has
# three block diagonals,
#
#     L_{t,t-2} = M_{t,t-2} L_{t-2,t-2}^{-T}
#     L_{t,t-1} = (M_{t,t-1} - L_{t,t-2} L_{t-1,t-2}^T) L_{t-1,t-1}^{-T}
#     L_{t,t} L_{t,t}^T = M_t - L_{t,t-1} L_{t,t-1}^T - L_{t,t-2} L_{t,t-2}^T,
#
# and the substitutions are w_t = L_tt^{-1} (r_t - L_{t,t-1} w_{t-1} - L_{t,t-2} w_{t-2}),
# x_t = L_tt^{-T} (w_t - L_{t+1,t}^T x_{t+1} - L_{t+2,t}^T x_{t+2}). The off-diagonal blocks carry
# Schur corrections, so they are stored (they cannot be rebuilt from the steps as in the
# tridiagonal case): ``l1`` (G, T, m, m, W), l1[t] = L_{t+1,t} (t < T-1), and ``l2``
# (G, T, D, m, W), l2[t][d] = row (d, R-2) of L_{t,t-2} (t >= 2; its only non-zero rows).


@inline_helper
def _lower_solve(lc, rd, v):
    """In place: v (m, W) = L^{-1} v (``lc`` packed strictly lower triangle, ``rd`` reciprocals
    of the diagonal)."""
    m = rd.shape[0]
    for i in range(m):
        acc = _value_of(v[i])
        for k in range(i):
            acc = _minus_products(acc, lc[_tri(i, k)], v[k])
        _store_value(v[i], _value_times(acc, rd[i]))


@inline_helper
def _upper_solve(lc, rd, v):
    """In place: v (m, W) = L^{-T} v."""
    m = rd.shape[0]
    for i in range(m - 1, -1, -1):
        acc = _value_of(v[i])
        for k in range(i + 1, m):
            acc = _minus_products(acc, lc[_tri(k, i)], v[k])
        _store_value(v[i], _value_times(acc, rd[i]))


@helper
def _central_forward_step(lc, rd, l1_prev, l2_t, t, R, wsol):
    """w_t = L_tt^{-1} (r_t - L_{t,t-1} w_{t-1} - L_{t,t-2} w_{t-2}) in place of r_t in
    ``wsol[t]`` (T, P, m, W), for every column."""
    P, m = wsol.shape[1], wsol.shape[2]
    D = m // R
    for p in range(P):
        zt = wsol[t, p]
        if t > 0:
            w1 = wsol[t - 1, p]
            for i in range(m):
                for k in range(m):
                    _subtract_product(zt[i], l1_prev[i, k], w1[k])
        if t > 1:
            w2 = wsol[t - 2, p]
            for d in range(D):
                row = d * R + R - 2
                for k in range(m):
                    _subtract_product(zt[row], l2_t[d, k], w2[k])
        _lower_solve(lc, rd, zt)


@helper
def _central_back_sweep(chol, rdiag, l1, l2, R, wsol):
    """In place: ``wsol`` (T, P, m, W) holds w_t on entry and x_t on exit."""
    T, P, m, _ = wsol.shape
    D = m // R
    for t in range(T - 1, -1, -1):
        for p in range(P):
            xt = wsol[t, p]
            if t < T - 1:
                x1 = wsol[t + 1, p]
                for i in range(m):
                    for k in range(m):
                        _subtract_product(xt[k], l1[t, i, k], x1[i])
            if t < T - 2:
                x2 = wsol[t + 2, p]
                for d in range(D):
                    row = d * R + R - 2
                    for k in range(m):
                        _subtract_product(xt[k], l2[t + 2, d, k], x2[row])
            _upper_solve(chol[t], rdiag[t], xt)


@helper
def _central_solve_group(chol, rdiag, l1, l2, R, wsol):
    """In place: ``wsol`` (T, P, m, W) holds right-hand sides on entry, M^{-1} of them on exit,
    with one group's central factors (``chol`` (T, ., W), ``rdiag``, ``l1``, ``l2``)."""
    T = wsol.shape[0]
    for t in range(T):
        _central_forward_step(chol[t], rdiag[t], l1[t - 1 if t > 0 else 0], l2[t], t, R, wsol)
    _central_back_sweep(chol, rdiag, l1, l2, R, wsol)


@helper
def _central_scalars(steps, b0, nl, q, R, ca, cb):
    """ca, cb (W,): a = s^(R-3), b = s^(R-2), s = h_q + h_{q+1}, of central row q per lane."""
    Th = steps.shape[1]
    for l in range(LANES):
        bl = b0 + min(l, nl - 1)
        s = steps[bl, q if Th > 1 else 0] + steps[bl, q + 1 if Th > 1 else 0]
        ca[l] = s ** (R - 3)
        cb[l] = s ** (R - 2)


@njit(parallel=True, **KERNEL_OPTIONS)
def forward_central(inputs, sizes, constants, factor, out, failed_at, bad_input, n_workers):
    """:func:`forward` with central smoothness rows (block pentadiagonal M): assemble, factorize
    (``chol``, ``rdiag``, ``l1``, ``l2``) and solve. ``g0``, ``g1``, ``g2``: the Taylor Gram
    matrices of the orders 0..R-2 (the top order has no Taylor rows). Outputs as in
    :func:`forward`."""
    coef, rhs_eq = inputs.coef, inputs.rhs_eq
    chol = factor.chol
    E, m = coef.shape[2], coef.shape[3]
    P = rhs_eq.shape[3]
    T, D, K = sizes.n_steps, sizes.n_dims, sizes.n_init_orders
    R = m // D
    G = chol.shape[0]
    dt = chol.dtype
    next_job = np.zeros(1, dtype=np.int64)  # the first job no worker has claimed
    for _worker in prange(n_workers):
        cl = np.empty((E, m, LANES), dtype=dt)
        work = np.empty((m, m, LANES), dtype=dt)
        cpl = np.empty((m, m, LANES), dtype=dt)
        vec = np.empty((m, LANES), dtype=dt)
        pw_cur = np.empty((R, LANES), dtype=dt)
        pw_prev = np.empty((R, LANES), dtype=dt)
        ca = np.zeros((3, LANES), dtype=dt)  # a of central rows t-2, t-1, t (index q % 3)
        cb = np.zeros((3, LANES), dtype=dt)
        acc = np.empty(LANES, dtype=dt)
        bv = np.empty((E, P, LANES), dtype=dt)
        u0 = np.empty((D * K, P, LANES), dtype=dt)
        wsol = np.empty((T, P, m, LANES), dtype=dt)
        floor = np.empty((m, LANES), dtype=dt)
        job = _claim_job(next_job)
        while job < G:
            scratch = CentralScratch(
                cl, work, cpl, vec, pw_cur, pw_prev, ca, cb, acc, bv, u0, wsol, floor
            )
            _forward_central_groups(
                job, job + 1, inputs, sizes, constants, factor, out, failed_at, bad_input, scratch
            )
            job = _claim_job(next_job)


@helper
def _forward_central_groups(
    lo, hi, inputs, sizes, constants, factor, out, failed_at, bad_input, scratch
):
    """Groups [lo, hi) of :func:`forward_central` on one worker's ``scratch``
    (:class:`CentralScratch`)."""
    coef, steps, rhs_eq, init = inputs
    n_steps, n_dims, n_init_steps, n_init_orders = sizes
    g0, g1, g2, weights, pivot_floor = constants
    chol, rdiag, l1, l2 = factor
    cl, work, cpl, vec, pw_cur, pw_prev, ca, cb, acc, bv, u0, wsol, floor = scratch
    N, Tc, E, m = coef.shape
    Th = steps.shape[1]
    Tb, P = rhs_eq.shape[1], rhs_eq.shape[3]
    Su = init.shape[1]
    T, D, S, K = n_steps, n_dims, n_init_steps, n_init_orders
    R = m // D
    i2, i1 = R - 2, R - 1
    weq2, win2, ws2 = weights[0], weights[1], weights[2]
    for g in range(lo, hi):
        b0 = g * LANES
        nl = min(LANES, N - b0)
        bad = False
        for t in range(T):
            # ---- inputs of step t into lanes; powers h_t^k; central row t's a, b
            tc = t if Tc > 1 else 0
            tb = t if Tb > 1 else 0
            for l in range(LANES):
                bl = b0 + min(l, nl - 1)
                for e in range(E):
                    for i in range(m):
                        v = coef[bl, tc, e, i]
                        bad |= not np.isfinite(v)
                        cl[e, i, l] = v
                    for p in range(P):
                        v = rhs_eq[bl, tb, e, p]
                        bad |= not np.isfinite(v)
                        bv[e, p, l] = v
                if t < S:
                    su = t if Su > 1 else 0
                    for i in range(D * K):
                        for p in range(P):
                            v = init[bl, su, i, p]
                            bad |= not np.isfinite(v)
                            u0[i, p, l] = v
                if t < T - 1:
                    hv = steps[bl, t if Th > 1 else 0]
                    bad |= not (hv > 0.0 and hv < np.inf)
                    pw_cur[0, l] = 1.0
                    for k in range(1, R):
                        pw_cur[k, l] = pw_cur[k - 1, l] * hv
            if t < T - 2:
                _central_scalars(steps, b0, nl, t, R, ca[t % 3], cb[t % 3])
            # ---- M_t (lower triangle)
            for i in range(m):
                for j in range(i + 1):
                    wij = work[i, j]
                    _fill(wij, 0.0)
                    for e in range(E):
                        _add_product(wij, cl[e, i], cl[e, j])
                    _scale(wij, weq2)
            if t < S:
                for d in range(D):
                    for k in range(K):
                        _add_scalar(work[d * R + k, d * R + k], win2)
            for d in range(D):
                o = d * R
                for i in range(R):
                    for j in range(i + 1):
                        if t < T - 1:
                            _add_scaled_product(
                                work[o + i, o + j], ws2 * g0[i, j], pw_cur[i], pw_cur[j]
                            )
                        if t > 0:
                            _add_scaled_product(
                                work[o + i, o + j], ws2 * g1[i, j], pw_prev[i], pw_prev[j]
                            )
                if t < T - 2:  # central row t: a^2 on (t, R-2)
                    _add_scaled_product(work[o + i2, o + i2], ws2, ca[t % 3], ca[t % 3])
                if 1 <= t <= T - 2:  # central row t-1: b^2 on (t, R-1)
                    _add_scaled_product(work[o + i1, o + i1], ws2, cb[(t - 1) % 3], cb[(t - 1) % 3])
                if t >= 2:  # central row t-2: a^2 on (t, R-2)
                    _add_scaled_product(work[o + i2, o + i2], ws2, ca[(t - 2) % 3], ca[(t - 2) % 3])
            # ---- pivot floors: pivot_floor * M_t[j, j] (before the Schur complement)
            for j in range(m):
                _set_scaled(floor[j], pivot_floor, work[j, j])
            # ---- D_t = M_t - L_{t,t-1} L_{t,t-1}^T - L_{t,t-2} L_{t,t-2}^T
            if t > 0:
                lp = l1[g, t - 1]
                for i in range(m):
                    for j in range(i + 1):
                        for k in range(m):
                            _subtract_product(work[i, j], lp[i, k], lp[j, k])
            if t > 1:
                lq = l2[g, t]
                for d in range(D):
                    for d2 in range(d + 1):
                        for k in range(m):
                            _subtract_product(work[d * R + i2, d2 * R + i2], lq[d, k], lq[d2, k])
            # ---- Cholesky D_t = L L^T
            lc = chol[g, t]
            rd = rdiag[g, t]
            for j in range(m):
                v = _value_of(work[j, j])
                for k in range(j):
                    v = _minus_products(v, lc[_tri(j, k)], lc[_tri(j, k)])
                _store_value(acc, v)
                _reciprocal_sqrt_pivot(rd[j], acc, floor[j])
                for i in range(j + 1, m):
                    v = _value_of(work[i, j])
                    for k in range(j):
                        v = _minus_products(v, lc[_tri(i, k)], lc[_tri(j, k)])
                    _store_value(lc[_tri(i, j)], _value_times(v, rd[j]))
            # ---- right-hand side r_t (as in forward), forward substitution
            for p in range(P):
                for i in range(m):
                    wi = wsol[t, p, i]
                    _fill(wi, 0.0)
                    for e in range(E):
                        _add_product(wi, cl[e, i], bv[e, p])
                    _scale(wi, weq2)
                if t < S:
                    for d in range(D):
                        for k in range(K):
                            _add_scaled(wsol[t, p, d * R + k], win2, u0[d * K + k, p])
            _central_forward_step(lc, rd, l1[g, t - 1 if t > 0 else 0], l2[g, t], t, R, wsol)
            if t < T - 1:
                # ---- L_{t+1,t-1} = M_{t+1,t-1} L_{t-1,t-1}^{-T}: row (d, R-2) is
                # -w_s^2 a_{t-1}^2 (L_{t-1,t-1}^{-1} e_{(d, R-2)})^T
                nx = l2[g, t + 1]
                if t >= 1:
                    for d in range(D):
                        for k in range(m):
                            _fill(vec[k], 0.0)
                        _fill(vec[d * R + i2], 1.0)
                        _lower_solve(chol[g, t - 1], rdiag[g, t - 1], vec)
                        for k in range(m):
                            _set_scaled_product(nx[d, k], -ws2, ca[(t - 1) % 3], ca[(t - 1) % 3])
                            _multiply(nx[d, k], vec[k])
                # ---- A = M_{t+1,t} - L_{t+1,t-1} L_{t,t-1}^T (rows: step t+1)
                for i in range(m):
                    for j in range(m):
                        _fill(cpl[i, j], 0.0)
                for d in range(D):
                    o = d * R
                    for i in range(R):
                        for j in range(R):
                            _set_scaled_product(
                                cpl[o + i, o + j], ws2 * g2[i, j], pw_cur[i], pw_cur[j]
                            )
                    if t < T - 2:  # central row t: +a b at ((t+1, R-1), (t, R-2))
                        _add_scaled_product(cpl[o + i1, o + i2], ws2, ca[t % 3], cb[t % 3])
                    if t >= 1:  # central row t-1: -a b at ((t+1, R-2), (t, R-1))
                        _add_scaled_product(
                            cpl[o + i2, o + i1], -ws2, ca[(t - 1) % 3], cb[(t - 1) % 3]
                        )
                if t >= 1:
                    lp = l1[g, t - 1]
                    for d in range(D):
                        row = d * R + i2
                        for j in range(m):
                            for k in range(m):
                                _subtract_product(cpl[row, j], nx[d, k], lp[j, k])
                # ---- L_{t+1,t} = A L_tt^{-T}: row i is (L_tt^{-1} A[i]^T)^T
                lo1 = l1[g, t]
                for i in range(m):
                    for k in range(m):
                        _copy(lo1[i, k], cpl[i, k])
                    _lower_solve(lc, rd, lo1[i])
                for k in range(R):
                    _copy(pw_prev[k], pw_cur[k])
        _central_back_sweep(chol[g], rdiag[g], l1[g], l2[g], R, wsol)
        _store_lanes(wsol, b0, nl, 0, P, False, out)
        _first_failed_steps(rdiag[g], b0, nl, failed_at)
        if bad:
            bad_input[g] = 1


# ------------------------------------------------------------------ backward


@njit(parallel=True, **KERNEL_OPTIONS)
def backward(grad_out, x, inputs, sizes, constants, factor, central, columns, grads, n_workers):
    """Gradients of all four inputs from g = ``grad_out`` and the solution ``x`` (N, T, m, P).

    lambda = M^{-1} g with the stored factors, then (docs/solver.md, "Backward pass")
    dl/dM_t = -sym(lambda_t x_t^T), dl/dM_{t+1,t} = -(lambda_{t+1} x_t^T + x_{t+1} lambda_t^T),
    dl/dr = lambda, carried through the assembly (summed over the P columns):

    - r_t = w_eq^2 C_t^T b_t + w_in^2 u0_t, M_t gets w_eq^2 C_t^T C_t:
      dl/dC_t[e, j] = w_eq^2 sum_p ((b_t[e] - C_t[e].x_t) lambda_t[j] - (C_t[e].lambda_t) x_t[j]),
      dl/db_t[e] = w_eq^2 C_t[e] . lambda_t,  dl/du0_t = w_in^2 lambda_t (orders k < K);
    - interval t adds w_s^2 e_i e_j (G0 to M_t, G1 to M_{t+1}, G2 to M_{t+1,t}), e_k = h_t^k;
    - with ``central`` rows (factors of :func:`forward_central`, G's of orders 0..R-2), central
      row q adds w_s^2 times a^2 to M_q, M_{q+2} and -a^2 to M_{q+2,q} at order R-2, b^2 to
      M_{q+1} at order R-1, a b to M_{q+1,q} and -a b to M_{q+2,q+1} at orders (R-1, R-2) and
      (R-2, R-1): a = s^(R-3), b = s^(R-2) of s = h_q + h_{q+1}, so dl/ds reaches h_q and h_{q+1}.

    ``columns``: the lane layout of the jobs (:func:`_job_lanes`; the factors as in
    :func:`solve`). Writes ``grad_rhs_eq`` (N, Tb, E, P) and ``grad_init`` (N, Su, D*K, P), and
    ``grad_coef`` (J, Tc, E, m), ``grad_steps`` (J, Th): per system (J = N) when lanes are
    systems, per job (J = N * ceil(P / LANES), job n * ceil(P / LANES) + q for columns
    q * LANES ...) when lanes are columns, to be summed over each system's jobs. A size-1 step
    axis receives the sum over steps.
    """
    coef, steps, rhs_eq = inputs.coef, inputs.steps, inputs.rhs_eq
    chol = factor.chol
    N, T, m, P = x.shape
    Tc, E = coef.shape[1], coef.shape[2]
    Th, Tb, Su = steps.shape[1], rhs_eq.shape[1], grads.init.shape[1]
    D, K = sizes.n_dims, sizes.n_init_orders
    R = m // D
    Q = (P + LANES - 1) // LANES
    n_jobs = N * Q if columns else chol.shape[0]
    Pl = 1 if columns else P
    dt = chol.dtype
    TB = _chunk_steps(T, E * m + E * Pl)
    next_job = np.zeros(1, dtype=np.int64)  # the first job no worker has claimed
    for _worker in prange(n_workers):
        lam = np.empty((T, Pl, m, LANES), dtype=dt)
        xs = np.empty((T, Pl, m, LANES), dtype=dt)
        cl = np.empty((TB, E, m, LANES), dtype=dt)
        bv = np.empty((TB, E, Pl, LANES), dtype=dt)
        hs = np.empty((Th, LANES), dtype=dt)
        gc = np.empty((Tc, E, m, LANES), dtype=dt)
        gs = np.empty((Th, LANES), dtype=dt)
        gb = np.empty((Tb, E, Pl, LANES), dtype=dt)
        gi = np.empty((Su, D * K, Pl, LANES), dtype=dt)
        y_prev, pw_prev, pw, tmp = _solve_scratch(lam, Pl, m, R)
        dpw = np.empty((R, LANES), dtype=dt)
        vectors = np.empty((5, LANES), dtype=dt)
        job = _claim_job(next_job)
        while job < n_jobs:
            scratch = BackwardScratch(
                lam, xs, cl, bv, gc, gs, gb, gi, y_prev, pw_prev, pw, tmp, dpw, vectors, hs
            )
            _backward_jobs(
                job,
                job + 1,
                grad_out,
                x,
                inputs,
                sizes,
                constants,
                factor,
                central,
                columns,
                grads,
                scratch,
            )
            job = _claim_job(next_job)


@helper
def _backward_jobs(
    lo, hi, grad_out, x, inputs, sizes, constants, factor, central, columns, grads, scratch
):
    """Jobs [lo, hi) of :func:`backward` on one worker's ``scratch`` (:class:`BackwardScratch`;
    the chunks and step sizes in lanes as in :func:`_forward_groups`, ``vectors`` (5, W))."""
    coef, steps, rhs_eq, _ = inputs
    n_dims, n_init_steps, n_init_orders = sizes.n_dims, sizes.n_init_steps, sizes.n_init_orders
    g0, g1, g2, weights = constants.g0, constants.g1, constants.g2, constants.weights
    chol, rdiag, l1, l2 = factor
    grad_coef, grad_steps, grad_rhs_eq, grad_init = grads
    (lam, xs, cl_chunk, bv_chunk, gc, gs, gb, gi, y_prev, pw_prev, pw, tmp, dpw, vectors, hs) = (
        scratch
    )
    N, T, m, P = x.shape
    Tc, E = coef.shape[1], coef.shape[2]
    Th, Tb, Su = steps.shape[1], rhs_eq.shape[1], grad_init.shape[1]
    D, S, K = n_dims, n_init_steps, n_init_orders
    R = m // D
    weq2, win2, ws2 = weights[0], weights[1], weights[2]
    Q = (P + LANES - 1) // LANES
    Pl = 1 if columns else P
    TB = cl_chunk.shape[0]
    alpha, beta, q, sv, gh = vectors[0], vectors[1], vectors[2], vectors[3], vectors[4]
    for job in range(lo, hi):
        g, b0, nl, c0, nc = _job_lanes(job, columns, N, P, Q)
        # ---- lambda = M^{-1} g
        _load_lanes(grad_out, b0, nl, c0, nc, columns, lam)
        _load_step_sizes(steps, b0, nl, hs)
        if central:
            _central_solve_group(chol[g], rdiag[g], l1[g], l2[g], R, lam)
        else:
            _solve_group(chol[g], rdiag[g], hs, g2, ws2, lam, y_prev, pw_prev, pw, tmp)
        _load_lanes(x, b0, nl, c0, nc, columns, xs)
        gc[:] = 0.0
        gs[:] = 0.0
        gb[:] = 0.0
        gi[:] = 0.0
        for t in range(T):
            tc = t if Tc > 1 else 0
            tb = t if Tb > 1 else 0
            if t % TB == 0:  # the next chunk of coefficients and right-hand sides into lanes
                _load_chunk(coef, b0, nl, t, min(t + TB, T), cl_chunk)
                if columns:
                    _load_column_chunk(rhs_eq, b0, c0, nc, t, min(t + TB, T), bv_chunk)
                else:
                    _load_chunk(rhs_eq, b0, nl, t, min(t + TB, T), bv_chunk)
            cl = cl_chunk[t % TB if Tc > 1 else 0]
            bv = bv_chunk[t % TB if Tb > 1 else 0]
            # ---- equation rows: coefficients and right-hand sides
            for e in range(E):
                for p in range(Pl):
                    _fill(beta, 0.0)
                    _fill(alpha, 0.0)
                    vb, va = _value_of(beta), _value_of(alpha)
                    for i in range(m):
                        vb = _plus_products(vb, cl[e, i], lam[t, p, i])
                        va = _plus_products(va, cl[e, i], xs[t, p, i])
                    _store_value(beta, vb)
                    _store_value(alpha, va)
                    _subtract_from(alpha, bv[e, p])  # the equation residual b - C x
                    _add_scaled(gb[tb, e, p], weq2, beta)
                    for j in range(m):
                        _add_scaled_cross_difference(
                            gc[tc, e, j], weq2, alpha, lam[t, p, j], beta, xs[t, p, j]
                        )
            # ---- initial-value rows
            if t < S:
                su = t if Su > 1 else 0
                for d in range(D):
                    for k in range(K):
                        for p in range(Pl):
                            _add_scaled(gi[su, d * K + k, p], win2, lam[t, p, d * R + k])
            # ---- Taylor rows of interval t: d(e_i e_j)/dh = dpw_i pw_j + pw_i dpw_j
            if t < T - 1:
                th = t if Th > 1 else 0
                for l in range(LANES):
                    hv = hs[th, l]
                    pw[0, l] = 1.0
                    dpw[0, l] = 0.0
                    for k in range(1, R):
                        dpw[k, l] = k * pw[k - 1, l]
                        pw[k, l] = pw[k - 1, l] * hv
                _fill(gh, 0.0)
                vg = _value_of(gh)
                for d in range(D):
                    o = d * R
                    for i in range(R):
                        a = o + i
                        for j in range(R):
                            b = o + j
                            # G0, G1 and d(e_i e_j)/dh are symmetric in (i, j), so the
                            # two halves of -sym(lambda x^T) contribute equally to the sum
                            _fill(sv, 0.0)
                            vs = _value_of(sv)
                            c0_, c1_, c2_ = g0[i, j], g1[i, j], g2[i, j]
                            for p in range(Pl):
                                vs = _plus_scaled_products(vs, c0_, lam[t, p, a], xs[t, p, b])
                                vs = _plus_scaled_products(
                                    vs, c1_, lam[t + 1, p, a], xs[t + 1, p, b]
                                )
                                vs = _plus_scaled_products(vs, c2_, lam[t + 1, p, a], xs[t, p, b])
                                vs = _plus_scaled_products(vs, c2_, xs[t + 1, p, a], lam[t, p, b])
                            _store_value(sv, vs)
                            _fill(q, 0.0)
                            vq = _plus_products(_value_of(q), dpw[i], pw[j])
                            _store_value(q, _plus_products(vq, pw[i], dpw[j]))
                            vg = _minus_products(vg, q, sv)
                _store_value(gh, vg)
                _add_scaled(gs[th], ws2, gh)
            if central and t < T - 2:
                _central_step_gradient(lam, xs, steps, b0, nl, t, R, ws2, gs, sv)
        # ---- write the real lanes
        if columns:
            _store_column_gradients(
                gc, gs, gb, gi, job, b0, c0, nc, grad_coef, grad_steps, grad_rhs_eq, grad_init
            )
        else:
            _store_system_gradients(
                gc, gs, gb, gi, b0, nl, grad_coef, grad_steps, grad_rhs_eq, grad_init
            )


@helper
def _central_step_gradient(lam, xs, steps, b0, nl, q, R, ws2, gs, tmp):
    """gs (Th, W) += dl/dh of central row q ("Backward pass" block gradients, see :func:`backward`);
    ``tmp`` (W,) scratch."""
    Th, Pl, m = steps.shape[1], lam.shape[1], lam.shape[2]
    D = m // R
    i2, i1 = R - 2, R - 1
    for l in range(LANES):
        bl = b0 + min(l, nl - 1)
        th0 = q if Th > 1 else 0
        th1 = q + 1 if Th > 1 else 0
        s = steps[bl, th0] + steps[bl, th1]
        a = s ** (R - 3)
        b = s ** (R - 2)
        da = (R - 3) * s ** (R - 4) if R != 3 else 0.0
        db = (R - 2) * s ** (R - 3) if R != 2 else 0.0
        g_aa = 0.0
        g_bb = 0.0
        g_ab = 0.0
        for d in range(D):
            j2 = d * R + i2
            j1 = d * R + i1
            for p in range(Pl):
                l0, l1_, l2_ = lam[q, p, j2, l], lam[q + 1, p, j1, l], lam[q + 2, p, j2, l]
                x0, x1, x2 = xs[q, p, j2, l], xs[q + 1, p, j1, l], xs[q + 2, p, j2, l]
                # dl/dM_q, dl/dM_{q+2} (order R-2) and dl/dM_{q+2,q} (the -a^2 entry)
                g_aa += -(l0 * x0) - (l2_ * x2) + (l2_ * x0 + x2 * l0)
                g_bb += -(l1_ * x1)
                # dl/dM_{q+1,q} at minus dl/dM_{q+2,q+1} at
                g_ab += -(l1_ * xs[q, p, j2, l] + x1 * lam[q, p, j2, l])
                g_ab -= -(l2_ * xs[q + 1, p, j1, l] + x2 * lam[q + 1, p, j1, l])
        ds = ws2 * (2.0 * a * da * g_aa + 2.0 * b * db * g_bb + (da * b + a * db) * g_ab)
        tmp[l] = ds
    for l in range(LANES):
        gs[q if Th > 1 else 0, l] += tmp[l]
        gs[q + 1 if Th > 1 else 0, l] += tmp[l]


@helper
def _store_system_gradients(gc, gs, gb, gi, b0, nl, grad_coef, grad_steps, grad_rhs_eq, grad_init):
    """Lanes are systems: lane l's gradients belong to system b0 + l."""
    Tc, E, m, _ = gc.shape
    Th, Tb, Su = gs.shape[0], gb.shape[0], gi.shape[0]
    DK, P = gi.shape[1], gi.shape[2]
    for l in range(nl):
        bl = b0 + l
        for tc in range(Tc):
            for e in range(E):
                for j in range(m):
                    grad_coef[bl, tc, e, j] = gc[tc, e, j, l]
        for th in range(Th):
            grad_steps[bl, th] = gs[th, l]
        for tb in range(Tb):
            for e in range(E):
                for p in range(P):
                    grad_rhs_eq[bl, tb, e, p] = gb[tb, e, p, l]
        for su in range(Su):
            for i in range(DK):
                for p in range(P):
                    grad_init[bl, su, i, p] = gi[su, i, p, l]


@helper
def _store_column_gradients(
    gc, gs, gb, gi, job, n, c0, nc, grad_coef, grad_steps, grad_rhs_eq, grad_init
):
    """Lanes are columns c0 + l of system n: right-hand-side gradients per column, coefficient
    and step gradients summed over the lanes (in lane order) into the job's partial sums."""
    Tc, E, m, _ = gc.shape
    Th, Tb, Su, DK = gs.shape[0], gb.shape[0], gi.shape[0], gi.shape[1]
    for tc in range(Tc):
        for e in range(E):
            for j in range(m):
                acc = gc[tc, e, j, 0]
                for l in range(1, nc):
                    acc += gc[tc, e, j, l]
                grad_coef[job, tc, e, j] = acc
    for th in range(Th):
        acc = gs[th, 0]
        for l in range(1, nc):
            acc += gs[th, l]
        grad_steps[job, th] = acc
    for l in range(nc):
        for tb in range(Tb):
            for e in range(E):
                grad_rhs_eq[n, tb, e, c0 + l] = gb[tb, e, 0, l]
        for su in range(Su):
            for i in range(DK):
                grad_init[n, su, i, c0 + l] = gi[su, i, 0, l]


@njit(cache=True)
def sum_job_partials(partials, n_column_groups, out):
    """out[n] = sum over q of partials[n * n_column_groups + q] (in order of q): the gradients
    of :func:`backward` with lanes as columns, per system. ``partials`` (J, ...) flattened to
    (J, F), ``out`` (N, F)."""
    N, F = out.shape
    for n in range(N):
        for f in range(F):
            acc = partials[n * n_column_groups, f]
            for q in range(1, n_column_groups):
                acc += partials[n * n_column_groups + q, f]
            out[n, f] = acc
