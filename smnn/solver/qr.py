"""The orthogonal (QR) least-squares solve on the torch path (docs/solver.md, "The orthogonal
(QR) solve").

The normal equations M = A^T A square the condition number of A; this module never forms M.
It sweeps the rows of A block by block along the steps, keeping an upper triangle carried from
one step to the next, so the error of u grows with cond(A) only.

Canonical layout (one step s per unknown block u_s of n unknowns; with central smoothness two
natural steps are paired into one super-step of n = 2*D*R unknowns, the grouping of
:mod:`smnn.solver.layout`, so the same sweep serves the block pentadiagonal case):

- ``x`` ``(N, Ts, p, n)``: the p rows of step s on u_s (equation and initial-value rows of the
  step, the smoothness rows of the interval that starts at it; zero rows where a row does not
  exist, such as the initial-value rows of steps t >= S);
- ``y`` ``(N, Ts, p, n)``: the same rows on u_{s+1} (zero at the last step);
- ``beta`` ``(N, Ts, p, P)``: their right-hand sides, P per system (a batch that shares its
  left-hand side is folded into P by :class:`~smnn.solver.layout.BatchFolding`, so shared rows
  are triangularised once).

Sweep: at step s stack the carried triangle C_s (n rows on u_s, empty at s = 0) over the p rows
of the step and triangularise the 2n columns [u_s | u_{s+1}] with Householder reflections
(``torch.geqrf``, batched over the N systems). The result is [[R_s, S_s], [0, C_{s+1}]]: R_s and
S_s are block row s of the block-bidiagonal Cholesky factor of M (R^T R = A^T A), C_{s+1} is the
triangle carried to the next step. The same reflections applied to [d_s; beta_s] (``ormqr``)
give z_s and the carried right-hand side d_{s+1}; back substitution
u_s = R_s^{-1} (z_s - S_s u_{s+1}) finishes. Time and memory O(Ts): nothing of size T^2.

Rank: the least-squares problem is rank deficient at step s when a diagonal entry of R_s is
negligible against its column. Householder QR is column-wise backward stable: the computed R is
exact for a matrix whose column j differs by a small multiple of eps * ||a_j||, so
|R_jj| <= :data:`RANK_TOLERANCE_FACTOR` * n * eps * ||a_j|| cannot be told from zero; a_j is
the column of A of that unknown (the rows of its step and the coupling rows of the step
before). (Not the column of the stacked block: after a dependent direction has been carried
through the triangle, that column is itself rounding noise.) Those systems are reported in
``failed_at`` (the API raises
:class:`~smnn.solver.banded.NonPositivePivotError` naming them, or returns NaN with
``check_pivots=False``).

float32: the rows are sorted by decreasing max-norm in every stacked block before the
reflections (:func:`_row_order`; Householder QR is not row-wise stable without it), and the
solution gets one step of mixed-precision refinement (:func:`refine_solution`: residual and A^T r in
float64, correction with the float32 R), which brings the error from cond(A) * eps32 to about
the rounding of the inputs on the test problems.

Backward (custom autograd, no Q kept): with upstream gradient g, lambda = (A^T A)^{-1} g =
R^{-1} R^{-T} g (a forward sweep R_s^T w_s = g_s - S_{s-1}^T w_{s-1}, then a back substitution
R lambda = w; in float32 refined once like u), residual r = beta - A u, then
dl/dbeta = A lambda and
dl/dA = r lambda^T - (A lambda) u^T on the nonzero pattern of A, i.e. on the blocks x and y.
The row blocks are built from the inputs by differentiable torch ops (:func:`build_step_rows`,
:func:`build_step_rhs`), so autograd carries these on to the coefficients, steps, weights,
right-hand sides and initial values.

Reusing a factorization for new right-hand sides (:func:`factorize_rows` with
``keep_reflectors=True``): the Householder vectors and scalars of every step are kept (LAPACK's
compact form, ``(N, Ts, n+p, 2n)`` and ``(N, Ts, 2n)``, about the size of ``x`` and ``y``), and a
new right-hand side is rotated by them step by step: exactly the operations of the forward
sweep, so :meth:`QRFactor.solve_rows` has QR accuracy and agrees with the one-pass forward to
rounding. (Semi-normal equations R^T R u = A^T beta would need a refinement step to reach that
accuracy in float32; the stored reflectors cost one (n+p) x 2n block per step and no extra
solve.)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smnn.solver.banded import raise_if_failed
from smnn.solver.inputs import OdeProblem, check_finite
from smnn.solver.layout import BatchFolding, unpair_solution

__all__ = [
    "RANK_TOLERANCE_FACTOR",
    "QRFactor",
    "QRLeftHandSide",
    "apply_rows",
    "apply_rows_t",
    "build_step_rows",
    "build_step_rhs",
    "factorize_rows",
    "folded_rhs",
    "least_squares_backward",
    "nan_failed",
    "qr_least_squares",
    "qr_factorize_problem",
    "qr_ode_forward",
    "rank_tolerance",
    "refine_solution",
    "unfold_solution",
]

RANK_TOLERANCE_FACTOR = 4.0
"""|R_jj| <= RANK_TOLERANCE_FACTOR * n * eps * ||a_j|| is a rank failure (module docstring):
n * eps is the order of the column-wise backward error of Householder QR on the n columns of a
step, the factor 4 a margin for the rows of the stacked block. Measured on the singular problems
of tests/test_qr.py (T = 5..400, with and without central rows, float32 and float64): the
dependent directions give min |R_jj| / ||a_j|| of 0 to 1.1 n * eps, the well-posed systems
beside them at least 8e3 n * eps (float32) and 4e12 n * eps (float64)."""


def rank_tolerance(n: int, dtype: torch.dtype) -> float:
    """Relative threshold on |diag(R_s)| / column norm for blocks of ``n`` unknowns."""
    return RANK_TOLERANCE_FACTOR * n * torch.finfo(dtype).eps


# ------------------------------------------------------------------------- row construction


def _taylor_rows(h: torch.Tensor, n_orders: int, n_taylor: int, weight_smooth):
    """Taylor rows of every interval per state: x ``(*, T-1, 2*n_taylor, R)`` on u_t and y
    ``(*, T-1, 2*n_taylor, R)`` on u_{t+1}; rows (k, forward/backward) for k < n_taylor."""
    R = n_orders
    dtype, device = h.dtype, h.device
    orders = torch.arange(R, device=device, dtype=dtype)
    fact = torch.tensor(
        [[1.0 / math.factorial(o - k) if o >= k else 0.0 for o in range(R)] for k in range(R)],
        dtype=dtype,
        device=device,
    )[:n_taylor]  # (nt, R): 1/(o-k)! for o >= k
    eye = torch.eye(R, dtype=dtype, device=device)[:n_taylor]  # (nt, R): delta_{ko}
    hp = h[..., None] ** orders  # (*, T-1, R): h^o
    hm = (-h)[..., None] ** orders  # (-h)^o
    hk = hp[..., :n_taylor]  # h^k
    hmk = hm[..., :n_taylor]  # (-h)^k
    # forward: sum_{o>=k} h^o/(o-k)! u[t,o] - h^k u[t+1,k]
    fwd_x = hp[..., None, :] * fact
    fwd_y = -hk[..., :, None] * eye
    # backward: sum_{o>=k} (-h)^o/(o-k)! u[t+1,o] - (-h)^k u[t,k]
    bwd_x = -hmk[..., :, None] * eye
    bwd_y = hm[..., None, :] * fact
    x = torch.stack([fwd_x, bwd_x], dim=-2).flatten(-3, -2)  # (*, T-1, 2nt, R)
    y = torch.stack([fwd_y, bwd_y], dim=-2).flatten(-3, -2)
    return x * weight_smooth, y * weight_smooth


def _kron_states(rows_r: torch.Tensor, n_dims: int) -> torch.Tensor:
    """Rows per state ``(..., q, R)`` -> the same rows for every state ``(..., D*q, D*R)``
    (state d's rows act on state d's columns)."""
    if n_dims == 1:
        return rows_r
    q, R = rows_r.shape[-2:]
    eye = torch.eye(n_dims, dtype=rows_r.dtype, device=rows_r.device)
    out = rows_r[..., None, :, None, :] * eye[:, None, :, None]
    return out.reshape(*rows_r.shape[:-2], n_dims * q, n_dims * R)


def _pad_steps(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad the step axis (dim -3) of ``(..., t, a, b)`` to ``length``."""
    return F.pad(x, (0, 0, 0, 0, 0, length - x.shape[-3]))


