"""Dense, row-by-row least-squares systems: oracles of every solver (docs/solver.md 2, 6, 7).

Nothing here is fast or memory-efficient on purpose. Every row of the over-determined systems is
written out one at a time, exactly as the spec states it, so that the faster solvers can be checked
against a statement that is easy to read. Only the batch axes are vectorised.

- :func:`build_dense_system` / :func:`dense_reference`: the S-MNN system A u = beta ("The
over-determined linear system"),
  solved in the least-squares sense by a dense QR factorization.
- :func:`build_mnn_dense_system`: the rows C z = r of the original MNN over z = [eps, u]
  ("Baselines from the original MNN"), the oracle for :mod:`smnn.solver.mnn`.

Unknowns are flattened in (t, d, k) order: u[t, d, k] sits at column (t*D + d)*R + k (plus 1 in the
MNN system, whose column 0 is the slack variable eps).

Everything is built from torch ops (index assignment into a zeros tensor), so autograd carries
gradients to the coefficients, right-hand sides, initial values, steps and tensor-valued weights.
"""

from __future__ import annotations

import math

import torch

from smnn.solver.inputs import OdeProblem, check_weight, prepare_problem

__all__ = ["build_dense_system", "dense_reference", "build_mnn_dense_system"]

Weight = float | torch.Tensor


