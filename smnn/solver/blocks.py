"""Blocks of the normal equations M u = r, built straight from the inputs (docs/solver.md 3).

M = A^T A is symmetric block tridiagonal (block pentadiagonal with central rows) with blocks of size
m = D*R over the unknowns u[t] in (d, k) order. Nothing of size T^2 and no row of A is ever formed:

- ``diag``: ``(*lhs_batch, T, m, m)``, M_t
- ``sub``:  ``(*lhs_batch, T-1, m, m)``, M_{t+1,t}
- ``sub2``: ``(*lhs_batch, T-2, m, m)``, M_{t+2,t} (central smoothness only, else None)
- ``rhs``:  ``(*batch, T, m)``, r_t = w_eq^2 C_t^T b_t + w_in^2 [u0_t; 0]

The left-hand side depends only on the coefficients and the steps, so its batch shape is the
broadcast of those two inputs (``lhs_batch``), which can be much smaller than the full batch when
coefficients or steps are shared. Every operation is a torch op, so autograd carries gradients from
the blocks back to the inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from smnn.solver.inputs import OdeProblem

__all__ = ["NormalBlocks", "build_lhs_blocks", "build_rhs", "taylor_gram_matrices"]


class NormalBlocks:
    """The left-hand-side blocks of M (see module docstring for shapes)."""

    def __init__(self, diag: torch.Tensor, sub: torch.Tensor, sub2: torch.Tensor | None):
        self.diag = diag
        self.sub = sub
        self.sub2 = sub2


def taylor_gram_matrices(
    n_orders: int, n_taylor_orders: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Constant R x R matrices G0, G1, G2 of the Taylor smoothness rows.

    With e_k = w_s h_t^k, interval t contributes (e_i e_j G0[i,j]) to M_t, (e_i e_j G1[i,j]) to
    M_{t+1} and (e_i e_j G2[i,j]) to M_{t+1,t}. Only Taylor rows k < ``n_taylor_orders`` exist
    (R, or R-1 when central smoothness is on). With F[i,j] = 1/(j-i)! (j >= i), S = diag((-1)^k)
    and P = diag(k < n_taylor_orders):
    G0 = F^T P F + P,  G1 = S F^T P F S + P,  G2 = -(P F + S F^T P S).
    """
    R = n_orders
    Fm = torch.zeros(R, R, dtype=torch.float64)
    for i in range(R):
        for j in range(i, R):
            Fm[i, j] = 1.0 / math.factorial(j - i)
    S = torch.diag(torch.tensor([(-1.0) ** k for k in range(R)], dtype=torch.float64))
    P = torch.diag((torch.arange(R) < n_taylor_orders).to(torch.float64))
    G0 = Fm.T @ P @ Fm + P
    G1 = S @ Fm.T @ P @ Fm @ S + P
    G2 = -(P @ Fm + S @ Fm.T @ P @ S)
    return tuple(g.to(dtype=dtype, device=device) for g in (G0, G1, G2))


def _kron_states(block_r: torch.Tensor, n_dims: int) -> torch.Tensor:
    """Block-diagonal repeat over states: ``(..., R, R)`` -> ``(..., D*R, D*R)``."""
    if n_dims == 1:
        return block_r
    R = block_r.shape[-1]
    eye = torch.eye(n_dims, dtype=block_r.dtype, device=block_r.device)
    out = block_r[..., None, :, None, :] * eye[:, None, :, None]
    return out.reshape(*block_r.shape[:-2], n_dims * R, n_dims * R)