def _natural_rows(problem: OdeProblem, weights: tuple, central: bool):
    """Rows in natural steps, all at ``problem.lhs_batch_shape``.

    Returns local ``(*lhs, T, E + D*K, n)`` (equation and initial-value rows of each step),
    taylor_x, taylor_y ``(*lhs, T-1, 2*D*nt, n)`` and, with central rows, (c0, c1, c2)
    ``(*lhs, T-2, D, n)`` on u_t, u_{t+1}, u_{t+2}; else None.
    """
    w_eq, w_in, w_s = weights
    c, h = problem.coefficients, problem.steps
    T, D, R = problem.n_steps, problem.n_dims, problem.n_orders
    S, K, E = problem.n_init_var_steps, problem.n_init_orders, problem.n_equations
    n = D * R
    lhs = tuple(problem.lhs_batch_shape)
    dtype, device = c.dtype, c.device

    eq = (c.reshape(*c.shape[:-2], n) * w_eq).expand(*lhs, T, E, n)
    select = torch.zeros(D, K, D, R, dtype=dtype, device=device)
    for d in range(D):
        for k in range(K):
            select[d, k, d, k] = 1.0
    mask = (torch.arange(T, device=device) < S).to(dtype)
    init = mask[:, None, None] * select.reshape(D * K, n) * w_in  # (T, D*K, n)
    local = torch.cat([eq, init.expand(*lhs, T, D * K, n)], dim=-2)

    hfull = h.expand(*h.shape[:-1], T - 1)
    n_taylor = R - 1 if central else R
    tx, ty = _taylor_rows(hfull, R, n_taylor, w_s)
    tx = _kron_states(tx, D).expand(*lhs, T - 1, 2 * D * n_taylor, n)
    ty = _kron_states(ty, D).expand(*lhs, T - 1, 2 * D * n_taylor, n)

    cen = None
    if central:
        s = hfull[..., :-1] + hfull[..., 1:]  # (*, T-2)
        a = (w_s * s ** (R - 3))[..., None, None]
        b = (w_s * s ** (R - 2))[..., None, None]
        unit = torch.eye(R, dtype=dtype, device=device)
        e2, e1 = unit[R - 2 : R - 1], unit[R - 1 : R]  # (1, R)
        cen = tuple(_kron_states(v, D).expand(*lhs, T - 2, D, n) for v in (a * e2, b * e1, -a * e2))
    return local, tx, ty, cen


