"""Baselines from the original MNN (SOLVER_SPEC section 6): dense Cholesky and conjugate gradient.

The original MNN solves a least-squares problem over z = [eps, u] with one slack variable eps per
system (column 0):

- equation rows and initial-value rows as in S-MNN (no eps);
- forward and backward Taylor rows for the orders k = 0..R-2, each with +eps;
- central rows on the top order for t = 1..T-2, each with +eps;

see :func:`smnn.solver.reference.build_mnn_dense_system` for the rows written out one by one.
With C the stacked rows and r their right-hand sides the solution is

    z = (C^T C)^{-1} (C^T r + gamma * alpha * e_0).

The eps column touches every Taylor and central row, so C^T C is dense: O(T^2) memory and O(T^3)
time for the dense solver. That is the point of the baseline.

Weights (all 1 by default, which is the spec): ``weight_equation`` multiplies the equation rows,
``weight_init_var`` the initial-value rows and ``weight_smooth`` the Taylor and central rows (each
whole row, eps coefficient and right-hand side included), so C^T C carries the squared weights,
as in S-MNN.

- :func:`mnn_dense`: builds C^T C densely (vectorised, no loop over steps) and solves it by a
  dense Cholesky factorization; the backward pass reuses the factor (one more pair of triangular
  solves) and autograd carries the result through the assembly of C^T C.
- :func:`mnn_cg`: conjugate gradient on C^T C applied matrix-free in O(T) per product, batched
  over all systems with per-system convergence; gradients by implicit differentiation (a second
  CG solve in the backward pass).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smnn.solver.banded import NonPositivePivotError
from smnn.solver.inputs import OdeProblem, check_weight, prepare_problem

__all__ = ["mnn_dense", "mnn_cg", "MNNConvergenceWarning"]

Weight = float | torch.Tensor


class MNNConvergenceWarning(UserWarning):
    """Conjugate gradient stopped at ``max_iter`` before reaching ``tol`` for some systems."""


# ----------------------------------------------------------------------------- the operator C


@dataclass
class _MnnOperator:
    """The rows of C in structured form (no dense matrix), differentiable w.r.t. the inputs.

    Every smoothness coefficient already includes w_s and every equation coefficient w_eq.
    Batch shapes: ``*bc`` is the coefficient batch shape, ``*bh`` the step batch shape.

    Attributes:
        coef: ``(*bc, T, E, D, R)``, w_eq * c (equation rows).
        w_in: 0-dim, initial-row weight.  w_s: 0-dim, smoothness weight (eps coefficient).
        fwd_full: ``(*bh, T-1, R-1, R)``, forward row k, coefficient of u[t, d, o].
        fwd_diag: ``(*bh, T-1, R-1)``, forward row k, coefficient of u[t+1, d, k].
        bwd_full: ``(*bh, T-1, R-1, R)``, backward row k, coefficient of u[t+1, d, o].
        bwd_diag: ``(*bh, T-1, R-1)``, backward row k, coefficient of u[t, d, k].
        cen_side: ``(*bh, T-2)``, w_s s^(R-3) for the central row at step t+1 (s = h_t + h_{t+1});
            coefficient -cen_side on u[t, d, R-2] and +cen_side on u[t+2, d, R-2].
        cen_mid: ``(*bh, T-2)``, w_s s^(R-2); coefficient -cen_mid on u[t+1, d, R-1].
        n_steps, n_init_steps, n_dims, n_orders, n_init_orders: T, S, D, R, K.
    """

    coef: torch.Tensor
    w_in: torch.Tensor
    w_s: torch.Tensor
    fwd_full: torch.Tensor
    fwd_diag: torch.Tensor
    bwd_full: torch.Tensor
    bwd_diag: torch.Tensor
    cen_side: torch.Tensor
    cen_mid: torch.Tensor
    n_steps: int
    n_init_steps: int
    n_dims: int
    n_orders: int
    n_init_orders: int

    @property
    def n_unknowns(self) -> int:
        """1 + T*D*R (eps first)."""
        return 1 + self.n_steps * self.n_dims * self.n_orders

    @property
    def n_smooth_rows(self) -> int:
        """Number of rows carrying eps: 2 (T-1) D (R-1) Taylor rows plus (T-2) D central rows."""
        T, D, R = self.n_steps, self.n_dims, self.n_orders
        return 2 * (T - 1) * D * (R - 1) + max(T - 2, 0) * D

    def detach(self) -> _MnnOperator:
        """The same operator cut from the autograd graph."""
        out = {}
        for name, value in self.__dict__.items():
            out[name] = value.detach() if isinstance(value, torch.Tensor) else value
        return _MnnOperator(**out)

    def apply(self, eps: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Row values C z for z = [eps, u].

        Args:
            eps: ``(*batch,)``.  u: ``(*batch, T, D, R)``.

        Returns:
            (y_eq ``(*batch, T, E)``, y_in ``(*batch, S, D, K)``, y_fwd ``(*batch, T-1, D, R-1)``,
            y_bwd ``(*batch, T-1, D, R-1)``, y_cen ``(*batch, T-2, D)``).
        """
        S, R, K = self.n_init_steps, self.n_orders, self.n_init_orders
        y_eq = (self.coef * u.unsqueeze(-3)).sum((-1, -2))
        y_in = self.w_in * u[..., :S, :, :K]
        ew = (self.w_s * eps)[..., None, None, None]
        y_fwd = (
            ew
            + (self.fwd_full.unsqueeze(-3) * u[..., :-1, :, None, :]).sum(-1)
            + self.fwd_diag.unsqueeze(-2) * u[..., 1:, :, : R - 1]
        )
        y_bwd = (
            ew
            + (self.bwd_full.unsqueeze(-3) * u[..., 1:, :, None, :]).sum(-1)
            + self.bwd_diag.unsqueeze(-2) * u[..., :-1, :, : R - 1]
        )
        side = self.cen_side.unsqueeze(-1)
        y_cen = (
            (self.w_s * eps)[..., None, None]
            - side * u[..., :-2, :, R - 2]
            + side * u[..., 2:, :, R - 2]
            - self.cen_mid.unsqueeze(-1) * u[..., 1:-1, :, R - 1]
        )
        return y_eq, y_in, y_fwd, y_bwd, y_cen

    def apply_transpose(
        self,
        y_eq: torch.Tensor,
        y_in: torch.Tensor,
        y_fwd: torch.Tensor,
        y_bwd: torch.Tensor,
        y_cen: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """C^T y for row values shaped like the output of :meth:`apply`.

        Returns:
            (eps part ``(*batch,)``, u part ``(*batch, T, D, R)``).
        """
        T, S, R, K = self.n_steps, self.n_init_steps, self.n_orders, self.n_init_orders
        eps_out = self.w_s * (
            y_fwd.sum((-1, -2, -3)) + y_bwd.sum((-1, -2, -3)) + y_cen.sum((-1, -2))
        )
        u_out = (self.coef * y_eq[..., None, None]).sum(-3)
        u_out = u_out + F.pad(self.w_in * y_in, (0, R - K, 0, 0, 0, T - S))
        # Taylor rows: parts on step t (first T-1 steps) and on step t+1 (last T-1 steps)
        on_t = (self.fwd_full.unsqueeze(-3) * y_fwd.unsqueeze(-1)).sum(-2) + F.pad(
            self.bwd_diag.unsqueeze(-2) * y_bwd, (0, 1)
        )
        on_next = (self.bwd_full.unsqueeze(-3) * y_bwd.unsqueeze(-1)).sum(-2) + F.pad(
            self.fwd_diag.unsqueeze(-2) * y_fwd, (0, 1)
        )
        u_out = u_out + F.pad(on_t, (0, 0, 0, 0, 0, 1)) + F.pad(on_next, (0, 0, 0, 0, 1, 0))
        # central rows: orders R-2 (steps t-1 and t+1) and R-1 (step t), t = 1..T-2
        side_y = self.cen_side.unsqueeze(-1) * y_cen
        order_lo = F.pad(-side_y, (0, 0, 0, 2)) + F.pad(side_y, (0, 0, 2, 0))
        order_hi = F.pad(-self.cen_mid.unsqueeze(-1) * y_cen, (0, 0, 1, 1))
        u_out = u_out + F.pad(torch.stack([order_lo, order_hi], dim=-1), (R - 2, 0))
        return eps_out, u_out

    def gram_apply(self, z: torch.Tensor) -> torch.Tensor:
        """(C^T C) z in O(T): ``(*batch, 1 + T*D*R)`` -> same shape."""
        T, D, R = self.n_steps, self.n_dims, self.n_orders
        eps = z[..., 0]
        u = z[..., 1:].reshape(*z.shape[:-1], T, D, R)
        eps_out, u_out = self.apply_transpose(*self.apply(eps, u))
        return torch.cat([eps_out.unsqueeze(-1), u_out.flatten(-3)], dim=-1)

    def dense_gram(self) -> torch.Tensor:
        """The dense normal matrix C^T C ``(*lhs_batch, 1 + T*D*R, 1 + T*D*R)``, vectorised.

        The u-part is block banded: each group of rows only touches a window of steps, so its
        Gram matrix is a small local matrix per window (one step for equation rows, two for the
        Taylor rows of one interval, three for a central row). The local Gram matrices and the
        eps couplings (row sums times w_s) are scattered into the dense matrix with index tensors
        (accumulating overlaps); autograd flows through the scatter to the local pieces.
        """
        T, S, D, R, K = (
            self.n_steps,
            self.n_init_steps,
            self.n_dims,
            self.n_orders,
            self.n_init_orders,
        )
        m = D * R
        n = self.n_unknowns
        dtype, device = self.coef.dtype, self.coef.device
        lhs_batch = torch.broadcast_shapes(self.coef.shape[:-4], self.fwd_full.shape[:-3])
        N = math.prod(lhs_batch)

        def ar(k: int) -> torch.Tensor:
            return torch.arange(k, device=device)

        rows: list[torch.Tensor] = []
        cols: list[torch.Tensor] = []
        vals: list[torch.Tensor] = []

        def add(r_idx: torch.Tensor, c_idx: torch.Tensor, v: torch.Tensor) -> None:
            """Queue G[r_idx, c_idx] += v; v ``(*batch_v, *P)`` broadcasts to (*lhs_batch, *P),
            with P the broadcast shape of the index tensors."""
            r_idx, c_idx = torch.broadcast_tensors(r_idx, c_idx)
            v = v.expand(*lhs_batch, *r_idx.shape).reshape(N, -1)
            rows.append(r_idx.reshape(-1))
            cols.append(c_idx.reshape(-1))
            vals.append(v.T)

        # equation rows: C_t^T C_t on the diagonal block of step t
        ct = self.coef.reshape(*self.coef.shape[:-2], m)  # (*bc, T, E, m)
        pos = 1 + ar(T)[:, None] * m + ar(m)  # (T, m)
        add(pos[:, :, None], pos[:, None, :], ct.mT @ ct)

        # initial rows: w_in^2 on the diagonal at (t < S, d, k < K)
        pos = 1 + (ar(S)[:, None, None] * D + ar(D)[:, None]) * R + ar(K)  # (S, D, K)
        w_in2 = (self.w_in**2).expand(S, D, K)
        add(pos, pos, w_in2)

        # Taylor rows of interval t: local rows over (u[t, d, :], u[t+1, d, :]), same for all d
        fwd = torch.cat([self.fwd_full, F.pad(torch.diag_embed(self.fwd_diag), (0, 1))], -1)
        bwd = torch.cat([F.pad(torch.diag_embed(self.bwd_diag), (0, 1)), self.bwd_full], -1)
        local = torch.cat([fwd, bwd], -2)  # (*bh, T-1, 2R-2, 2R)
        i = ar(2 * R)
        pos = 1 + ((ar(T - 1)[:, None, None] + i // R) * D + ar(D)[:, None]) * R + i % R
        # pos: (T-1, D, 2R)
        add(pos[..., :, None], pos[..., None, :], (local.mT @ local).unsqueeze(-3))
        coupling = (self.w_s * local.sum(-2)).unsqueeze(-2)  # (*bh, T-1, 1, 2R)
        add(torch.zeros_like(pos), pos, coupling)
        add(pos, torch.zeros_like(pos), coupling)

        # central rows at step t+1 over u[t, d, R-2], u[t+1, d, R-1], u[t+2, d, R-2]
        if T > 2:
            v = torch.stack([-self.cen_side, -self.cen_mid, self.cen_side], -1)  # (*bh, T-2)
            step = ar(T - 2)[:, None, None] + ar(3)  # (T-2, 1)
            order = torch.tensor([R - 2, R - 1, R - 2], device=device)
            pos = 1 + (step * D + ar(D)[:, None]) * R + order  # (T-2, D)
            outer = (v.unsqueeze(-1) * v.unsqueeze(-2)).unsqueeze(-3)  # (*bh, T-2, 1, 3)
            add(pos[..., :, None], pos[..., None, :], outer)
            coupling = (self.w_s * v).unsqueeze(-2)  # (*bh, T-2, 1)
            add(torch.zeros_like(pos), pos, coupling)
            add(pos, torch.zeros_like(pos), coupling)

        # eps-eps: one w_s^2 per smoothness row
        zero = torch.zeros(1, dtype=torch.long, device=device)
        add(zero, zero, (self.w_s**2 * self.n_smooth_rows).reshape(1))

        gram = torch.zeros(n, n, N, dtype=dtype, device=device)
        gram = gram.index_put(
            (torch.cat(rows), torch.cat(cols)), torch.cat(vals, dim=0), accumulate=True
        )
        return gram.permute(2, 0, 1).reshape(*lhs_batch, n, n)


# ----------------------------------------------------------------------------- setup


def _as_scalar(value: Weight, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _check_real(name: str, value) -> None:
    """A finite real scalar (python number or 0-dim tensor)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        ok = bool(torch.isfinite(value.detach()))
    else:
        try:
            ok = math.isfinite(float(value))
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a finite number, got {value!r}") from None
    if not ok:
        raise ValueError(f"{name} must be finite, got {value!r}")


def _setup(
    coefficients: torch.Tensor,
    rhs_equation: torch.Tensor,
    init_vars: torch.Tensor,
    steps: torch.Tensor,
    n_steps: int | None,
    n_init_var_steps: int | None,
    weights: tuple[Weight, Weight, Weight],
    gamma: Weight,
    alpha: Weight,
    check_inputs: bool,
) -> tuple[OdeProblem, _MnnOperator, torch.Tensor]:
    """Validate, build the structured operator and the right-hand side C^T r + gamma alpha e_0.

    Returns:
        (problem, operator, rhs ``(*batch, 1 + T*D*R)``).
    """
    problem = prepare_problem(
        coefficients,
        rhs_equation,
        init_vars,
        steps,
        n_steps,
        n_init_var_steps,
        check_values=check_inputs,
    )
    weight_names = ("weight_equation", "weight_init_var", "weight_smooth")
    for name, w in zip(weight_names, weights, strict=True):
        check_weight(name, w)
    check_weight("gamma", gamma)
    _check_real("alpha", alpha)
    T, S = problem.n_steps, problem.n_init_var_steps
    E, D, R, K = problem.n_equations, problem.n_dims, problem.n_orders, problem.n_init_orders
    if R < 2:
        raise ValueError(
            f"the MNN baselines need n_orders R >= 2 (coefficients has R={R}): the Taylor rows "
            "cover orders 0..R-2 and the central rows orders R-2 and R-1"
        )
    c, b, u0, h = problem.coefficients, problem.rhs_equation, problem.init_vars, problem.steps
    w_eq, w_in, w_s = (_as_scalar(w, c) for w in weights)

    coef = w_eq * c.expand(*c.shape[:-4], T, E, D, R)
    h = h.expand(*h.shape[:-1], T - 1)
    powers = h.unsqueeze(-1) ** torch.arange(R, dtype=c.dtype, device=c.device)  # (*bh, T-1, R)
    signs = torch.tensor([(-1.0) ** o for o in range(R)], dtype=c.dtype, device=c.device)
    taylor = torch.zeros(R - 1, R, dtype=c.dtype, device=c.device)  # 1/(o-k)! for o >= k
    for k in range(R - 1):
        for o in range(k, R):
            taylor[k, o] = 1.0 / math.factorial(o - k)
    s = h[..., :-1] + h[..., 1:]  # (*bh, T-2): s for the central row at step t+1
    op = _MnnOperator(
        coef=coef,
        w_in=w_in,
        w_s=w_s,
        fwd_full=w_s * taylor * powers.unsqueeze(-2),
        fwd_diag=-w_s * powers[..., : R - 1],
        bwd_full=w_s * taylor * (signs * powers).unsqueeze(-2),
        bwd_diag=-w_s * (signs * powers)[..., : R - 1],
        cen_side=w_s * s ** (R - 3),
        cen_mid=w_s * s ** (R - 2),
        n_steps=T,
        n_init_steps=S,
        n_dims=D,
        n_orders=R,
        n_init_orders=K,
    )

    # C^T r: only equation rows (w_eq b) and initial rows (w_in u0) have a right-hand side
    batch = tuple(problem.batch_shape)
    b = b.expand(*b.shape[:-2], T, E)
    u0 = u0.expand(*u0.shape[:-3], S, D, K)
    u_rhs = (coef * (w_eq * b)[..., None, None]).sum(-3)
    u_rhs = u_rhs + F.pad(w_in**2 * u0, (0, R - K, 0, 0, 0, T - S))
    u_rhs = u_rhs.expand(*batch, T, D, R).flatten(-3)
    eps_rhs = (_as_scalar(gamma, c) * _as_scalar(alpha, c)).expand(*batch, 1)
    return problem, op, torch.cat([eps_rhs, u_rhs], dim=-1)


def _split(z: torch.Tensor, problem: OdeProblem, return_eps: bool):
    u = z[..., 1:].reshape(*z.shape[:-1], problem.n_steps, problem.n_dims, problem.n_orders)
    return (u, z[..., 0]) if return_eps else u


# ----------------------------------------------------------------------------- dense


class _DenseCholeskySolve(torch.autograd.Function):
    """z = G^{-1} rhs by a dense Cholesky factorization, with an O(n^2) backward.

    Forward: G = L L^T (``torch.linalg.cholesky_ex``), z = ``cholesky_solve(rhs, L)``.
    Backward (G symmetric): lambda = G^{-1} g with the stored factor, then dl/drhs = lambda and
    dl/dG = -lambda z^T (entries of G taken as independent; the symmetric construction of G sends
    both positions back to the same inputs). This gives the same gradients as autograd through
    the factorization, without its O(n^3) backward.

    Shapes: gram ``(*lhs_batch, n, n)``, rhs ``(*batch, n)`` (lhs_batch broadcasts to batch).
    """

    @staticmethod
    def forward(ctx, gram, rhs):
        factor, info = torch.linalg.cholesky_ex(gram)
        failed = info != 0
        if bool(failed.any()):
            entries = [tuple(int(i) for i in idx) for idx in torch.nonzero(failed)[:10].tolist()]
            raise NonPositivePivotError(
                f"mnn_dense: C^T C is not positive definite for {int(failed.sum())} of "
                f"{failed.numel()} systems (batch indices {entries}); check for all-zero "
                "coefficients or extreme steps"
            )
        z = torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
        ctx.save_for_backward(factor, z)
        ctx.gram_shape = gram.shape
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z):
        factor, z = ctx.saved_tensors
        lam = torch.cholesky_solve(grad_z.unsqueeze(-1), factor).squeeze(-1)
        grad_gram = None
        if ctx.needs_input_grad[0]:
            grad_gram = (-lam.unsqueeze(-1) * z.unsqueeze(-2)).sum_to_size(ctx.gram_shape)
        return grad_gram, lam


def mnn_dense(
    coefficients: torch.Tensor,
    rhs_equation: torch.Tensor,
    init_vars: torch.Tensor,
    steps: torch.Tensor,
    n_steps: int | None = None,
    n_init_var_steps: int | None = None,
    weight_equation: Weight = 1.0,
    weight_init_var: Weight = 1.0,
    weight_smooth: Weight = 1.0,
    gamma: Weight = 0.05,
    alpha: Weight = 0.0,
    check_inputs: bool = True,
    return_eps: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The original MNN "dense" solver: dense C^T C and a dense Cholesky solve.

    z = (C^T C)^{-1} (C^T r + gamma * alpha * e_0) over z = [eps, u] (see the module docstring).
    Memory O(batch * (T D R)^2), time O(batch * (T D R)^3). Differentiable: autograd through the
    vectorised assembly of C^T C, and a custom backward for the solve that reuses the Cholesky
    factor (lambda = (C^T C)^{-1} g, dl/d(C^T C) = -lambda z^T: O((T D R)^2), no second
    factorization). The normal matrix is kept at the broadcast batch shape of
    the coefficients and steps (shared left-hand sides are factorized once).

    Args:
        coefficients: c ``(..., T or 1, E, D, R)``, R >= 2.
        rhs_equation: b ``(..., T or 1, E)``.
        init_vars: u0 ``(..., S or 1, D, K)``.
        steps: h ``(..., T-1 or 1)``, positive.
        n_steps, n_init_var_steps: T and S when they cannot be read off the shapes.
        weight_equation, weight_init_var, weight_smooth: positive row weights (module docstring).
        gamma: positive scalar (weight of ||z||^2 in the MNN quadratic program).
        alpha: real scalar (linear cost on eps); only the product gamma * alpha enters.
        check_inputs: check values (finite, positive steps); shapes are always checked.
        return_eps: also return the slack variable.

    Returns:
        u ``(*batch, T, D, R)``, or (u, eps ``(*batch,)``) when ``return_eps``.

    Raises:
        ValueError: bad inputs, naming the argument.
        NonPositivePivotError: C^T C is not numerically positive definite for some batch entries.
    """
    problem, op, rhs = _setup(
        coefficients,
        rhs_equation,
        init_vars,
        steps,
        n_steps,
        n_init_var_steps,
        (weight_equation, weight_init_var, weight_smooth),
        gamma,
        alpha,
        check_inputs,
    )
    z = _DenseCholeskySolve.apply(op.dense_gram(), rhs)
    return _split(z, problem, return_eps)


# ----------------------------------------------------------------------------- CG


def _conjugate_gradient(
    gram_apply, rhs: torch.Tensor, max_iter: int, tol: float
) -> tuple[torch.Tensor, dict]:
    """Batched CG for G x = rhs, G symmetric positive definite, x_0 = 0. No autograd.

    Each system stops on its own once its CG residual satisfies ||r_k|| <= tol * ||rhs|| (its
    iterate is then frozen while the others continue); at most ``max_iter`` iterations.

    Args:
        gram_apply: x ``(*batch, n)`` -> G x ``(*batch, n)``.
        rhs: ``(*batch, n)``.

    Returns:
        x ``(*batch, n)`` and info: ``iterations`` (int64 ``(*batch,)``), ``relative_residual``
        (``(*batch,)``, ||r_k|| / ||rhs|| of the CG recurrence, 0 for a zero right-hand side),
        ``converged`` (bool ``(*batch,)``).
    """
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(-1)
    rhs_norm = rs.sqrt()
    threshold = tol * rhs_norm
    active = rs.sqrt() > threshold
    iterations = torch.zeros(rhs.shape[:-1], dtype=torch.long, device=rhs.device)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        gp = gram_apply(p)
        p_gp = (p * gp).sum(-1)
        step = torch.where(active, rs / torch.where(active, p_gp, torch.ones_like(p_gp)), 0.0)
        x = x + step.unsqueeze(-1) * p
        r = r - step.unsqueeze(-1) * gp
        rs_new = (r * r).sum(-1)
        ratio = torch.where(active, rs_new / torch.where(active, rs, torch.ones_like(rs)), 0.0)
        p = r + ratio.unsqueeze(-1) * p
        rs = torch.where(active, rs_new, rs)
        iterations = iterations + active.long()
        active = active & (rs.sqrt() > threshold)
    safe_norm = rhs_norm.clamp_min(torch.finfo(rhs.dtype).tiny)
    rel = torch.where(rhs_norm > 0, rs.sqrt() / safe_norm, 0.0)
    converged = rs.sqrt() <= threshold
    return x, {"iterations": iterations, "relative_residual": rel, "converged": converged}


def _warn_if_not_converged(info: dict, max_iter: int, tol: float, where: str) -> None:
    bad = ~info["converged"]
    if bool(bad.any()):
        worst = float(info["relative_residual"].max())
        warnings.warn(
            f"mnn_cg ({where}): {int(bad.sum())} of {bad.numel()} systems did not converge in "
            f"max_iter={max_iter} iterations (worst relative residual {worst:.3g} > tol={tol:g})",
            MNNConvergenceWarning,
            stacklevel=3,
        )


class _ImplicitCGSolve(torch.autograd.Function):
    """Returns the (detached) CG solution z*; its backward runs a second CG solve.

    The solution is defined implicitly by Q(theta, z) = C^T r + gamma alpha e_0 - (C^T C) z = 0.
    The caller builds Q(theta, z*) with autograd from the inputs theta and a detached z*, so its
    value is ~0 and dQ/dtheta is the partial derivative at fixed z. Implicit differentiation gives
    dz*/dtheta = (C^T C)^{-1} dQ/dtheta, hence for an upstream gradient g = dl/dz*:
    dl/dtheta = lambda^T dQ/dtheta with lambda = (C^T C)^{-1} g (C^T C is symmetric). Returning
    lambda as the gradient of Q lets autograd finish the chain rule lambda^T dQ/dtheta.
    """

    @staticmethod
    def forward(ctx, residual, z_star, op, max_iter, tol):  # noqa: D401 - autograd signature
        ctx.op = op
        ctx.max_iter = max_iter
        ctx.tol = tol
        return z_star.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z):
        lam, info = _conjugate_gradient(ctx.op.gram_apply, grad_z, ctx.max_iter, ctx.tol)
        _warn_if_not_converged(info, ctx.max_iter, ctx.tol, "backward")
        return lam, None, None, None, None


def mnn_cg(
    coefficients: torch.Tensor,
    rhs_equation: torch.Tensor,
    init_vars: torch.Tensor,
    steps: torch.Tensor,
    n_steps: int | None = None,
    n_init_var_steps: int | None = None,
    weight_equation: Weight = 1.0,
    weight_init_var: Weight = 1.0,
    weight_smooth: Weight = 1.0,
    gamma: Weight = 0.05,
    alpha: Weight = 0.0,
    check_inputs: bool = True,
    return_eps: bool = False,
    max_iter: int = 200,
    tol: float = 1e-12,
    return_info: bool = False,
):
    """The original MNN "sparse" solver: conjugate gradient on C^T C z = C^T r + gamma alpha e_0.

    C^T C is never formed: each CG iteration applies C and then C^T through structured tensor
    ops, O(batch * T * D * R^2) work and memory. All systems iterate together from z_0 = 0; each
    stops once ||r_k|| <= tol * ||rhs|| (r_k the CG residual), at most ``max_iter`` iterations.
    If some systems do not converge, a :class:`MNNConvergenceWarning` says how many and the
    worst relative residual (their last iterate is returned). Gradients come from implicit
    differentiation: the backward pass solves (C^T C) lambda = dl/dz by CG with the same
    ``max_iter`` and ``tol`` (and warns the same way); no double backward.

    Args: as :func:`mnn_dense`, plus
        max_iter: positive int, iteration cap (forward and backward).
        tol: positive relative tolerance.
        return_info: also return a dict with per-system ``iterations`` (int64 ``(*batch,)``),
            ``relative_residual`` (``(*batch,)``) and ``converged`` (bool ``(*batch,)``) of the
            forward solve.

    Returns:
        u ``(*batch, T, D, R)``; (u, eps) when ``return_eps``; info appended when
        ``return_info``: (u, info) or (u, eps, info).
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        raise ValueError(f"tol must be a positive number, got {tol!r}") from None
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be finite and > 0, got {tol!r}")
    problem, op, rhs = _setup(
        coefficients,
        rhs_equation,
        init_vars,
        steps,
        n_steps,
        n_init_var_steps,
        (weight_equation, weight_init_var, weight_smooth),
        gamma,
        alpha,
        check_inputs,
    )
    op_const = op.detach()
    with torch.no_grad():
        z_star, info = _conjugate_gradient(op_const.gram_apply, rhs.detach(), max_iter, tol)
    _warn_if_not_converged(info, max_iter, tol, "forward")

    if torch.is_grad_enabled() and (rhs.requires_grad or _op_requires_grad(op)):
        # residual-shaped input Q(theta) = C^T r + gamma alpha e_0 - (C^T C) z*, value ~0
        residual = rhs - op.gram_apply(z_star)
        z = _ImplicitCGSolve.apply(residual, z_star, op_const, max_iter, tol)
    else:
        z = z_star
    out = _split(z, problem, return_eps)
    if not return_info:
        return out
    return (*out, info) if return_eps else (out, info)


def _op_requires_grad(op: _MnnOperator) -> bool:
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in op.__dict__.values())