def _pad_time(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Zero-pad the time axis (dim -3) of ``(..., t, a, b)``."""
    return F.pad(x, (0, 0, 0, 0, before, after))


def _smoothness_blocks(
    steps: torch.Tensor,
    n_steps: int,
    n_orders: int,
    weight_smooth,
    central: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Smoothness (and central) contributions per state, in R x R blocks.

    Args:
        steps: ``(*batch_h, T-1 or 1)``.
    Returns:
        diag ``(*batch_h, T, R, R)``, sub ``(*batch_h, T-1, R, R)``, sub2 ``(*batch_h, T-2, R, R)``
        or None.
    """
    T, R = n_steps, n_orders
    h = steps.expand(*steps.shape[:-1], T - 1)
    dtype, device = h.dtype, h.device
    n_taylor = R - 1 if central else R
    G0, G1, G2 = taylor_gram_matrices(R, n_taylor, dtype, device)

    orders = torch.arange(R, device=device, dtype=dtype)
    e = h[..., None] ** orders  # (*, T-1, R): h^k
    outer = e[..., :, None] * e[..., None, :] * (weight_smooth * weight_smooth)  # (*, T-1, R, R)
    diag = _pad_time(outer * G0, 0, 1) + _pad_time(outer * G1, 1, 0)
    sub = outer * G2
    sub2 = None
    if central:
        # rows for t = 0..T-3: w_s (a u[t,R-2] + b u[t+1,R-1] - a u[t+2,R-2]),
        # a = s^(R-3), b = s^(R-2), s = h_t + h_{t+1}
        s = h[..., :-1] + h[..., 1:]  # (*, T-2)
        w2 = weight_smooth * weight_smooth
        a = s ** (R - 3)
        bb = s ** (R - 2)
        i2, i1 = R - 2, R - 1
        unit = torch.zeros(R, R, dtype=dtype, device=device)
        E22 = unit.clone()
        E22[i2, i2] = 1.0
        E11 = unit.clone()
        E11[i1, i1] = 1.0
        E12 = unit.clone()
        E12[i1, i2] = 1.0  # row (t+1, R-1), column (t, R-2)
        E21 = unit.clone()
        E21[i2, i1] = 1.0  # row (t+2, R-2), column (t+1, R-1)
        aa = (w2 * a * a)[..., None, None]
        ab = (w2 * a * bb)[..., None, None]
        b2 = (w2 * bb * bb)[..., None, None]
        diag = (
            diag + _pad_time(aa * E22, 0, 2) + _pad_time(b2 * E11, 1, 1) + _pad_time(aa * E22, 2, 0)
        )
        sub = sub + _pad_time(ab * E12, 0, 1) - _pad_time(ab * E21, 1, 0)
        sub2 = -aa * E22
    return diag, sub, sub2


def build_lhs_blocks(
    problem: OdeProblem,
    weight_equation=1.0,
    weight_init_var=1.0,
    weight_smooth=1.0,
    central: bool = False,
) -> NormalBlocks:
    """Blocks of M from the coefficients, steps and weights (docs/solver.md, "Structure of M").

    Returns blocks at ``problem.lhs_batch_shape`` (coefficients and steps broadcast only).
    """
    c, h = problem.coefficients, problem.steps
    T, D, R = problem.n_steps, problem.n_dims, problem.n_orders
    S, K = problem.n_init_var_steps, problem.n_init_orders
    m = D * R
    diag_r, sub_r, sub2_r = _smoothness_blocks(h, T, R, weight_smooth, central)
    diag = _kron_states(diag_r, D)
    sub = _kron_states(sub_r, D)
    sub2 = _kron_states(sub2_r, D) if sub2_r is not None else None

    # equation rows: w_eq^2 C_t^T C_t, C_t = c[t] as (E, m)
    ct = c.reshape(*c.shape[:-2], m)  # (*bc, Tc, E, m)
    gram = torch.matmul(ct.transpose(-1, -2), ct) * (weight_equation * weight_equation)
    diag = diag + gram  # broadcasts Tc = 1 over T and the batch dims

    # initial-value rows: w_in^2 on the diagonal entries (d, k < K) of M_t for t < S
    init_mask = torch.zeros(T, D, R, dtype=c.dtype, device=c.device)
    init_mask[:S, :, :K] = 1.0
    init_diag = torch.diag_embed(init_mask.reshape(T, m)) * (weight_init_var * weight_init_var)
    diag = diag + init_diag

    lhs_shape = problem.lhs_batch_shape
    diag = diag.expand(*lhs_shape, T, m, m)
    sub = sub.expand(*lhs_shape, T - 1, m, m)
    if sub2 is not None:
        sub2 = sub2.expand(*lhs_shape, T - 2, m, m)
    return NormalBlocks(diag, sub, sub2)


def build_rhs(
    problem: OdeProblem,
    rhs_equation: torch.Tensor,
    init_vars: torch.Tensor,
    coefficients: torch.Tensor | None = None,
    weight_equation=1.0,
    weight_init_var=1.0,
) -> torch.Tensor:
    """Right-hand side r = A^T beta: ``(*batch, T, m)``.

    r_t = w_eq^2 C_t^T b_t + w_in^2 [u0_t ; 0] (u0 padded with zeros for orders k >= K and for
    steps t >= S).

    Args:
        rhs_equation: ``(*batch_b, T or 1, E)``.
        init_vars: ``(*batch_u, S or 1, D, K)``.
        coefficients: ``(*batch_c, T or 1, E, D, R)``; defaults to ``problem.coefficients``.
    """
    c = problem.coefficients if coefficients is None else coefficients
    T, D, R = problem.n_steps, problem.n_dims, problem.n_orders
    S, K = problem.n_init_var_steps, problem.n_init_orders
    m = D * R
    ct = c.reshape(*c.shape[:-2], m)  # (*bc, Tc, E, m)
    eq = (ct * rhs_equation[..., None]).sum(-2) * (weight_equation * weight_equation)
    eq = eq.expand(*eq.shape[:-2], T, m)  # (*, T, m)

    u0 = F.pad(init_vars, (0, R - K))  # (*bu, S or 1, D, R)
    u0 = u0.expand(*u0.shape[:-3], S, D, R).reshape(*u0.shape[:-3], S, m)
    u0 = F.pad(u0, (0, 0, 0, T - S)) * (weight_init_var * weight_init_var)  # (*bu, T, m)

    r = eq + u0
    return r.expand(*problem.batch_shape, T, m)