def build_step_rows(
    problem: OdeProblem, weights: tuple, central: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The row blocks x, y ``(*lhs_batch, Ts, p, n)`` of the canonical layout (module
    docstring), differentiable in the coefficients, steps and weights.

    Without central rows Ts = T, n = D*R and the rows of step t are its E equation rows, its
    D*K initial-value rows (zero for t >= S) and the 2*D*R Taylor rows of interval (t, t+1)
    (zero at t = T-1). With central rows Ts = ceil(T/2), n = 2*D*R: super-step j holds steps
    2j and 2j+1 and their equation and initial-value rows, the Taylor rows of intervals
    (2j, 2j+1) and (2j+1, 2j+2), the central rows anchored at 2j and 2j+1, and for odd T an
    identity block on the padding step (which makes its solution exactly 0, as in
    :func:`~smnn.solver.layout.pair_steps`).
    """
    local, tx, ty, cen = _natural_rows(problem, weights, central)
    T = problem.n_steps
    if not central:
        zero_y = torch.zeros_like(local)
        x = torch.cat([local, _pad_steps(tx, T)], dim=-2)
        y = torch.cat([zero_y, _pad_steps(ty, T)], dim=-2)
        return x, y
    Ts = (T + 1) // 2
    L = 2 * Ts
    n = local.shape[-1]
    la, lb = (_pad_steps(local, L)[..., i::2, :, :] for i in (0, 1))
    tx, ty = _pad_steps(tx, L), _pad_steps(ty, L)
    c0, c1, c2 = (_pad_steps(v, L) for v in cen)

    def row(*parts):
        return torch.cat(parts, dim=-1)

    def z(like):
        return torch.zeros_like(like)

    groups_x = [
        row(la, z(la)),  # equation / initial rows of step 2j
        row(z(lb), lb),  # ... of step 2j+1
        row(tx[..., 0::2, :, :], ty[..., 0::2, :, :]),  # Taylor (2j, 2j+1)
        row(z(tx[..., 1::2, :, :]), tx[..., 1::2, :, :]),  # Taylor (2j+1, 2j+2)
        row(c0[..., 0::2, :, :], c1[..., 0::2, :, :]),  # central at 2j
        row(z(c0[..., 1::2, :, :]), c0[..., 1::2, :, :]),  # central at 2j+1
    ]
    groups_y = [
        z(groups_x[0]),
        z(groups_x[1]),
        z(groups_x[2]),
        row(ty[..., 1::2, :, :], z(ty[..., 1::2, :, :])),
        row(c2[..., 0::2, :, :], z(c2[..., 0::2, :, :])),
        row(c1[..., 1::2, :, :], c2[..., 1::2, :, :]),
    ]
    if T % 2:  # identity rows on the padding step T (last super-step, second half)
        pad = torch.zeros(Ts, n, 2 * n, dtype=local.dtype, device=local.device)
        pad[-1, :, n:] = torch.eye(n, dtype=local.dtype, device=local.device)
        pad = pad.expand(*local.shape[:-3], Ts, n, 2 * n)
        groups_x.append(pad)
        groups_y.append(torch.zeros_like(pad))
    return torch.cat(groups_x, dim=-2), torch.cat(groups_y, dim=-2)


def build_step_rhs(
    problem: OdeProblem,
    rhs_equation: torch.Tensor,
    init_vars: torch.Tensor,
    weights: tuple,
    central: bool,
) -> torch.Tensor:
    """beta ``(*batch, Ts, p)``: the right-hand sides of the rows of :func:`build_step_rows`
    (w_eq b on the equation rows, w_in u0 on the initial-value rows, 0 elsewhere)."""
    w_eq, w_in, _ = weights
    T, D, R = problem.n_steps, problem.n_dims, problem.n_orders
    S, K, E = problem.n_init_var_steps, problem.n_init_orders, problem.n_equations
    batch = tuple(problem.batch_shape)
    b = (rhs_equation * w_eq).expand(*batch, T, E)
    u0 = (init_vars * w_in).expand(*batch, S, D, K).reshape(*batch, S, D * K)
    u0 = F.pad(u0, (0, 0, 0, T - S))
    local = torch.cat([b, u0], dim=-1)  # (*batch, T, pL)
    pL = local.shape[-1]
    if not central:
        n_taylor_rows = 2 * D * R
        return F.pad(local, (0, n_taylor_rows))
    Ts = (T + 1) // 2
    local = F.pad(local, (0, 0, 0, 2 * Ts - T))
    n_rest = 2 * (2 * D * (R - 1)) + 2 * D + (D * R if T % 2 else 0)
    paired = local.reshape(*batch, Ts, 2 * pL)
    return F.pad(paired, (0, n_rest))


# ------------------------------------------------------------------------------ the factor


@dataclass
class QRFactor:
    """The block-bidiagonal factor R of A (R^T R = A^T A) of N systems, from the QR sweep.

    A :class:`~smnn.solver.factor.Factor`: :meth:`solve` solves the normal equations
    M x = rhs with R (two triangular sweeps); :meth:`solve_rows` solves the least-squares
    problem for new row right-hand sides with the stored reflectors.

    Attributes:
        r: ``(N, Ts, n, n)`` upper triangular diagonal blocks R_s.
        s: ``(N, Ts-1, n, n)`` blocks S_s coupling u_s to u_{s+1}.
        failed_at: ``(N,)`` int64, 1 + the first step with a negligible diagonal of R, else 0.
        reflectors: ``(N, Ts, n+p, 2n)`` Householder vectors of every step (LAPACK compact
            form; the last step uses its first n columns), or None.
        taus: ``(N, Ts, 2n)`` their scalars, or None.
        orders: ``(N, Ts, n+p)`` int64, the row order of each stacked block (rows sorted by
            decreasing max-norm before the reflections, see :func:`_row_order`), or None.
    """

    r: torch.Tensor
    s: torch.Tensor
    failed_at: torch.Tensor
    reflectors: torch.Tensor | None = None
    taus: torch.Tensor | None = None
    orders: torch.Tensor | None = None

    def __post_init__(self):
        # G_s = R_s^{-1} S_s and H_s = R_s^{-T} S_{s-1}^T make each substitution step one
        # product; triangular solves for all steps at once, batched.
        self._g = torch.linalg.solve_triangular(self.r[:, :-1], self.s, upper=True)
        self._h = torch.linalg.solve_triangular(self.r[:, 1:].mT, self.s.mT, upper=False)

    @property
    def n_systems(self) -> int:
        return self.r.shape[0]

    @property
    def n_steps(self) -> int:
        return self.r.shape[1]

    @property
    def block_size(self) -> int:
        return self.r.shape[-1]

    def failed(self) -> torch.Tensor:
        """``(N,)`` bool: systems whose R has a negligible diagonal entry (rank deficient)."""
        return self.failed_at > 0

    def back_substitute(self, z: torch.Tensor) -> torch.Tensor:
        """u with R u = z, for ``z`` ``(N, Ts, n, P)``; returns ``(N, Ts, n, P)``."""
        y = torch.linalg.solve_triangular(self.r, z, upper=True)
        u = torch.empty_like(y)
        Ts = y.shape[1]
        u[:, Ts - 1] = y[:, Ts - 1]
        for t in range(Ts - 2, -1, -1):
            u[:, t] = y[:, t] - self._g[:, t] @ u[:, t + 1]
        return u

    def forward_substitute(self, g: torch.Tensor) -> torch.Tensor:
        """w with R^T w = g, for ``g`` ``(N, Ts, n, P)``; returns ``(N, Ts, n, P)``."""
        a = torch.linalg.solve_triangular(self.r.mT, g, upper=False)
        w = torch.empty_like(a)
        w[:, 0] = a[:, 0]
        for t in range(1, a.shape[1]):
            w[:, t] = a[:, t] - self._h[:, t - 1] @ w[:, t - 1]
        return w

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """x with (R^T R) x = rhs (the normal equations), ``rhs`` ``(N, Ts, n, P)``."""
        N, T, n = self.n_systems, self.n_steps, self.block_size
        if rhs.dim() != 4 or tuple(rhs.shape[:3]) != (N, T, n):
            raise ValueError(
                f"rhs must have shape (N={N}, T={T}, n={n}, P), got {tuple(rhs.shape)}"
            )
        return nan_failed(self.back_substitute(self.forward_substitute(rhs)), self.failed_at)

    def solve_rows(self, beta: torch.Tensor) -> torch.Tensor:
        """The least-squares solution u ``(N, Ts, n, P)`` for row right-hand sides ``beta``
        ``(N, Ts, p, P)``, by the stored reflectors (needs ``keep_reflectors=True``)."""
        if self.reflectors is None:
            raise ValueError("this QRFactor was made without keep_reflectors=True")
        N, Ts, n = self.n_systems, self.n_steps, self.block_size
        P = beta.shape[-1]
        z = beta.new_empty(N, Ts, n, P)
        carried = beta.new_zeros(N, n, P)
        for t in range(Ts):
            cols = n if t == Ts - 1 else 2 * n
            stacked = _gather_rows(torch.cat([carried, beta[:, t]], dim=-2), self.orders[:, t])
            rotated = torch.ormqr(
                self.reflectors[:, t, :, :cols], self.taus[:, t, :cols], stacked, transpose=True
            )
            z[:, t] = rotated[:, :n]
            carried = rotated[:, n : 2 * n]
        return nan_failed(self.back_substitute(z), self.failed_at)


def nan_failed(u: torch.Tensor, failed_at: torch.Tensor) -> torch.Tensor:
    """NaN for every entry of the systems that failed (no host synchronisation)."""
    dead = (failed_at > 0).reshape(-1, *([1] * (u.dim() - 1)))
    return u.masked_fill(dead, float("nan"))


def factorize_rows(
    x: torch.Tensor,
    y: torch.Tensor,
    beta: torch.Tensor | None = None,
    keep_reflectors: bool = False,
) -> tuple[QRFactor, torch.Tensor | None]:
    """The QR sweep (module docstring) over ``x``, ``y`` ``(N, Ts, p, n)``.

    Args:
        beta: ``(N, Ts, p, P)`` right-hand sides rotated along (z is returned), or None.
        keep_reflectors: store the Householder vectors for :meth:`QRFactor.solve_rows`.

    Returns:
        (factor, z): z ``(N, Ts, n, P)`` with R u = z, or None without ``beta``.
    """
    x, y = x.detach(), y.detach()
    N, Ts, p, n = x.shape
    if p < n:  # the stacked block needs at least 2n rows
        x = F.pad(x, (0, 0, 0, n - p))
        y = F.pad(y, (0, 0, 0, n - p))
        if beta is not None:
            beta = F.pad(beta, (0, 0, 0, n - p))
        p = n
    dtype, device = x.dtype, x.device
    tol = rank_tolerance(n, dtype)
    r = x.new_empty(N, Ts, n, n)
    s = x.new_empty(N, max(Ts - 1, 0), n, n)
    failed_at = torch.zeros(N, dtype=torch.int64, device=device)
    reflectors = x.new_zeros(N, Ts, n + p, 2 * n) if keep_reflectors else None
    taus = x.new_zeros(N, Ts, 2 * n) if keep_reflectors else None
    orders = (
        torch.empty(N, Ts, n + p, dtype=torch.int64, device=device) if keep_reflectors else None
    )
    z = None
    carried_rhs = None
    if beta is not None:
        beta = beta.detach()
        z = beta.new_empty(N, Ts, n, beta.shape[-1])
        carried_rhs = beta.new_zeros(N, n, beta.shape[-1])
    # ||a_j||: the norm of each unknown's column of A (the rows of its step and the coupling
    # rows of the step before), the scale its diagonal of R is measured against
    col_sq = x.square().sum(dim=-2)  # (N, Ts, n)
    col_sq[:, 1:] += y[:, :-1].square().sum(dim=-2)
    col_norm = col_sq.sqrt()
    carried = x.new_zeros(N, n, n)
    stacked = x.new_zeros(N, n + p, 2 * n)
    for t in range(Ts):
        last = t == Ts - 1
        cols = n if last else 2 * n
        stacked[:, :n, :n] = carried
        stacked[:, :n, n:] = 0.0
        stacked[:, n:, :n] = x[:, t]
        stacked[:, n:, n:] = y[:, t]
        order = _row_order(stacked)
        block = torch.gather(stacked[:, :, :cols], 1, order[..., None].expand(-1, -1, cols))
        a, tau = torch.geqrf(block)
        diag = a[:, :n, :n].diagonal(dim1=-2, dim2=-1).abs()
        bad = ~(diag > tol * col_norm[:, t]).all(dim=-1)
        failed_at = torch.where(bad & (failed_at == 0), t + 1, failed_at)
        r[:, t] = a[:, :n, :n].triu()
        if not last:
            s[:, t] = a[:, :n, n:]
            carried = a[:, n : 2 * n, n:].triu()
        if keep_reflectors:
            reflectors[:, t, :, :cols] = a
            taus[:, t, :cols] = tau
            orders[:, t] = order
        if beta is not None:
            rhs = _gather_rows(torch.cat([carried_rhs, beta[:, t]], dim=-2), order)
            rotated = torch.ormqr(a, tau, rhs, transpose=True)
            z[:, t] = rotated[:, :n]
            carried_rhs = rotated[:, n : 2 * n]
    factor = QRFactor(r, s, failed_at, reflectors, taus, orders)
    return factor, z


def _row_order(stacked: torch.Tensor) -> torch.Tensor:
    """``(N, rows)`` int64: the rows of each stacked block by decreasing max-norm.

    Householder QR is column-wise but not row-wise backward stable: rows whose norms differ by
    orders of magnitude (the Taylor row of order k scales as h^k, the carried triangle as the
    accumulated rows) lose the small rows' information unless the large rows come first
    (Powell and Reid's row sorting). Measured on the float32 long case (T=250, h=0.01): median
    error 3.9e-3 unsorted, 1.2e-5 sorted.
    """
    return stacked.abs().amax(dim=-1).argsort(dim=-1, descending=True, stable=True)


def _gather_rows(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``(N, rows, P)`` in ``order`` ``(N, rows)``."""
    return torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]))


