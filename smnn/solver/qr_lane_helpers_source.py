# The hot lane loops of the QR lane kernels (smnn.solver.qr_lane_kernels) at a fixed width.
#
# This file is a "body" for smnn.solver.lane_ops.kernel_module: it is appended to the lane
# helpers of lane_ops (plus QR_OPS of qr_lane_kernels) spelled out at LANES lanes, and the
# result is imported as a module once per width (8 and 32). Every lane runs the same operations
# in the same order as the width-generic loops of qr_lane_kernels, so the bits do not depend on
# the width or on which of the two forms ran. Arrays as in qr_lane_kernels: a block ``a``
# (rows, columns, W), per-lane vectors (W,).
#
# ruff: noqa: F821  (helper and the lane helpers are generated: smnn.solver.lane_ops)


@helper
def reflect_column(a, j, rows, nr, c, taus, s):
    """Apply the reflector stored in column j of ``a`` (unit at row j, entries on the rows
    ``rows[1:nr]``; factor ``taus[j]``) to column c (``s`` (W,) scratch)."""
    acc = _value_of(a[j, c])
    for ii in range(1, nr):
        i = rows[ii]
        acc = _plus_products(acc, a[i, j], a[i, c])
    acc = _value_times(acc, taus[j])
    _store_value(s, acc)
    _subtract(a[j, c], s)
    for ii in range(1, nr):
        _subtract_product(a[rows[ii], c], s, a[rows[ii], j])


@helper
def squared_norm(a, j, rows, nr, sig):
    """sig (W,) = sum over the rows ``rows[1:nr]`` of a[i, j]^2 (in that order, from 0)."""
    _fill(sig, 0)
    acc = _value_of(sig)
    for ii in range(1, nr):
        i = rows[ii]
        acc = _plus_products(acc, a[i, j], a[i, j])
    _store_value(sig, acc)


@helper
def scale_rows(a, j, rows, nr, sig):
    """a[i, j] *= sig for the rows ``rows[1:nr]``."""
    for ii in range(1, nr):
        _multiply(a[rows[ii], j], sig)


@helper
def back_substitute(rs, g, wsol, ux, TB, acc):
    """ux (TB, nb, W) = the solution of the block bidiagonal [R_t | S_t] system ``rs[g]`` with
    right-hand sides ``wsol`` (TB, nb, W) (lanes in the factor's order)."""
    nb = ux.shape[1]
    for t in range(TB - 1, -1, -1):
        for i in range(nb - 1, -1, -1):
            v = _value_of(wsol[t, i])
            if t < TB - 1:
                for j in range(nb):
                    v = _minus_products(v, rs[g, t, i, nb + j], ux[t + 1, j])
            for j in range(i + 1, nb):
                v = _minus_products(v, rs[g, t, i, j], ux[t, j])
            _store_value(acc, v)
            _divide(ux[t, i], acc, rs[g, t, i, i])


@helper
def adjoint_sweep(rs, g, gv, w, TB, acc):
    """w (TB, nb, W) = R^{-T} gv with the factor ``rs[g]`` (the forward sweep
    R_t^T w_t = gv_t - S_{t-1}^T w_{t-1}; lanes in the factor's order)."""
    nb = w.shape[1]
    for t in range(TB):
        for j in range(nb):
            v = _value_of(gv[t, j])
            if t > 0:
                for i in range(nb):
                    v = _minus_products(v, rs[g, t - 1, i, nb + j], w[t - 1, i])
            for i in range(j):
                v = _minus_products(v, rs[g, t, i, j], w[t, i])
            _store_value(acc, v)
            _divide(w[t, j], acc, rs[g, t, j, j])


@helper
def zero_row(a, q):
    """a[q] = 0 (every column)."""
    for c in range(a.shape[1]):
        _fill(a[q, c], 0)


