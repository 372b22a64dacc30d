"""Numba kernels of the orthogonal (QR) least-squares solve on lanes (docs/solver.md, "The
orthogonal (QR) solve").

The torch side is :mod:`smnn.solver.qr_lanes`. Every kernel works on groups of W lanes side by
side, W a run-time value (8 or 32, the ``width`` argument): all innermost loops run over the
lanes, ``for l in range(W)``, the same compiled kernel serves every width, and each lane's
arithmetic is the same whatever the width (lanes never mix), so both widths give the same bits.
LLVM vectorises these loops with run-time checks that the arrays do not overlap (AVX-512:
``<8 x double>`` operations in the compiled helpers, checked with ``inspect_llvm``); the checks
and the short trip counts cost more per operation than the LDL^T engine's lane helpers, whose
width is spelled out at compile time.

A lane holds one *item*: a system n and one right-hand-side column p of it (item i = n * P + p),
or, in :func:`forward` without right-hand sides (factorize), one system.

Work per block is planned once per block type (:func:`supports`, a symbolic Householder QR of
the block's structure): each reflector acts only on the rows where its column can be nonzero and
only on the later columns those rows touch, so the zeros of the Taylor rows of other states
(D > 1) and of the carried triangle cost nothing.

Blocks. Without central rows a block is one step (G = 1, nb = n = D*R unknowns); with central
rows a block pairs steps 2k and 2k+1 (G = 2, nb = 2n; an odd T gets a padding step fixed to zero
by identity rows), so that every row touches one block and the next only. Block t stacks, per
lane, the rows [carried triangle C_t (nb rows) ; every row whose first step lies in block t]
(:func:`_build_rows`: equation rows, initial-value rows, Taylor rows of the intervals that start
in the block, central rows that start in it) over the columns [u_t (nb) | u_{t+1} (nb) | rhs].
Householder reflections triangularise the first 2nb columns (nb on the last block):
rows 0..nb-1 become [R_t | S_t | z_t], rows nb..2nb-1 the triangle C_{t+1} carried to the next
block with its right-hand side. Back substitution: u_t = R_t^{-1} (z_t - S_t u_{t+1}).

Rank check: block t fails when |R_t[j, j]| <= nb * eps * ||A[:, j]|| for some j (eps:
``wts[3]``, which :mod:`smnn.solver.qr_lanes` appends: 4 times the working type's, the torch
path's :data:`smnn.solver.qr.RANK_TOLERANCE_FACTOR`; the working type's where absent), with A[:, j]
the column of A of that unknown (the rows of blocks t-1 and t that touch it, before any
reflection), or when R_t[j, j] is not finite. (Against the stacked column, carried triangle
included, a direction that the rows leave undetermined was missed: its carried column is
rounding noise of the same size as R_t[j, j].) The threshold is relative to each column's own
norm, so scaling an unknown (the Taylor rows scale order k by h^k) does not change the verdict;
an unknown that no row constrains gives R_t[j, j] = 0 and fails. A failed block and every
later one get NaN on the diagonal of R_t, so the whole system comes back as NaN.

Arrays (C-contiguous, float32 or float64): inputs ``coef`` (N, Tc, E, m), ``steps`` (N, Th),
``rhs_eq`` (N, Tb, E, P), ``init`` (N, Su, D*K, P) (a size-1 step axis is shared by all steps);
``rs`` (Gr, TB, nb, 2nb, W): [R_t | S_t] of each block (R_t upper triangular), by groups of items
(``by_system`` False) or of systems; ``refl`` (Gs, TB, pmax, 2nb, W) and ``taus`` (Gs, TB, 2nb, W):
the Householder vectors (below the diagonal, unit diagonal implied) and factors kept by
:func:`forward` without right-hand sides, by groups of systems. u, gradients of u: (N, T, m, P).

Determinism: no fast-math licences, jobs claimed dynamically (:func:`_claim_job`) but each job's
results depend only on its own lanes, sums run in a fixed order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

from smnn.solver import lane_ops

_OPTS = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)
_helper = njit(**_OPTS)
# helpers that allocate nothing run without reference counting of their array arguments (each
# view or argument would cost an atomic increment and decrement); scratch comes from the caller
_leaf = njit(_nrt=False, **_OPTS)
_kernel = njit(parallel=True, **_OPTS)

# The hottest lane loops (reflections, substitutions) at the two widths the engine uses, spelled
# out lane by lane by lane_ops (one tuple assignment per operation, which LLVM's SLP vectoriser
# turns into vector instructions) from qr_lane_helpers_source.py; any other width runs the
# generic loops of this module. Both forms run the same operations in the same order per lane.
# At W = 8, float64, one reflection of 8 rows: 116 ns generic, 49 ns spelled out.
QR_OPS = {
    **lane_ops.LANE_OPS,
    "_subtract": lane_ops.LaneOp("dst, a", "dst[{i}] = dst[{i}] - a[{i}]", "dst -= a."),
    "_divide": lane_ops.LaneOp("dst, a, b", "dst[{i}] = a[{i}] / b[{i}]", "dst = a / b."),
    "_plus_scaled_differences": lane_ops.LaneOp(
        "acc, d, r, x, s, y",
        "acc[{i}] + d[{i}] * (r[{i}] * x[{i}] - s[{i}] * y[{i}])",
        "acc + d * (r * x - s * y) (a lane value).",
    ),
}
HELPERS_SOURCE = Path(__file__).with_name("qr_lane_helpers_source.py")
NARROW_WIDTH, WIDE_WIDTH = 8, 32
_narrow = lane_ops.kernel_module("smnn_qr_lane_helpers", HELPERS_SOURCE, NARROW_WIDTH, QR_OPS)
_wide = lane_ops.kernel_module("smnn_qr_lane_helpers", HELPERS_SOURCE, WIDE_WIDTH, QR_OPS)
_reflect_column_narrow, _reflect_column_wide = _narrow.reflect_column, _wide.reflect_column
_squared_norm_narrow, _squared_norm_wide = _narrow.squared_norm, _wide.squared_norm
_scale_rows_narrow, _scale_rows_wide = _narrow.scale_rows, _wide.scale_rows
_back_substitute_narrow, _back_substitute_wide = _narrow.back_substitute, _wide.back_substitute
_adjoint_sweep_narrow, _adjoint_sweep_wide = _narrow.adjoint_sweep, _wide.adjoint_sweep

# row kinds of _build_rows (the backward pass chains each kind to its input)
EQUATION, INITIAL, TAYLOR, CENTRAL, PADDING, CARRIED = 0, 1, 2, 3, 4, 5


@intrinsic
def _claim_job(typingctx, next_job):
    """The next job for the calling worker: ``next_job[0]`` incremented atomically (so each job
    goes to exactly one worker, whichever is free)."""
    if not (isinstance(next_job, types.Array) and next_job.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        one = context.get_constant(types.int64, 1)
        return builder.atomic_rmw("add", array.data, one, "monotonic")

    return types.int64(next_job), codegen


@_helper
def block_sizes(n_steps, n_dims, n_orders, n_eq, n_init_orders, central):
    """(G, nb, TB, pmax): steps per block, unknowns per block, blocks, most stacked rows."""
    G = 2 if central else 1
    n = n_dims * n_orders
    nT = n_orders - 1 if central else n_orders
    per_step = n_eq + n_dims * n_init_orders + 2 * n_dims * nT + (n_dims if central else 0)
    return G, G * n, (n_steps + G - 1) // G, G * n + G * per_step + n


@_leaf
def _lanes(g, W, n_items, P, sysl, coll):
    """Items of group g: system and column of each lane (lanes past the end repeat the last)."""
    for l in range(W):
        i = min(g * W + l, n_items - 1)
        sysl[l] = i // P
        coll[l] = i % P


@_leaf
def _ipow(x, k, one):
    """x ** k for an integer k (negative too), by repeated products (``one``: 1 in x's type)."""
    r = one
    for _ in range(abs(k)):
        r = r * x
    if k < 0:
        r = one / r
    return r


@_leaf
def _build_rows(
    t, q0, T, D, R, S, K, central, coef, steps, rhs_eq, init, sysl, coll, wts, finv,
    a, da, kind, aux, chk, with_rhs, with_deriv, rc, sv, ordv,
):  # fmt: skip
    """Write the rows of block t from row q0 on into ``a`` (pmax, 2nb+1, W) (columns: the block's
    unknowns, the next block's, the right-hand side at ``rc``); with ``with_deriv`` the
    derivative of each entry with respect to its step size into ``da`` (Taylor rows) or to
    h_s + h_{s+1} (central rows). Sets ``kind`` and ``aux`` (pmax, 2) per row (the same for
    every lane) and accumulates v * 0 of every input value read into ``chk`` (NaN when one was
    not finite); a step size <= 0 or not finite sets ``chk`` to NaN. Scratch: ``sv``
    (>= 2R + 3, W); ``ordv`` (R + 4,) holds 0, 1, 2, ... in the working type. Returns the row
    count."""
    W = sysl.shape[0]
    n = D * R
    G = 2 if central else 1
    nT = R - 1 if central else R
    Tc, Tb, Th, Su = coef.shape[1], rhs_eq.shape[1], steps.shape[1], init.shape[1]
    E = coef.shape[2]
    w_eq, w_in, w_s = wts[0], wts[1], wts[2]
    one = ordv[1]
    q = q0
    for gs in range(G):
        s = t * G + gs
        cs = gs * n
        if s >= T:
            # padding step of an odd T with central rows: its unknowns fixed to 0
            for j in range(n):
                _zero_row(a, q)
                for l in range(W):
                    a[q, cs + j, l] = 1
                kind[q, 0] = PADDING
                q += 1
            continue
        tc, tb = min(s, Tc - 1), min(s, Tb - 1)
        for e in range(E):
            _zero_row(a, q)
            for j in range(n):
                for l in range(W):
                    v = coef[sysl[l], tc, e, j]
                    chk[l] += v - v
                    a[q, cs + j, l] = w_eq * v
            if with_rhs:
                for l in range(W):
                    v = rhs_eq[sysl[l], tb, e, coll[l]]
                    chk[l] += v - v
                    a[q, rc, l] = w_eq * v
            kind[q, 0] = EQUATION
            aux[q, 0] = s
            aux[q, 1] = e
            q += 1
        if s < S:
            tu = min(s, Su - 1)
            for d in range(D):
                for k in range(K):
                    _zero_row(a, q)
                    for l in range(W):
                        a[q, cs + d * R + k, l] = w_in
                    if with_rhs:
                        for l in range(W):
                            v = init[sysl[l], tu, d * K + k, coll[l]]
                            chk[l] += v - v
                            a[q, rc, l] = w_in * v
                    kind[q, 0] = INITIAL
                    aux[q, 0] = s
                    aux[q, 1] = d * K + k
                    q += 1
        if s + 1 < T:
            th = min(s, Th - 1)
            for l in range(W):
                hv = steps[sysl[l], th]
                if not (hv > 0 and hv < np.inf):
                    chk[l] = np.nan
                sv[0, l] = hv
                sv[1, l] = one
                sv[R + 2, l] = one
            for o in range(1, R + 1):
                for l in range(W):
                    sv[1 + o, l] = sv[o, l] * sv[0, l]
                    sv[R + 2 + o, l] = -sv[R + 1 + o, l] * sv[0, l]
            c1 = cs + n
            for d in range(D):
                for k in range(nT):
                    # forward: sum_{o>=k} h^o/(o-k)! u[s,d,o] - h^k u[s+1,d,k]
                    _zero_row(a, q)
                    for o in range(k, R):
                        f = w_s * finv[o - k]
                        for l in range(W):
                            a[q, cs + d * R + o, l] = f * sv[1 + o, l]
                    for l in range(W):
                        a[q, c1 + d * R + k, l] = -w_s * sv[1 + k, l]
                    if with_deriv:
                        _zero_row(da, q)
                        for o in range(max(k, 1), R):
                            f = w_s * finv[o - k] * ordv[o]
                            for l in range(W):
                                da[q, cs + d * R + o, l] = f * sv[1 + o - 1, l]
                        if k > 0:
                            for l in range(W):
                                da[q, c1 + d * R + k, l] = -w_s * ordv[k] * sv[1 + k - 1, l]
                    kind[q, 0] = TAYLOR
                    aux[q, 0] = s
                    q += 1
                    # backward: sum_{o>=k} (-h)^o/(o-k)! u[s+1,d,o] - (-h)^k u[s,d,k]
                    _zero_row(a, q)
                    for o in range(k, R):
                        f = w_s * finv[o - k]
                        for l in range(W):
                            a[q, c1 + d * R + o, l] = f * sv[R + 2 + o, l]
                    for l in range(W):
                        a[q, cs + d * R + k, l] = -w_s * sv[R + 2 + k, l]
                    if with_deriv:
                        _zero_row(da, q)
                        for o in range(max(k, 1), R):
                            f = -w_s * finv[o - k] * ordv[o]
                            for l in range(W):
                                da[q, c1 + d * R + o, l] = f * sv[R + 2 + o - 1, l]
                        if k > 0:
                            for l in range(W):
                                da[q, cs + d * R + k, l] = w_s * ordv[k] * sv[R + 2 + k - 1, l]
                    kind[q, 0] = TAYLOR
                    aux[q, 0] = s
                    q += 1
        if central and s + 2 < T:
            # s^(R-3) u[s,d,R-2] + s^(R-2) u[s+1,d,R-1] - s^(R-3) u[s+2,d,R-2], s = h_s + h_{s+1}
            th0, th1 = min(s, Th - 1), min(s + 1, Th - 1)
            for d in range(D):
                _zero_row(a, q)
                if with_deriv:
                    _zero_row(da, q)
                for l in range(W):
                    sc = steps[sysl[l], th0] + steps[sysl[l], th1]
                    p3 = _ipow(sc, R - 3, one)
                    p2 = _ipow(sc, R - 2, one)
                    a[q, cs + d * R + R - 2, l] = w_s * p3
                    a[q, cs + n + d * R + R - 1, l] = w_s * p2
                    a[q, cs + 2 * n + d * R + R - 2, l] = -w_s * p3
                    if with_deriv:
                        p4 = _ipow(sc, R - 4, one)
                        c3, c2 = ordv[R] - ordv[3], ordv[R] - ordv[2]  # R - 3, R - 2
                        da[q, cs + d * R + R - 2, l] = w_s * c3 * p4
                        da[q, cs + n + d * R + R - 1, l] = w_s * c2 * p3
                        da[q, cs + 2 * n + d * R + R - 2, l] = -w_s * c3 * p4
                kind[q, 0] = CENTRAL
                aux[q, 0] = s
                q += 1
    return q


@_leaf
def _reflect_column(a, j, rows, nr, c, taus, s):
    """Apply the reflector stored in column j of ``a`` (unit at row j, entries on the rows
    ``rows[1:nr]``; factor ``taus[j]``) to column c (``s`` (W,) scratch)."""
    W = a.shape[2]
    if W == NARROW_WIDTH:
        _reflect_column_narrow(a, j, rows, nr, c, taus, s)
        return
    if W == WIDE_WIDTH:
        _reflect_column_wide(a, j, rows, nr, c, taus, s)
        return
    for l in range(W):
        s[l] = a[j, c, l]
    for ii in range(1, nr):
        i = rows[ii]
        for l in range(W):
            s[l] += a[i, j, l] * a[i, c, l]
    for l in range(W):
        s[l] *= taus[j, l]
        a[j, c, l] -= s[l]
    for ii in range(1, nr):
        i = rows[ii]
        for l in range(W):
            a[i, c, l] -= s[l] * a[i, j, l]


@_leaf
def _reflector(a, j, rows, nr, taus, sig, one):
    """Householder reflector of column j of ``a`` on the rows ``rows[:nr]`` (``rows[0]`` = j;
    the column is zero on every other row below j): writes beta = +-norm at (j, j), the vector
    (unit first entry implied) on the other rows and ``taus[j]`` (W,). A zero column gives
    tau = 0. ``sig`` (W,) scratch; ``one``: 1 in the working type."""
    W = a.shape[2]
    zero = one - one
    if W == NARROW_WIDTH:
        _squared_norm_narrow(a, j, rows, nr, sig)
    elif W == WIDE_WIDTH:
        _squared_norm_wide(a, j, rows, nr, sig)
    else:
        for l in range(W):
            sig[l] = zero
        for ii in range(1, nr):
            i = rows[ii]
            for l in range(W):
                sig[l] += a[i, j, l] * a[i, j, l]
    for l in range(W):
        alpha = a[j, j, l]
        nrm = np.sqrt(alpha * alpha + sig[l])
        beta = -nrm if alpha >= 0 else nrm
        ok = nrm > 0
        taus[j, l] = (beta - alpha) / beta if ok else zero
        sig[l] = one / (alpha - beta) if ok else zero  # reused: the scale of the vector
        a[j, j, l] = beta
    if W == NARROW_WIDTH:
        _scale_rows_narrow(a, j, rows, nr, sig)
        return
    if W == WIDE_WIDTH:
        _scale_rows_wide(a, j, rows, nr, sig)
        return
    for ii in range(1, nr):
        i = rows[ii]
        for l in range(W):
            a[i, j, l] *= sig[l]


@_leaf
def _triangularise(a, ty, sup, rc, taus, with_rhs, s, one):
    """Reflect the columns of ``a`` to upper triangular form, as planned by :func:`supports`
    for a block of type ``ty``: reflector j acts on the rows ``rsup[ty, j, :nrs[ty, j]]`` and
    is applied to the columns ``csup[ty, j, :ncs[ty, j]]`` and (``with_rhs``) to the
    right-hand side at ``rc``."""
    rsup, nrs, csup, ncs = sup
    for j in range(nrs.shape[1]):
        nr = nrs[ty, j]
        if nr == 0:
            break
        rows = rsup[ty, j]
        _reflector(a, j, rows, nr, taus, s, one)
        for cc in range(ncs[ty, j]):
            _reflect_column(a, j, rows, nr, csup[ty, j, cc], taus, s)
        if with_rhs:
            _reflect_column(a, j, rows, nr, rc, taus, s)


@_leaf
def _factor_group(
    g, coef, steps, rhs_eq, init, T, D, S, K, central, wts, finv, with_rhs, btype, sup,
    rs, refl, taus_out, failed_at, bad_input, out,
    a, da, kind, aux, chk, taus, cn2, carried, dead, wsol, ux, sysl, coll, sg, sl, sv, ordv,
):  # fmt: skip
    """One group of :func:`forward` (see there)."""
    W = sysl.shape[0]
    m = coef.shape[3]
    R = m // D
    P = rhs_eq.shape[3] if with_rhs else 1
    n_items = coef.shape[0] * P
    G, nb, TB, pmax = block_sizes(T, D, R, coef.shape[2], K, central)
    n = D * R
    rc = 2 * nb
    dt = a.dtype
    # the rank check's eps: the working type's, or wts[3] where given (qr_lanes._Sizes.rank_eps)
    eps = wts[3] if wts.shape[0] > 3 else np.finfo(dt).eps
    store = refl.shape[0] > 0
    _lanes(g, W, n_items, P, sysl, coll)
    for l in range(W):
        chk[l] = 0
        dead[l] = 0
    for i in range(nb):
        for j in range(nb + 1):
            for l in range(W):
                carried[i, j, l] = 0
    for t in range(TB):
        _load_carried(a, carried, nb, rc)  # carried triangle (zero at t = 0)
        q = _build_rows(
            t, nb, T, D, R, S, K, central, coef, steps, rhs_eq, init, sysl, coll, wts, finv,
            a, da, kind, aux, chk, with_rhs, False, rc, sv, ordv,
        )  # fmt: skip
        ncx = nb if t == TB - 1 else 2 * nb
        # squared norms of the columns of A on u_t: rows of the previous block (on its u_{t+1},
        # kept in cn2[nb:]) and this block's rows (not the carried triangle, whose column of a
        # dependent direction is rounding noise)
        _column_norms(a, cn2, nb, q, t == 0)
        _triangularise(a, btype[t], sup, rc, taus, with_rhs, sv[0], ordv[1])
        # rank check, then R_t, S_t (NaN diagonal from a failed block on)
        for j in range(nb):
            for l in range(W):
                d = a[j, j, l]
                bad = not (abs(d) > nb * eps * np.sqrt(cn2[j, l]) and abs(d) < np.inf)
                if bad and dead[l] == 0:
                    dead[l] = t + 1
        _store_block(rs, g, t, a, nb, rc, wsol, with_rhs)
        for i in range(nb):
            for l in range(W):
                if dead[l] > 0:
                    rs[g, t, i, i, l] = np.nan
        if store:
            for i in range(q):
                for j in range(ncx):
                    for l in range(W):
                        refl[g, t, i, j, l] = a[i, j, l] if i > j else 0
            for j in range(ncx):
                for l in range(W):
                    taus_out[g, t, j, l] = taus[j, l]
        if t < TB - 1:
            _save_carried(carried, a, nb, rc)
    for l in range(W):
        if g * W + l < n_items:
            failed_at[g * W + l] = dead[l]
        if not (chk[l] == 0):
            bad_input[g] = 1
    if with_rhs:
        _sources(g, W, False, W, sysl, sg, sl)
        _back_substitute(rs, sg, sl, wsol, ux, TB, sv[0])
        _write_solution(out, ux, g, T, n, n_items, P, sysl, coll)


@_leaf
def _back_substitute(rs, sg, sl, wsol, ux, TB, acc):
    """ux (TB, nb, W) = the solution of the block bidiagonal [R_t | S_t] system with right-hand
    sides ``wsol`` (TB, nb, W); lane l reads ``rs[sg[l], :, :, :, sl[l]]``."""
    W = ux.shape[2]
    nb = ux.shape[1]
    g = _contiguous_source(sg, sl, rs.shape[4])
    if g >= 0 and W == NARROW_WIDTH:
        _back_substitute_narrow(rs, g, wsol, ux, TB, acc)
        return
    if g >= 0 and W == WIDE_WIDTH:
        _back_substitute_wide(rs, g, wsol, ux, TB, acc)
        return
    for t in range(TB - 1, -1, -1):
        for i in range(nb - 1, -1, -1):
            for l in range(W):
                acc[l] = wsol[t, i, l]
            if t < TB - 1:
                for j in range(nb):
                    for l in range(W):
                        acc[l] -= rs[sg[l], t, i, nb + j, sl[l]] * ux[t + 1, j, l]
            for j in range(i + 1, nb):
                for l in range(W):
                    acc[l] -= rs[sg[l], t, i, j, sl[l]] * ux[t, j, l]
            for l in range(W):
                ux[t, i, l] = acc[l] / rs[sg[l], t, i, i, sl[l]]


@_leaf
def _adjoint_sweep(rs, sg, sl, gv, w, TB, acc):
    """In place: w (TB, nb, W) = R^{-T} gv, the forward sweep R_t^T w_t = gv_t - S_{t-1}^T
    w_{t-1} (``gv`` (TB, nb, W) is left unchanged)."""
    W = w.shape[2]
    nb = w.shape[1]
    g = _contiguous_source(sg, sl, rs.shape[4])
    if g >= 0 and W == NARROW_WIDTH:
        _adjoint_sweep_narrow(rs, g, gv, w, TB, acc)
        return
    if g >= 0 and W == WIDE_WIDTH:
        _adjoint_sweep_wide(rs, g, gv, w, TB, acc)
        return
    for t in range(TB):
        for j in range(nb):
            for l in range(W):
                acc[l] = gv[t, j, l]
            if t > 0:
                for i in range(nb):
                    for l in range(W):
                        acc[l] -= rs[sg[l], t - 1, i, nb + j, sl[l]] * w[t - 1, i, l]
            for i in range(j):
                for l in range(W):
                    acc[l] -= rs[sg[l], t, i, j, sl[l]] * w[t, i, l]
            for l in range(W):
                w[t, j, l] = acc[l] / rs[sg[l], t, j, j, sl[l]]


@_leaf
def _check_width(W):
    if W != NARROW_WIDTH and W != WIDE_WIDTH:
        raise ValueError("QR lane kernels: the width must be 8 or 32")


@_leaf
def _zero_row(a, q):
    """a[q] = 0 (every column; any width: :func:`_pattern` builds rows on one lane)."""
    if a.shape[2] == NARROW_WIDTH:
        _narrow.zero_row(a, q)
    elif a.shape[2] == WIDE_WIDTH:
        _wide.zero_row(a, q)
    else:
        for c in range(a.shape[1]):
            for l in range(a.shape[2]):
                a[q, c, l] = 0


@_leaf
def _load_carried(a, carried, nb, rc):
    """Rows 0..nb-1 of ``a`` = the carried triangle (qr_lane_helpers_source.load_carried)."""
    _check_width(a.shape[2])
    if a.shape[2] == NARROW_WIDTH:
        _narrow.load_carried(a, carried, nb, rc)
    else:
        _wide.load_carried(a, carried, nb, rc)


@_leaf
def _save_carried(carried, a, nb, rc):
    """The triangle carried to the next block (qr_lane_helpers_source.save_carried)."""
    _check_width(a.shape[2])
    if a.shape[2] == NARROW_WIDTH:
        _narrow.save_carried(carried, a, nb, rc)
    else:
        _wide.save_carried(carried, a, nb, rc)


@_leaf
def _column_norms(a, cn2, nb, q, first):
    """Squared column norms of the rank check (qr_lane_helpers_source.column_norms)."""
    _check_width(a.shape[2])
    if a.shape[2] == NARROW_WIDTH:
        _narrow.column_norms(a, cn2, nb, q, first)
    else:
        _wide.column_norms(a, cn2, nb, q, first)


@_leaf
def _store_block(rs, g, t, a, nb, rc, wsol, with_rhs):
    """[R_t | S_t] into rs[g, t], z_t into wsol[t] (qr_lane_helpers_source.store_block)."""
    _check_width(a.shape[2])
    if a.shape[2] == NARROW_WIDTH:
        _narrow.store_block(rs, g, t, a, nb, rc, wsol, with_rhs)
    else:
        _wide.store_block(rs, g, t, a, nb, rc, wsol, with_rhs)


@_leaf
def _row_products(a, r, ul, ll, ncol, au, al):
    """au = a[r] . ul, al = a[r] . ll (qr_lane_helpers_source.row_products)."""
    _check_width(a.shape[2])
    if a.shape[2] == NARROW_WIDTH:
        _narrow.row_products(a, r, ul, ll, ncol, au, al)
    else:
        _wide.row_products(a, r, ul, ll, ncol, au, al)


@_leaf
def _step_gradient(da, r, res, ll, al, ul, ncol, acc):
    """acc = sum_c da[r, c] (res ll[c] - al ul[c]) (qr_lane_helpers_source.step_gradient)."""
    _check_width(da.shape[2])
    if da.shape[2] == NARROW_WIDTH:
        _narrow.step_gradient(da, r, res, ll, al, ul, ncol, acc)
    else:
        _wide.step_gradient(da, r, res, ll, al, ul, ncol, acc)


@_leaf
def _add_row_residual(a, r, ux, gl, t, nb, rc, res):
    """Row r's share of A^T (beta - A x) (qr_lane_helpers_source.add_row_residual)."""
    _check_width(a.shape[2])
    if a.shape[2] == NARROW_WIDTH:
        _narrow.add_row_residual(a, r, ux, gl, t, nb, rc, res)
    else:
        _wide.add_row_residual(a, r, ux, gl, t, nb, rc, res)


@_leaf
def _contiguous_source(sg, sl, Wr):
    """The factor group g when lane l reads ``rs[g, ..., l]`` for every lane (and the factor
    has as many lanes as the group), else -1."""
    W = sg.shape[0]
    if W != Wr:
        return -1
    for l in range(W):
        if sg[l] != sg[0] or sl[l] != l:
            return -1
    return sg[0]


@_leaf
def _sources(g, W, by_system, Wr, sysl, sg, sl):
    """Where lane l of group g finds its factor: ``rs[sg[l], ..., sl[l]]``."""
    for l in range(W):
        if by_system:
            sg[l] = sysl[l] // Wr
            sl[l] = sysl[l] % Wr
        else:
            sg[l] = g
            sl[l] = l


@_leaf
def _write_solution(out, ux, g, T, n, n_items, P, sysl, coll):
    W = sysl.shape[0]
    for l in range(W):
        if g * W + l >= n_items:
            continue
        for s in range(T):
            G = ux.shape[1] // n
            t, gs = s // G, s % G
            for j in range(n):
                out[sysl[l], s, j, coll[l]] = ux[t, gs * n + j, l]


def _inverse_factorials(R, dtype):
    f = np.empty(R, dtype=dtype)
    acc = 1.0
    for k in range(R):
        f[k] = 1.0 / acc
        acc *= k + 1
    return f


@njit(cache=True)
def _scratch(R, W, dt):
    """Per-worker scratch of the helpers: ``sv`` (2R + 4, W) and ``ordv`` (R + 4,) = 0, 1, 2..
    in the working type."""
    ordv = np.empty(R + 4, dtype=dt)
    for o in range(R + 4):
        ordv[o] = o
    return np.empty((2 * R + 4, W), dtype=dt), ordv


@_leaf
def _read_block(src, t, G, n, T, sysl, coll, dst):
    """dst (nb, W) = the values of ``src`` (N, T, m, P) on block t (0 on a padding step)."""
    W = sysl.shape[0]
    for gs in range(G):
        s = t * G + gs
        for j in range(n):
            if s < T:
                for l in range(W):
                    dst[gs * n + j, l] = src[sysl[l], s, j, coll[l]]
            else:
                for l in range(W):
                    dst[gs * n + j, l] = 0


@_kernel
def forward(
    coef, steps, rhs_eq, init, n_steps, n_dims, n_init_steps, n_init_orders, central, wts, finv,
    btype, rsup, nrs, csup, ncs, width, with_rhs, out, rs, refl, taus_out, failed_at, bad_input,
    n_workers,
):  # fmt: skip
    """Assemble and triangularise block by block; with ``with_rhs`` also solve.

    With ``with_rhs`` (the fused forward): lanes of items, ``out`` (N, T, m, P) written, ``rs``
    (Gi, TB, nb, 2nb, W) by groups of items. Without (factorize): lanes of systems (P = 1, the
    right-hand sides unused), ``rs`` by groups of systems, and where ``refl`` is not empty the
    reflectors (``refl``, ``taus_out``) are kept for :func:`solve`. Always: ``failed_at``
    (items,) = 1 + the first failed block (0 if none); ``bad_input[g] = 1`` where group g read
    a non-finite input or a step <= 0. ``n_workers`` parallel workers claim the groups."""
    T, D, S, K, W = n_steps, n_dims, n_init_steps, n_init_orders, width
    m = coef.shape[3]
    R = m // D
    P = rhs_eq.shape[3] if with_rhs else 1
    n_items = coef.shape[0] * P
    G, nb, TB, pmax = block_sizes(T, D, R, coef.shape[2], K, central)
    n_groups = (n_items + W - 1) // W
    dt = rs.dtype
    next_job = np.zeros(1, dtype=np.int64)
    for _worker in prange(n_workers):
        a = np.empty((pmax, 2 * nb + 1, W), dtype=dt)
        da = np.empty((0, 2 * nb + 1, W), dtype=dt)
        kind = np.empty((pmax, 2), dtype=np.int64)
        aux = np.empty((pmax, 2), dtype=np.int64)
        chk = np.empty(W, dtype=dt)
        taus = np.empty((2 * nb, W), dtype=dt)
        cn2 = np.empty((2 * nb, W), dtype=dt)
        carried = np.empty((nb, nb + 1, W), dtype=dt)
        dead = np.empty(W, dtype=np.int64)
        nsol = TB if with_rhs else 0
        wsol = np.empty((nsol, nb, W), dtype=dt)
        ux = np.empty((nsol, nb, W), dtype=dt)
        sysl = np.empty(W, dtype=np.int64)
        coll = np.empty(W, dtype=np.int64)
        sg = np.empty(W, dtype=np.int64)
        sl = np.empty(W, dtype=np.int64)
        sv, ordv = _scratch(R, W, dt)
        g = _claim_job(next_job)
        while g < n_groups:
            _factor_group(
                g, coef, steps, rhs_eq, init, T, D, S, K, central, wts, finv, with_rhs,
                btype, (rsup, nrs, csup, ncs), rs, refl, taus_out, failed_at, bad_input, out,
                a, da, kind, aux, chk, taus, cn2, carried, dead, wsol, ux, sysl, coll, sg, sl,
                sv, ordv,
            )  # fmt: skip
            g = _claim_job(next_job)


@_kernel
def solve(
    coef, steps, rhs_eq, init, n_steps, n_dims, n_init_steps, n_init_orders, central, wts, finv,
    btype, rsup, nrs, csup, ncs, width, rs, refl, taus_in, out, bad_input, n_workers,
):  # fmt: skip
    """u (N, T, m, P) for the right-hand sides of (``rhs_eq``, ``init``) with the reflectors and
    [R | S] of :func:`forward` without right-hand sides (by groups of systems): each block's
    right-hand side is assembled by :func:`_build_rows` and reflected exactly as in the fused
    forward kernel, so both give the same bits. Lanes of items; ``bad_input[g] = 1`` where
    group g read a non-finite value."""
    T, D, S, K, W = n_steps, n_dims, n_init_steps, n_init_orders, width
    m = coef.shape[3]
    R = m // D
    n = m
    P = rhs_eq.shape[3]
    n_items = coef.shape[0] * P
    G, nb, TB, pmax = block_sizes(T, D, R, coef.shape[2], K, central)
    Wr = rs.shape[4]
    rc = 2 * nb
    n_groups = (n_items + W - 1) // W
    dt = rs.dtype
    next_job = np.zeros(1, dtype=np.int64)
    for _worker in prange(n_workers):
        a = np.empty((pmax, 2 * nb + 1, W), dtype=dt)
        da = np.empty((0, 2 * nb + 1, W), dtype=dt)
        kind = np.empty((pmax, 2), dtype=np.int64)
        aux = np.empty((pmax, 2), dtype=np.int64)
        chk = np.empty(W, dtype=dt)
        tau = np.empty(W, dtype=dt)
        s = np.empty(W, dtype=dt)
        wsol = np.empty((TB, nb, W), dtype=dt)
        ux = np.empty((TB, nb, W), dtype=dt)
        sysl = np.empty(W, dtype=np.int64)
        coll = np.empty(W, dtype=np.int64)
        sg = np.empty(W, dtype=np.int64)
        sl = np.empty(W, dtype=np.int64)
        sv, ordv = _scratch(R, W, dt)
        g = _claim_job(next_job)
        while g < n_groups:
            _lanes(g, W, n_items, P, sysl, coll)
            _sources(g, W, True, Wr, sysl, sg, sl)
            for l in range(W):
                chk[l] = 0
            for t in range(TB):
                for i in range(nb):
                    for l in range(W):
                        a[i, rc, l] = a[nb + i, rc, l] if t > 0 else 0
                _build_rows(
                    t, nb, T, D, R, S, K, central, coef, steps, rhs_eq, init, sysl, coll,
                    wts, finv, a, da, kind, aux, chk, True, False, rc, sv, ordv,
                )  # fmt: skip
                ty = btype[t]
                for j in range(nrs.shape[1]):
                    nr = nrs[ty, j]
                    if nr == 0:
                        break
                    for l in range(W):
                        tau[l] = taus_in[sg[l], t, j, sl[l]]
                        s[l] = a[j, rc, l]
                    for ii in range(1, nr):
                        i = rsup[ty, j, ii]
                        for l in range(W):
                            s[l] += refl[sg[l], t, i, j, sl[l]] * a[i, rc, l]
                    for l in range(W):
                        s[l] *= tau[l]
                        a[j, rc, l] -= s[l]
                    for ii in range(1, nr):
                        i = rsup[ty, j, ii]
                        for l in range(W):
                            a[i, rc, l] -= s[l] * refl[sg[l], t, i, j, sl[l]]
                for i in range(nb):
                    for l in range(W):
                        wsol[t, i, l] = a[i, rc, l]
            for l in range(W):
                if not (chk[l] == 0):
                    bad_input[g] = 1
            _back_substitute(rs, sg, sl, wsol, ux, TB, sv[0])
            _write_solution(out, ux, g, T, n, n_items, P, sysl, coll)
            g = _claim_job(next_job)


@_kernel
def solve_normal(rs, rhs, n_dims, central, width, out, n_workers):
    """x (N, T, m, P) = (R^T R)^{-1} rhs = (A^T A)^{-1} rhs for ``rhs`` (N, T, m, P), with
    ``rs`` by groups of systems (a forward sweep with R^T, then back substitution)."""
    W = width
    N, T, m, P = rhs.shape
    R = m // n_dims
    G = 2 if central else 1
    nb = G * m
    TB = (T + G - 1) // G
    Wr = rs.shape[4]
    n_items = N * P
    n_groups = (n_items + W - 1) // W
    dt = rs.dtype
    next_job = np.zeros(1, dtype=np.int64)
    for _worker in prange(n_workers):
        gv = np.empty((TB, nb, W), dtype=dt)
        w = np.empty((TB, nb, W), dtype=dt)
        ux = np.empty((TB, nb, W), dtype=dt)
        sysl = np.empty(W, dtype=np.int64)
        coll = np.empty(W, dtype=np.int64)
        sg = np.empty(W, dtype=np.int64)
        sl = np.empty(W, dtype=np.int64)
        sv, ordv = _scratch(R, W, dt)
        g = _claim_job(next_job)
        while g < n_groups:
            _lanes(g, W, n_items, P, sysl, coll)
            _sources(g, W, True, Wr, sysl, sg, sl)
            for t in range(TB):
                _read_block(rhs, t, G, m, T, sysl, coll, gv[t])
            _adjoint_sweep(rs, sg, sl, gv, w, TB, sv[0])
            _back_substitute(rs, sg, sl, w, ux, TB, sv[0])
            _write_solution(out, ux, g, T, m, n_items, P, sysl, coll)
            g = _claim_job(next_job)


@_kernel
def backward(
    grad, x, coef, steps, rhs_eq, init, n_dims, n_init_steps, n_init_orders, central, wts, finv,
    width, rs, by_system, adjoint_given, g_coef, g_steps, g_rhs, g_init, n_workers,
):  # fmt: skip
    """Gradients of the least-squares solution x (N, T, m, P) for the upstream gradient ``grad``
    (same shape): lambda = (A^T A)^{-1} grad with [R | S] (``rs`` by groups of items, or of
    systems with ``by_system``), residual r = beta - A x rebuilt row by row, and per row i
    dl/dbeta_i = (A lambda)_i, dl/dA_ij = r_i lambda_j - (A lambda)_i x_j, chained to the inputs.
    With ``adjoint_given``, ``grad`` holds lambda itself (solved and refined by the caller) and
    ``rs`` is not read; the arithmetic runs in the type of ``x`` (the float32 engine's
    gradients are chained in float64 this way, from float64 copies of its inputs).

    Writes ``g_coef`` (N * P, Tc, E, m) and ``g_steps`` (N * P, Th) per item (the caller sums
    over P), ``g_rhs`` (N, Tb, E, P) and ``g_init`` (N, Su, D*K, P) (size-1 step axes summed)."""
    W = width
    N, T, m, P = x.shape
    D, S, K = n_dims, n_init_steps, n_init_orders
    R = m // D
    n = m
    E, Tc = coef.shape[2], coef.shape[1]
    Tb, Th, Su = rhs_eq.shape[1], steps.shape[1], init.shape[1]
    G, nb, TB, pmax = block_sizes(T, D, R, E, K, central)
    Wr = rs.shape[4]
    rc = 2 * nb
    n_items = N * P
    n_groups = (n_items + W - 1) // W
    dt = x.dtype
    w_eq, w_in = wts[0], wts[1]
    next_job = np.zeros(1, dtype=np.int64)
    for _worker in prange(n_workers):
        a = np.empty((pmax, 2 * nb + 1, W), dtype=dt)
        da = np.empty((pmax, 2 * nb + 1, W), dtype=dt)
        kind = np.empty((pmax, 2), dtype=np.int64)
        aux = np.empty((pmax, 2), dtype=np.int64)
        chk = np.empty(W, dtype=dt)
        gv = np.empty((TB, nb, W), dtype=dt)
        lam = np.empty((TB, nb, W), dtype=dt)
        w = np.empty((TB, nb, W), dtype=dt)
        ux = np.empty((TB, nb, W), dtype=dt)
        ul = np.empty((2 * nb, W), dtype=dt)
        ll = np.empty((2 * nb, W), dtype=dt)
        au = np.empty(W, dtype=dt)
        al = np.empty(W, dtype=dt)
        res = np.empty(W, dtype=dt)
        acc = np.empty(W, dtype=dt)
        sysl = np.empty(W, dtype=np.int64)
        coll = np.empty(W, dtype=np.int64)
        sg = np.empty(W, dtype=np.int64)
        sl = np.empty(W, dtype=np.int64)
        sv, ordv = _scratch(R, W, dt)
        g = _claim_job(next_job)
        while g < n_groups:
            _lanes(g, W, n_items, P, sysl, coll)
            _sources(g, W, by_system, Wr, sysl, sg, sl)
            for t in range(TB):
                _read_block(grad, t, G, n, T, sysl, coll, lam[t] if adjoint_given else gv[t])
                _read_block(x, t, G, n, T, sysl, coll, ux[t])
            if not adjoint_given:
                _adjoint_sweep(rs, sg, sl, gv, w, TB, sv[0])
                _back_substitute(rs, sg, sl, w, lam, TB, sv[0])
            nl = min(W, n_items - g * W)  # real lanes
            for l in range(nl):
                i_item, ns, ps = g * W + l, sysl[l], coll[l]
                g_coef[i_item] = 0
                g_steps[i_item] = 0
                g_rhs[ns, :, :, ps] = 0
                g_init[ns, :, :, ps] = 0
            for t in range(TB):
                for c in range(nb):
                    for l in range(W):
                        ul[c, l] = ux[t, c, l]
                        ll[c, l] = lam[t, c, l]
                        ul[nb + c, l] = ux[t + 1, c, l] if t + 1 < TB else 0
                        ll[nb + c, l] = lam[t + 1, c, l] if t + 1 < TB else 0
                q = _build_rows(
                    t, 0, T, D, R, S, K, central, coef, steps, rhs_eq, init, sysl, coll,
                    wts, finv, a, da, kind, aux, chk, True, True, rc, sv, ordv,
                )  # fmt: skip
                for r in range(q):
                    _row_products(a, r, ul, ll, 2 * nb, au, al)
                    for l in range(W):
                        res[l] = a[r, rc, l] - au[l]
                    k = kind[r, 0]
                    s = aux[r, 0]
                    if k == EQUATION:
                        e = aux[r, 1]
                        c0 = (s - t * G) * n
                        tc, tb = min(s, Tc - 1), min(s, Tb - 1)
                        for l in range(nl):
                            i_item, ns, ps = g * W + l, sysl[l], coll[l]
                            for j in range(n):
                                g_coef[i_item, tc, e, j] += w_eq * (
                                    res[l] * ll[c0 + j, l] - al[l] * ul[c0 + j, l]
                                )
                            g_rhs[ns, tb, e, ps] += w_eq * al[l]
                    elif k == INITIAL:
                        tu = min(s, Su - 1)
                        for l in range(nl):
                            g_init[sysl[l], tu, aux[r, 1], coll[l]] += w_in * al[l]
                    elif k == TAYLOR or k == CENTRAL:
                        _step_gradient(da, r, res, ll, al, ul, 2 * nb, acc)
                        for l in range(nl):
                            g_steps[g * W + l, min(s, Th - 1)] += acc[l]
                            if k == CENTRAL:
                                g_steps[g * W + l, min(s + 1, Th - 1)] += acc[l]
            g = _claim_job(next_job)


@_helper
def sum_items(partials, n_columns, out):
    """out[n] = sum over p (in order) of partials[n * P + p], P = ``n_columns``: (N * P, k) ->
    (N, k)."""
    N, k = out.shape
    for i in range(N):
        for j in range(k):
            out[i, j] = partials[i * n_columns, j]
        for p in range(1, n_columns):
            for j in range(k):
                out[i, j] += partials[i * n_columns + p, j]


@njit(cache=True)
def _pattern(t, T, D, R, E, S, K, central):
    """The rows of block t built from values that are never zero (one lane): their nonzero
    entries are the structure of every block of t's type; returns (rows, row count)."""
    G, nb, TB, pmax = block_sizes(T, D, R, E, K, central)
    m = D * R
    a = np.zeros((pmax, 2 * nb + 1, 1))
    da = np.empty((0, 2 * nb + 1, 1))
    kind = np.empty((pmax, 2), dtype=np.int64)
    aux = np.empty((pmax, 2), dtype=np.int64)
    chk = np.zeros(1)
    sysl = np.zeros(1, dtype=np.int64)
    sv, ordv = _scratch(R, 1, np.float64)
    finv = np.ones(R)
    wts = np.ones(3)
    coef = np.ones((1, 1, E, m))
    steps = np.full((1, 1), 0.5)
    rhs = np.ones((1, 1, E, 1))
    init = np.ones((1, 1, max(D * K, 1), 1))
    q = _build_rows(
        t, nb, T, D, R, S, K, central, coef, steps, rhs, init, sysl, sysl, wts, finv,
        a, da, kind, aux, chk, True, False, 2 * nb, sv, ordv,
    )  # fmt: skip
    return a[:, :, 0], q


def supports(T, D, R, E, S, K, central):
    """The plan of the reflections (a symbolic Householder QR of the block's structure).

    Returns ``btype`` (TB,) int64, the type of every block (blocks of one type have the same
    rows), and per type and reflector j: ``rsup`` (NT, 2nb, pmax) the rows it acts on (j
    first), ``nrs`` (NT, 2nb) their count (0 past the last reflector), ``csup`` (NT, 2nb, 2nb)
    the later columns with a nonzero on those rows, ``ncs`` (NT, 2nb) their count. Rows and
    columns outside a reflector's plan hold exact zeros there, so skipping them changes no
    result; the carried triangle is taken as a full upper triangle."""
    G, nb, TB, pmax = block_sizes(T, D, R, E, K, central)
    t = np.arange(TB)
    keys = (t == TB - 1).astype(np.int64)
    for gs in range(G):
        s = t * G + gs
        keys = keys * 16 + (s < T) * 8 + (s < S) * 4 + (s + 1 < T) * 2 + (s + 2 < T)
    unique, first, btype = np.unique(keys, return_index=True, return_inverse=True)
    NT = len(unique)
    rsup = np.zeros((NT, 2 * nb, pmax), dtype=np.int64)
    nrs = np.zeros((NT, 2 * nb), dtype=np.int64)
    csup = np.zeros((NT, 2 * nb, 2 * nb), dtype=np.int64)
    ncs = np.zeros((NT, 2 * nb), dtype=np.int64)
    for ty, tb in enumerate(first):
        a, q = _pattern(int(tb), T, D, R, E, S, K, central)
        pat = a[:q, : 2 * nb] != 0
        pat[:nb, :nb] = np.triu(np.ones((nb, nb), dtype=bool))
        ncx = nb if tb == TB - 1 else 2 * nb
        for j in range(min(ncx, q)):
            rows = [j] + [i for i in range(j + 1, q) if pat[i, j]]
            cols = [c for c in range(j + 1, ncx) if pat[rows, c].any()]
            rsup[ty, j, : len(rows)] = rows
            nrs[ty, j] = len(rows)
            csup[ty, j, : len(cols)] = cols
            ncs[ty, j] = len(cols)
            for c in cols:
                pat[rows, c] = True
            pat[rows[1:], j] = False
    return btype.astype(np.int64).reshape(TB), rsup, nrs, csup, ncs


@_kernel
def normal_residual(
    coef, steps, rhs_eq, init, x, n_dims, n_init_steps, n_init_orders, central, wts, finv,
    width, out, n_workers,
):  # fmt: skip
    """``out`` (N, T, m, P) = A^T (beta - A x) for x (N, T, m, P), row by row with
    :func:`_build_rows` (in the arrays' precision: the refinement of a float32 solution calls
    it with float64 copies). Lanes of items."""
    W = width
    N, T, m, P = x.shape
    D, S, K = n_dims, n_init_steps, n_init_orders
    R = m // D
    G, nb, TB, pmax = block_sizes(T, D, R, coef.shape[2], K, central)
    rc = 2 * nb
    n_items = N * P
    n_groups = (n_items + W - 1) // W
    dt = out.dtype
    next_job = np.zeros(1, dtype=np.int64)
    for _worker in prange(n_workers):
        a = np.empty((pmax, 2 * nb + 1, W), dtype=dt)
        da = np.empty((0, 2 * nb + 1, W), dtype=dt)
        kind = np.empty((pmax, 2), dtype=np.int64)
        aux = np.empty((pmax, 2), dtype=np.int64)
        chk = np.zeros(W, dtype=dt)
        ux = np.empty((TB + 1, nb, W), dtype=dt)
        gl = np.empty((TB + 1, nb, W), dtype=dt)
        res = np.empty(W, dtype=dt)
        sysl = np.empty(W, dtype=np.int64)
        coll = np.empty(W, dtype=np.int64)
        sv, ordv = _scratch(R, W, dt)
        g = _claim_job(next_job)
        while g < n_groups:
            _lanes(g, W, n_items, P, sysl, coll)
            for t in range(TB):
                _read_block(x, t, G, m, T, sysl, coll, ux[t])
            for c in range(nb):
                for l in range(W):
                    ux[TB, c, l] = 0
            for t in range(TB + 1):
                for c in range(nb):
                    for l in range(W):
                        gl[t, c, l] = 0
            for t in range(TB):
                q = _build_rows(
                    t, 0, T, D, R, S, K, central, coef, steps, rhs_eq, init, sysl, coll,
                    wts, finv, a, da, kind, aux, chk, True, False, rc, sv, ordv,
                )  # fmt: skip
                for r in range(q):
                    _add_row_residual(a, r, ux, gl, t, nb, rc, res)
            _write_solution(out, gl, g, T, m, n_items, P, sysl, coll)
            g = _claim_job(next_job)