# --------------------------------------------------------------------- differentiable solve


def apply_rows(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A v in row blocks: x_s v_s + y_s v_{s+1} ``(N, Ts, p, P)`` for v ``(N, Ts, n, P)``."""
    out = x @ v
    out[:, :-1] += y[:, :-1] @ v[:, 1:]
    return out


def refine_solution(factor, x, y, beta, u: torch.Tensor) -> torch.Tensor:
    """One step of mixed-precision refinement of a float32 solution (corrected semi-normal
    equations): r = beta - A u and A^T r in float64, then u + (R^T R)^{-1} A^T r with the
    float32 factor (any object whose ``solve`` applies (R^T R)^{-1}: :class:`QRFactor`, or the
    Triton engine's). Shapes: x, y ``(N, Ts, p, n)``, beta ``(N, Ts, p, P)``, u
    ``(N, Ts, n, P)``; returns u's shape and dtype.

    A^T r vanishes at the exact solution and is computed without cancellation in float64, so
    the correction carries no residual term; the error contracts by about cond(A)^2 * eps32
    per step. Measured on the float32 cases of tests/test_qr.py (median error against the
    augmented sparse solve): KdV-like 2.5e-5 -> 7.9e-8, Lorenz-like 9.2e-6 -> 4.1e-8, long
    (T=4000) 3.3e-5 -> 1.0e-5, growing (T=2000) 3.2e-4 -> 8.8e-6. Cost: one residual, one
    A^T r (batched over the steps) and two substitution sweeps with R.
    """
    xd, yd, bd = x.double(), y.double(), beta.double()
    ud = u.double()
    atr = apply_rows_t(xd, yd, bd - apply_rows(xd, yd, ud))
    du = factor.solve(atr.to(u.dtype))
    return (ud + du.double()).to(u.dtype)


def apply_rows_t(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A^T r in row blocks: x_s^T r_s + y_{s-1}^T r_{s-1} ``(N, Ts, n, P)``."""
    out = x.mT @ r
    out[:, 1:] += y[:, :-1].mT @ r[:, :-1]
    return out


class _QRLeastSquares(torch.autograd.Function):
    """u = argmin ||A u - beta|| for A given by the row blocks x, y (module docstring).

    forward(x (N,Ts,p,n), y (N,Ts,p,n), beta (N,Ts,p,P), sweep) -> u (N,Ts,n,P) and
    failed_at (N,) (see :class:`QRFactor`). ``sweep(x, y, beta)`` (detached tensors) returns
    the unrefined u (NaN for failed systems) and a factor whose ``solve`` applies
    (R^T R)^{-1} (:func:`qr_least_squares` gives the torch path's; the Triton engine passes
    its kernel's); float32 solutions are then refined once (:func:`refine_solution`).
    Backward: :func:`least_squares_backward` with that factor.
    """

    @staticmethod
    def forward(ctx, x, y, beta, sweep):
        u, factor = sweep(x.detach(), y.detach(), beta.detach())
        if u.dtype == torch.float32:
            u = refine_solution(factor, x.detach(), y.detach(), beta.detach(), u)
        ctx.factor = factor
        ctx.save_for_backward(x, y, beta, u)
        failed_at = factor.failed_at.clone()
        ctx.mark_non_differentiable(failed_at)
        return u, failed_at

    @staticmethod
    def backward(ctx, grad_u, _grad_failed):
        x, y, beta, u = ctx.saved_tensors
        grads = least_squares_backward(ctx.factor, x, y, beta, u, grad_u, ctx.needs_input_grad[:3])
        return (*grads, None)


def least_squares_backward(factor, x, y, beta, u, grad_u, needs_input_grad):
    """The gradients of u = argmin ||A u - beta|| (A in row blocks x, y ``(N, Ts, p, n)``,
    beta ``(N, Ts, p, P)``, u ``(N, Ts, n, P)``) for the upstream gradient ``grad_u``
    ``(N, Ts, n, P)``: lambda = (R^T R)^{-1} g by ``factor.solve`` (refined once in float32,
    residual in float64), r = beta - A u, dl/dbeta = A lambda,
    dl/dx_s = r_s lambda_s^T - (A lambda)_s u_s^T, dl/dy_s = r_s lambda_{s+1}^T -
    (A lambda)_s u_{s+1}^T. ``factor`` is any object whose ``solve`` applies (R^T R)^{-1}
    (:class:`QRFactor`, or the Triton engine's). Returns (grad_x, grad_y, grad_beta), None
    where ``needs_input_grad`` (three bools) says it is not needed."""
    lam = factor.solve(grad_u.contiguous())
    if lam.dtype == torch.float32:  # one refinement step, residual in float64
        xd, yd = x.detach().double(), y.detach().double()
        resid = grad_u.double() - apply_rows_t(xd, yd, apply_rows(xd, yd, lam.double()))
        lam = (lam.double() + factor.solve(resid.to(lam.dtype)).double()).to(lam.dtype)
    a_lam = apply_rows(x, y, lam)
    grad_x = grad_y = grad_beta = None
    if needs_input_grad[0] or needs_input_grad[1]:
        res = beta - apply_rows(x, y, u)
        if needs_input_grad[0]:
            grad_x = res @ lam.mT - a_lam @ u.mT
        if needs_input_grad[1]:
            grad_y = torch.zeros_like(y)
            grad_y[:, :-1] = res[:, :-1] @ lam[:, 1:].mT - a_lam[:, :-1] @ u[:, 1:].mT
    if needs_input_grad[2]:
        grad_beta = a_lam
    return grad_x, grad_y, grad_beta


def qr_least_squares(
    x: torch.Tensor,
    y: torch.Tensor,
    beta: torch.Tensor,
    factor: QRFactor | None = None,
    sweep=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable least-squares solution of the row blocks (shapes in the module docstring).

    Args:
        x, y: ``(N, Ts, p, n)``; beta: ``(N, Ts, p, P)``.
        factor: a :class:`QRFactor` of x, y made with ``keep_reflectors=True`` (then only
            beta is rotated), or None (factorize and rotate in one sweep).
        sweep: instead of the torch path, ``sweep(x, y, beta) -> (u, factor)`` on detached
            tensors (u unrefined, NaN for failed systems; ``factor.solve`` applies
            (R^T R)^{-1}): the Triton engine's kernel.

    Returns:
        u ``(N, Ts, n, P)`` (NaN for failed systems) and failed_at ``(N,)`` int64
        (1 + first rank-deficient step, 0 where fine).
    """
    if sweep is None:
        sweep = functools.partial(_torch_sweep, factor=factor)
    return _QRLeastSquares.apply(x, y, beta, sweep)


def _torch_sweep(x, y, beta, factor: QRFactor | None):
    """(u, factor) by the torch path: factorize and rotate beta in one pass, or rotate beta by
    the reflectors of ``factor``."""
    if factor is None:
        factor, z = factorize_rows(x, y, beta)
        return nan_failed(factor.back_substitute(z), factor.failed_at), factor
    return factor.solve_rows(beta), factor


# ------------------------------------------------------------------------------ API entries


def folded_rhs(problem, folding, weights, central) -> torch.Tensor:
    """beta ``(N, Ts, p, P)``: the row right-hand sides of ``problem``, folded by ``folding``
    (a :class:`~smnn.solver.layout.BatchFolding`)."""
    beta = build_step_rhs(problem, problem.rhs_equation, problem.init_vars, weights, central)
    return folding.fold_rhs(beta)


def unfold_solution(u: torch.Tensor, problem: OdeProblem, folding, central) -> torch.Tensor:
    """The canonical solution ``(N, Ts, n, P)`` back to ``(*batch, T, D, R)``."""
    T, D, R = problem.n_steps, problem.n_dims, problem.n_orders
    u = folding.unfold(u)  # (*batch, Ts, n)
    if central:
        u = unpair_solution(u, T)
    return u.reshape(*problem.batch_shape, T, D, R)


def qr_ode_forward(
    problem: OdeProblem, weights: tuple, central: bool, check_pivots: bool
) -> torch.Tensor:
    """u ``(*batch, T, D, R)`` of ``problem`` (values already checked) by the QR sweep,
    differentiable in every input and tensor weight.

    The rows are built at the left-hand side's batch shape (``problem.lhs_batch_shape``), the
    rest of the batch rides along as right-hand-side columns. ``check_pivots``: raise
    :class:`~smnn.solver.banded.NonPositivePivotError` naming rank-deficient batch entries;
    off, they come back NaN.
    """
    folding = BatchFolding(tuple(problem.batch_shape), tuple(problem.lhs_batch_shape))
    x, y = (folding.fold_lhs(v) for v in build_step_rows(problem, weights, central))
    beta = folded_rhs(problem, folding, weights, central)
    u, failed_at = qr_least_squares(x, y, beta)
    if check_pivots:
        raise_if_failed(failed_at, tuple(problem.lhs_batch_shape), rank=True)
    return unfold_solution(u, problem, folding, central)


@dataclass
class QRLeftHandSide:
    """A QR-factorized left-hand side, reusable for many right-hand sides.

    Attributes:
        factor: the :class:`QRFactor` (with reflectors).
        x, y: the folded row blocks ``(N, Ts, p, n)`` it was made from (detached; the
            backward pass to the right-hand sides needs A lambda).
        central, lhs_batch_shape, weights: as in the call that made it.
    """

    factor: QRFactor
    x: torch.Tensor
    y: torch.Tensor
    central: bool
    lhs_batch_shape: torch.Size
    weights: tuple

    def solve(self, problem: OdeProblem, check_values: bool) -> torch.Tensor:
        """u ``(*batch, T, D, R)`` for the right-hand sides of ``problem``; gradients reach
        ``problem.rhs_equation`` and ``problem.init_vars``."""
        if check_values:
            check_finite("rhs_equation", problem.rhs_equation)
            check_finite("init_vars", problem.init_vars)
        folding = BatchFolding(tuple(problem.batch_shape), tuple(self.lhs_batch_shape))
        beta = folded_rhs(problem, folding, self.weights, self.central)
        u, _ = qr_least_squares(self.x, self.y, beta, self.factor)
        return unfold_solution(u, problem, folding, self.central)


def qr_factorize_problem(
    problem: OdeProblem, weights: tuple, central: bool, check_pivots: bool
) -> QRLeftHandSide:
    """Factorize the rows of ``problem``'s coefficients and steps (its right-hand sides are
    not used) and keep the reflectors (module docstring)."""
    folding = BatchFolding(tuple(problem.batch_shape), tuple(problem.lhs_batch_shape))
    with torch.no_grad():
        x, y = (folding.fold_lhs(v).detach() for v in build_step_rows(problem, weights, central))
        factor, _ = factorize_rows(x, y, keep_reflectors=True)
    if check_pivots:
        raise_if_failed(factor, tuple(problem.lhs_batch_shape), rank=True)
    return QRLeftHandSide(factor, x, y, central, problem.lhs_batch_shape, weights)