@helper
def load_carried(a, carried, nb, rc):
    """Rows 0..nb-1 of ``a`` = the carried triangle ``carried`` (nb, nb + 1, W) (its last
    column is the right-hand side, written at column ``rc``), zero elsewhere."""
    for i in range(nb):
        zero_row(a, i)
        for j in range(i, nb):
            _copy(a[i, j], carried[i, j])
        _copy(a[i, rc], carried[i, nb])


@helper
def save_carried(carried, a, nb, rc):
    """The triangle of rows nb..2nb-1 on columns nb..2nb-1 of ``a`` and their right-hand side
    (column ``rc``) into ``carried`` (nb, nb + 1, W)."""
    for i in range(nb):
        for j in range(i, nb):
            _copy(carried[i, j], a[nb + i, nb + j])
        _copy(carried[i, nb], a[nb + i, rc])


@helper
def column_norms(a, cn2, nb, q, first):
    """Squared norms of the columns of A on u_t (rows nb..q-1 of ``a``): cn2[j] = cn2[nb + j]
    (the previous block's rows; 0 when ``first``) + sum_i a[i, j]^2, and cn2[nb + j] = sum_i
    a[i, nb + j]^2 (for the next block), the rows in order."""
    for j in range(nb):
        if first:
            _fill(cn2[j], 0)
        else:
            _copy(cn2[j], cn2[nb + j])
        _fill(cn2[nb + j], 0)
        v = _value_of(cn2[j])
        w = _value_of(cn2[nb + j])
        for i in range(nb, q):
            v = _plus_products(v, a[i, j], a[i, j])
            w = _plus_products(w, a[i, nb + j], a[i, nb + j])
        _store_value(cn2[j], v)
        _store_value(cn2[nb + j], w)


@helper
def store_block(rs, g, t, a, nb, rc, wsol, with_rhs):
    """rs[g, t] = the upper triangle of rows 0..nb-1 of ``a`` on columns 0..2nb-1 (0 below
    the diagonal); with ``with_rhs`` wsol[t] = their right-hand side (column ``rc``)."""
    for i in range(nb):
        for c in range(2 * nb):
            if c >= i:
                _copy(rs[g, t, i, c], a[i, c])
            else:
                _fill(rs[g, t, i, c], 0)
        if with_rhs:
            _copy(wsol[t, i], a[i, rc])


@helper
def row_products(a, r, ul, ll, ncol, au, al):
    """au = sum_c a[r, c] ul[c], al = sum_c a[r, c] ll[c] over c < ``ncol`` (in order, from 0)."""
    _fill(au, 0)
    _fill(al, 0)
    v = _value_of(au)
    w = _value_of(al)
    for c in range(ncol):
        v = _plus_products(v, a[r, c], ul[c])
        w = _plus_products(w, a[r, c], ll[c])
    _store_value(au, v)
    _store_value(al, w)


@helper
def step_gradient(da, r, res, ll, al, ul, ncol, acc):
    """acc = sum_c da[r, c] (res ll[c] - al ul[c]) over c < ``ncol`` (in order, from 0): the
    gradient of row r's entries with respect to its step size."""
    _fill(acc, 0)
    v = _value_of(acc)
    for c in range(ncol):
        v = _plus_scaled_differences(v, da[r, c], res, ll[c], al, ul[c])
    _store_value(acc, v)


@helper
def add_row_residual(a, r, ux, gl, t, nb, rc, res):
    """Row r of block t: res = a[r, rc] - sum_c (a[r, c] ux[t, c] and a[r, nb + c]
    ux[t + 1, c]) (in that order), then gl[t, c] += a[r, c] res, gl[t + 1, c] +=
    a[r, nb + c] res: row r's share of A^T (beta - A x)."""
    v = _value_of(a[r, rc])
    for c in range(nb):
        v = _minus_products(v, a[r, c], ux[t, c])
        v = _minus_products(v, a[r, nb + c], ux[t + 1, c])
    _store_value(res, v)
    for c in range(nb):
        _add_product(gl[t, c], a[r, c], res)
        _add_product(gl[t + 1, c], a[r, nb + c], res)