def _expanded_inputs(
    problem: OdeProblem,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four inputs expanded (as views) to the full batch shape and full step counts.

    Returns c ``(*batch, T, E, D, R)``, b ``(*batch, T, E)``, u0 ``(*batch, S, D, K)`` and
    h ``(*batch, T-1)``.
    """
    B = tuple(problem.batch_shape)
    T, S = problem.n_steps, problem.n_init_var_steps
    E, D, R, K = problem.n_equations, problem.n_dims, problem.n_orders, problem.n_init_orders
    c = problem.coefficients.expand(*B, T, E, D, R)
    b = problem.rhs_equation.expand(*B, T, E)
    u0 = problem.init_vars.expand(*B, S, D, K)
    h = problem.steps.expand(*B, T - 1)
    return c, b, u0, h


def _as_weight(value: Weight, like: torch.Tensor) -> torch.Tensor:
    """A scalar weight as a 0-dim tensor with the dtype and device of ``like`` (keeps autograd)."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _column(t: int, d: int, k: int, n_dims: int, n_orders: int) -> int:
    """Column of u[t, d, k] in the (t, d, k) flattening."""
    return (t * n_dims + d) * n_orders + k


def build_dense_system(
    coefficients: torch.Tensor,
    rhs_equation: torch.Tensor,
    init_vars: torch.Tensor,
    steps: torch.Tensor,
    n_steps: int | None = None,
    n_init_var_steps: int | None = None,
    weight_equation: Weight = 1.0,
    weight_init_var: Weight = 1.0,
    weight_smooth: Weight = 1.0,
    enable_central_smoothness: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The over-determined S-MNN system A u = beta of docs/solver.md, "The over-determined linear
    system", row by row.

    Args:
        coefficients: c ``(..., T or 1, E, D, R)``.
        rhs_equation: b ``(..., T or 1, E)``.
        init_vars: u0 ``(..., S or 1, D, K)``.
        steps: h ``(..., T-1 or 1)``, positive.
        n_steps: T (default ``steps.shape[-1] + 1``).
        n_init_var_steps: S (default ``init_vars.shape[-3]``).
        weight_equation, weight_init_var, weight_smooth: positive scalar row weights
            (python numbers or 0-dim tensors, which then receive gradients).
        enable_central_smoothness: drop the top order from the Taylor rows and add the central
            rows (needs R >= 2).

    Returns:
        A ``(*batch, n_rows, T*D*R)`` and beta ``(*batch, n_rows)``, with ``batch`` the broadcast
        batch shape of the four inputs. Row order: equation rows (t, e); initial-value rows
        (t < S, d, k < K); Taylor rows (t, d, k, forward then backward); central rows (t, d).

    Raises:
        ValueError: bad shapes or values (see :func:`~smnn.solver.inputs.prepare_problem`), bad
            weights, or central smoothness with R < 2.
    """
    problem = prepare_problem(
        coefficients, rhs_equation, init_vars, steps, n_steps, n_init_var_steps
    )
    check_weight("weight_equation", weight_equation)
    check_weight("weight_init_var", weight_init_var)
    check_weight("weight_smooth", weight_smooth)
    central = bool(enable_central_smoothness)
    T, S = problem.n_steps, problem.n_init_var_steps
    E, D, R, K = problem.n_equations, problem.n_dims, problem.n_orders, problem.n_init_orders
    if central and R < 2:
        raise ValueError(
            f"enable_central_smoothness needs n_orders R >= 2 (coefficients has R={R})"
        )
    c, b, u0, h = _expanded_inputs(problem)
    w_eq = _as_weight(weight_equation, c)
    w_in = _as_weight(weight_init_var, c)
    w_s = _as_weight(weight_smooth, c)

    n_taylor = R - 1 if central else R
    n_rows = T * E + S * D * K + 2 * (T - 1) * D * n_taylor + (max(T - 2, 0) * D if central else 0)
    n_cols = T * D * R
    batch = tuple(problem.batch_shape)
    A = c.new_zeros(*batch, n_rows, n_cols)
    beta = c.new_zeros(*batch, n_rows)

    def col(t: int, d: int, k: int) -> int:
        return _column(t, d, k, D, R)

    row = 0
    # 1. equation rows: w_eq * sum_{d,k} c[t,e,d,k] u[t,d,k] = w_eq * b[t,e]
    for t in range(T):
        for e in range(E):
            for d in range(D):
                for k in range(R):
                    A[..., row, col(t, d, k)] = w_eq * c[..., t, e, d, k]
            beta[..., row] = w_eq * b[..., t, e]
            row += 1
    # 2. initial-value rows: w_in * u[t,d,k] = w_in * u0[t,d,k] for t < S, k < K
    for t in range(S):
        for d in range(D):
            for k in range(K):
                A[..., row, col(t, d, k)] = w_in
                beta[..., row] = w_in * u0[..., t, d, k]
                row += 1
    # 3. Taylor rows between steps t and t+1 (right-hand side 0)
    for t in range(T - 1):
        ht = h[..., t]
        for d in range(D):
            for k in range(n_taylor):
                # forward: sum_{o>=k} h^o/(o-k)! u[t,d,o] - h^k u[t+1,d,k]
                for o in range(k, R):
                    A[..., row, col(t, d, o)] = w_s * ht**o / math.factorial(o - k)
                A[..., row, col(t + 1, d, k)] = -w_s * ht**k
                row += 1
                # backward: sum_{o>=k} (-h)^o/(o-k)! u[t+1,d,o] - (-h)^k u[t,d,k]
                for o in range(k, R):
                    A[..., row, col(t + 1, d, o)] = w_s * (-ht) ** o / math.factorial(o - k)
                A[..., row, col(t, d, k)] = -w_s * (-ht) ** k
                row += 1
    # 4. central rows: s^(R-3) u[t,d,R-2] + s^(R-2) u[t+1,d,R-1] - s^(R-3) u[t+2,d,R-2]
    if central:
        for t in range(T - 2):
            s = h[..., t] + h[..., t + 1]
            for d in range(D):
                A[..., row, col(t, d, R - 2)] = w_s * s ** (R - 3)
                A[..., row, col(t + 1, d, R - 1)] = w_s * s ** (R - 2)
                A[..., row, col(t + 2, d, R - 2)] = -w_s * s ** (R - 3)
                row += 1
    assert row == n_rows
    return A, beta


def dense_reference(
    coefficients: torch.Tensor,
    rhs_equation: torch.Tensor,
    init_vars: torch.Tensor,
    steps: torch.Tensor,
    n_steps: int | None = None,
    n_init_var_steps: int | None = None,
    weight_equation: Weight = 1.0,
    weight_init_var: Weight = 1.0,
    weight_smooth: Weight = 1.0,
    enable_central_smoothness: bool = False,
) -> torch.Tensor:
    """The least-squares solution u = argmin ||A u - beta|| of :func:`build_dense_system`.

    Solved by a reduced QR factorization A = Q R and a triangular solve R u = Q^T beta; autograd
    differentiates through both, so this is also the reference for gradients. Cost
    O(T^3 (D R)^3): small problems only.

    Args: as :func:`build_dense_system`.

    Returns:
        u ``(*batch, T, D, R)``.
    """
    A, beta = build_dense_system(
        coefficients,
        rhs_equation,
        init_vars,
        steps,
        n_steps,
        n_init_var_steps,
        weight_equation,
        weight_init_var,
        weight_smooth,
        enable_central_smoothness,
    )
    Q, Rf = torch.linalg.qr(A, mode="reduced")
    y = Q.mT @ beta.unsqueeze(-1)
    u = torch.linalg.solve_triangular(Rf, y, upper=True).squeeze(-1)
    D, R = coefficients.shape[-2], coefficients.shape[-1]
    return u.unflatten(-1, (A.shape[-1] // (D * R), D, R))


def build_mnn_dense_system(
    coefficients: torch.Tensor,
    rhs_equation: torch.Tensor,
    init_vars: torch.Tensor,
    steps: torch.Tensor,
    n_steps: int | None = None,
    n_init_var_steps: int | None = None,
    weight_equation: Weight = 1.0,
    weight_init_var: Weight = 1.0,
    weight_smooth: Weight = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows C z = r of the original MNN (docs/solver.md, "Baselines from the original MNN"), row
    by row.

    Unknown z = [eps, u]: column 0 is the slack eps, u[t, d, k] is column 1 + (t*D + d)*R + k.
    Rows (the weights default to 1, which is the spec; a weight multiplies its whole row,
    right-hand side and eps coefficient included):

    - equation rows (t, e): w_eq * sum_{d,k} c[t,e,d,k] u[t,d,k] = w_eq * b[t,e]
    - initial rows (t < S, d, k < K): w_in * u[t,d,k] = w_in * u0[t,d,k]
    - forward Taylor rows (t < T-1, d, k <= R-2):
      w_s * (eps + sum_{o>=k} h_t^o/(o-k)! u[t,d,o] - h_t^k u[t+1,d,k]) = 0
    - backward Taylor rows (t < T-1, d, k <= R-2):
      w_s * (eps + sum_{o>=k} (-h_t)^o/(o-k)! u[t+1,d,o] - (-h_t)^k u[t,d,k]) = 0
    - central rows (t = 1..T-2, d), s = h_{t-1} + h_t:
      w_s * (eps - s^(R-3) u[t-1,d,R-2] + s^(R-3) u[t+1,d,R-2] - s^(R-2) u[t,d,R-1]) = 0

    The MNN solution is z = (C^T C)^{-1} (C^T r + gamma * alpha * e_0).

    Args: as :func:`build_dense_system` (there is no central switch: the MNN always has its
        central rows). Needs R >= 2.

    Returns:
        C ``(*batch, n_rows, 1 + T*D*R)`` and r ``(*batch, n_rows)``.
    """
    problem = prepare_problem(
        coefficients, rhs_equation, init_vars, steps, n_steps, n_init_var_steps
    )
    check_weight("weight_equation", weight_equation)
    check_weight("weight_init_var", weight_init_var)
    check_weight("weight_smooth", weight_smooth)
    T, S = problem.n_steps, problem.n_init_var_steps
    E, D, R, K = problem.n_equations, problem.n_dims, problem.n_orders, problem.n_init_orders
    if R < 2:
        raise ValueError(
            f"the MNN system needs n_orders R >= 2 (coefficients has R={R}): its Taylor rows "
            "cover orders 0..R-2 and its central rows orders R-2 and R-1"
        )
    c, b, u0, h = _expanded_inputs(problem)
    w_eq = _as_weight(weight_equation, c)
    w_in = _as_weight(weight_init_var, c)
    w_s = _as_weight(weight_smooth, c)

    n_rows = T * E + S * D * K + 2 * (T - 1) * D * (R - 1) + max(T - 2, 0) * D
    batch = tuple(problem.batch_shape)
    C = c.new_zeros(*batch, n_rows, 1 + T * D * R)
    r = c.new_zeros(*batch, n_rows)

    def col(t: int, d: int, k: int) -> int:
        return 1 + _column(t, d, k, D, R)

    row = 0
    for t in range(T):
        for e in range(E):
            for d in range(D):
                for k in range(R):
                    C[..., row, col(t, d, k)] = w_eq * c[..., t, e, d, k]
            r[..., row] = w_eq * b[..., t, e]
            row += 1
    for t in range(S):
        for d in range(D):
            for k in range(K):
                C[..., row, col(t, d, k)] = w_in
                r[..., row] = w_in * u0[..., t, d, k]
                row += 1
    for t in range(T - 1):
        ht = h[..., t]
        for d in range(D):
            for k in range(R - 1):
                C[..., row, 0] = w_s
                for o in range(k, R):
                    C[..., row, col(t, d, o)] = w_s * ht**o / math.factorial(o - k)
                C[..., row, col(t + 1, d, k)] = -w_s * ht**k
                row += 1
                C[..., row, 0] = w_s
                for o in range(k, R):
                    C[..., row, col(t + 1, d, o)] = w_s * (-ht) ** o / math.factorial(o - k)
                C[..., row, col(t, d, k)] = -w_s * (-ht) ** k
                row += 1
    for t in range(1, T - 1):
        s = h[..., t - 1] + h[..., t]
        for d in range(D):
            C[..., row, 0] = w_s
            C[..., row, col(t - 1, d, R - 2)] = -w_s * s ** (R - 3)
            C[..., row, col(t + 1, d, R - 2)] = w_s * s ** (R - 3)
            C[..., row, col(t, d, R - 1)] = -w_s * s ** (R - 2)
            row += 1
    assert row == n_rows
    return C, r
