"""The standalone validation's catalogue: linear ODEs with closed-form solutions
(docs/experiments.md, "Standalone validation").

Six constant-coefficient linear ODEs from ODEBench (ids 1, 2, 9, 24, 25) plus a third-order
equation, each with its initial conditions (:data:`EQUATIONS`; 11 cases), on the grid
t = 0, 0.01, ..., 9.99 (T = 1000, :func:`time_grid`) in float64, with two references for
y, y', y'':

- the closed-form solution (derived below, per equation), and
- scipy's ``solve_ivp`` (DOP853, rtol 1e-10, atol 1e-12) on the equation as written in the table
  (:func:`ivp_solution`).

How a case becomes solver inputs (:func:`solver_inputs`):

- Every equation is given to the solvers as a first-order system, so R = 3 (orders y, y', y'')
  and one initial value of order 0 per state suffice, also for the third-order equation. For an
  n-th order equation sum_k a_k x^(k) = r (a_n = 1) the states are z_i = x^(i), i < n (D = n),
  with E = n equation rows per step: z_i' - z_{i+1} = 0 for i < n-1, and
  z_{n-1}' + sum_k a_k z_k = r. The initial values x(0), ..., x^(n-1)(0) are the order-0 values
  of the n states at t = 0 (S = 1, K = 1). y, y', y'' are orders 0, 1, 2 of state 0.
  (Giving the solver the scalar equation instead, with the initial values as orders 0..n-1 of
  one state, is also valid but less accurate for the oscillators at R = 3: the scalar harmonic
  oscillator reaches max |error| 2e-3 on y, the system 2e-4.)
- Each equation row has a unit coefficient on the highest derivative, e.g. RC circuit:
  x' + x/(c1 c2) = c0/c2.
- The third-order equation has one initial condition (the table gives one), every other
  equation two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp

__all__ = [
    "STEP",
    "N_STEPS",
    "N_ORDERS",
    "ORDER_NAMES",
    "IVP_RTOL",
    "IVP_ATOL",
    "LinearOde",
    "EQUATIONS",
    "relaxation",
    "damped_cosine",
    "time_grid",
    "ivp_solution",
    "solver_inputs",
]

STEP = 0.01
N_STEPS = 1000
N_ORDERS = 3  # R: orders y, y', y'' of every state
ORDER_NAMES = ("y", "dy", "ddy")  # the three derivative orders that are compared
IVP_RTOL = 1e-10
IVP_ATOL = 1e-12

# --------------------------------------------------------------------------------------------
# Closed forms
# --------------------------------------------------------------------------------------------


def relaxation(t: np.ndarray, x0: float, rate: float, x_inf: float) -> np.ndarray:
    """x(t) = x_inf + (x0 - x_inf) exp(-rate t), the solution of x' = -rate (x - x_inf).

    Returns ``(3, len(t))``: x, x', x''. (Each derivative multiplies by -rate.)
    """
    e = (x0 - x_inf) * np.exp(-rate * t)
    return np.stack([x_inf + e, -rate * e, rate**2 * e])


def damped_cosine(
    t: np.ndarray, sigma: float, omega: float, p: float, q: float, offset: float = 0.0
) -> np.ndarray:
    """x(t) = offset + exp(-sigma t) (p cos(omega t) + q sin(omega t)).

    Differentiating keeps the form, with (p, q) -> (q omega - sigma p, -p omega - sigma q).
    Returns ``(3, len(t))``: x, x', x''.
    """
    out = []
    for k in range(3):
        x = np.exp(-sigma * t) * (p * np.cos(omega * t) + q * np.sin(omega * t))
        out.append(x + offset if k == 0 else x)
        p, q = q * omega - sigma * p, -p * omega - sigma * q
    return np.stack(out)


def _rc_closed(t: np.ndarray, ic: tuple[float, ...], c: tuple[float, ...]) -> np.ndarray:
    # x' = (c0 - x/c1)/c2 = -(x - c0 c1) / (c1 c2)
    return relaxation(t, ic[0], 1.0 / (c[1] * c[2]), c[0] * c[1])


def _growth_closed(t: np.ndarray, ic: tuple[float, ...], c: tuple[float, ...]) -> np.ndarray:
    # x' = c0 x  ->  x = x0 exp(c0 t)
    return relaxation(t, ic[0], -c[0], 0.0)


def _language_closed(t: np.ndarray, ic: tuple[float, ...], c: tuple[float, ...]) -> np.ndarray:
    # x' = (1 - x) c0 - x c1 = -(c0 + c1) (x - c0/(c0 + c1))
    rate = c[0] + c[1]
    return relaxation(t, ic[0], rate, c[0] / rate)


def _harmonic_closed(t: np.ndarray, ic: tuple[float, ...], c: tuple[float, ...]) -> np.ndarray:
    # x'' = -c0 x  ->  x = x0 cos(w t) + (v0 / w) sin(w t), w = sqrt(c0)
    omega = math.sqrt(c[0])
    return damped_cosine(t, 0.0, omega, ic[0], ic[1] / omega)


def _damped_closed(t: np.ndarray, ic: tuple[float, ...], c: tuple[float, ...]) -> np.ndarray:
    # x'' + c1 x' + c0 x = 0, under-damped (c1^2 < 4 c0): roots -sigma +- i w,
    # sigma = c1/2, w = sqrt(c0 - sigma^2); x(0) = p, x'(0) = q w - sigma p.
    sigma = c[1] / 2.0
    omega = math.sqrt(c[0] - sigma**2)
    return damped_cosine(t, sigma, omega, ic[0], (ic[1] + sigma * ic[0]) / omega)


def _third_order_closed(t: np.ndarray, ic: tuple[float, ...], c: tuple[float, ...]) -> np.ndarray:
    # x''' + x'' + x' = 0: roots 0 and -1/2 +- i sqrt(3)/2, so x = C + exp(-sigma t)(P cos + Q sin).
    # v = x' solves v'' + v' + v = 0: v = exp(-sigma t)(A cos + B sin), A = x'(0),
    # B = (x''(0) + sigma A) / w. Matching v to the derivative of x,
    # (Q w - sigma P, -P w - sigma Q) = (A, B), gives P, Q; then C = x(0) - P.
    sigma, omega = 0.5, math.sqrt(3.0) / 2.0
    a = ic[1]
    b = (ic[2] + sigma * a) / omega
    norm = sigma**2 + omega**2
    p = (-sigma * a - omega * b) / norm
    q = (omega * a - sigma * b) / norm
    return damped_cosine(t, sigma, omega, p, q, offset=ic[0] - p)


# --------------------------------------------------------------------------------------------
# The equations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearOde:
    """One test equation.

    ``top_derivative(z, c)`` is the equation as written in the table: x^(n) from the lower orders
    ``z`` = (x, ..., x^(n-1)) (shape ``(n, ...)``). ``linear_form(c)`` is the same equation as
    (a_0..a_n, r) with sum_k a_k x^(k) = r and a_n = 1, the form the solvers take.
    ``closed_form(t, ic, c)`` returns ``(3, len(t))``: x, x', x''.
    """

    key: str
    ode_id: str
    name: str
    equation: str
    order: int
    constants: tuple[float, ...]
    initial_conditions: tuple[tuple[float, ...], ...]
    top_derivative: Callable[[np.ndarray, tuple[float, ...]], np.ndarray]
    linear_form: Callable[[tuple[float, ...]], tuple[tuple[float, ...], float]]
    closed_form: Callable[[np.ndarray, tuple[float, ...], tuple[float, ...]], np.ndarray]


EQUATIONS: tuple[LinearOde, ...] = (
    LinearOde(
        key="rc_circuit",
        ode_id="1",
        name="RC circuit",
        equation="x' = (c0 - x/c1)/c2",
        order=1,
        constants=(0.7, 1.2, 2.31),
        initial_conditions=((10.0,), (3.54,)),
        top_derivative=lambda z, c: (c[0] - z[0] / c[1]) / c[2],
        linear_form=lambda c: ((1.0 / (c[1] * c[2]), 1.0), c[0] / c[2]),
        closed_form=_rc_closed,
    ),
    LinearOde(
        key="population_growth",
        ode_id="2",
        name="population growth",
        equation="x' = c0 x",
        order=1,
        constants=(0.23,),
        initial_conditions=((4.78,), (0.87,)),
        top_derivative=lambda z, c: c[0] * z[0],
        linear_form=lambda c: ((-c[0], 1.0), 0.0),
        closed_form=_growth_closed,
    ),
    LinearOde(
        key="language_death",
        ode_id="9",
        name="language death",
        equation="x' = (1-x) c0 - x c1",
        order=1,
        constants=(0.32, 0.28),
        initial_conditions=((0.14,), (0.55,)),
        top_derivative=lambda z, c: (1.0 - z[0]) * c[0] - z[0] * c[1],
        linear_form=lambda c: ((c[0] + c[1], 1.0), c[0]),
        closed_form=_language_closed,
    ),
    LinearOde(
        key="harmonic_oscillator",
        ode_id="24",
        name="harmonic oscillator",
        equation="x'' = -c0 x",
        order=2,
        constants=(2.1,),
        initial_conditions=((0.4, -0.03), (0.0, 0.2)),
        top_derivative=lambda z, c: -c[0] * z[0],
        linear_form=lambda c: ((c[0], 0.0, 1.0), 0.0),
        closed_form=_harmonic_closed,
    ),
    LinearOde(
        key="damped_oscillator",
        ode_id="25",
        name="damped harmonic oscillator",
        equation="x'' = -c0 x - c1 x'",
        order=2,
        constants=(4.5, 0.43),
        initial_conditions=((0.12, 0.043), (0.0, -0.3)),
        top_derivative=lambda z, c: -c[0] * z[0] - c[1] * z[1],
        linear_form=lambda c: ((c[0], c[1], 1.0), 0.0),
        closed_form=_damped_closed,
    ),
    LinearOde(
        key="third_order",
        ode_id="-",
        name="third order",
        equation="x''' = -x'' - x'",
        order=3,
        constants=(),
        initial_conditions=((0.0, -1.0, 1.0),),
        top_derivative=lambda z, c: -z[2] - z[1],
        linear_form=lambda c: ((0.0, 1.0, 1.0, 1.0), 0.0),
        closed_form=_third_order_closed,
    ),
)


def time_grid() -> np.ndarray:
    """``(T,)``: 0, 0.01, ..., 9.99."""
    return STEP * np.arange(N_STEPS, dtype=np.float64)


def ivp_solution(ode: LinearOde, ic: tuple[float, ...], t: np.ndarray) -> np.ndarray:
    """x, x', x'' from scipy's solve_ivp on ``ode.top_derivative``; shape ``(3, len(t))``.

    Orders above the integrated state come from the equation: x^(n) = g(z). For n = 1 also
    x'' = g(x') - g(0), exact because g is affine (the derivative of g(x) along x').
    """
    n, c = ode.order, ode.constants

    def rhs(_t: float, z: np.ndarray) -> np.ndarray:
        return np.concatenate([z[1:], [ode.top_derivative(z, c)]])

    sol = solve_ivp(
        rhs,
        (t[0], t[-1]),
        np.asarray(ic, float),
        t_eval=t,
        method="DOP853",
        rtol=IVP_RTOL,
        atol=IVP_ATOL,
    )
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed on {ode.key}: {sol.message}")
    orders = list(sol.y)
    g0 = ode.top_derivative(np.zeros((n, 1)), c)
    while len(orders) < 3:
        j = len(orders)
        shifted = np.stack(orders[j - n : j])
        orders.append(ode.top_derivative(shifted, c) - (g0 if j > n else 0.0))
    return np.stack(orders[:3])


def solver_inputs(
    ode: LinearOde, ic: tuple[float, ...], n_steps: int = N_STEPS, step: float = STEP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solver inputs for one case as a first-order system (module docstring), batch 1, float64.

    With n = ``ode.order`` states and R = 3, returns coefficients ``(1, T, n, n, 3)``, rhs
    ``(1, T, n)``, init_vars ``(1, 1, n, 1)`` and steps ``(1, T-1)``.
    """
    a, r = ode.linear_form(ode.constants)
    n = ode.order
    coef = torch.zeros(1, n_steps, n, n, N_ORDERS, dtype=torch.float64)
    for i in range(n - 1):  # z_i' - z_{i+1} = 0
        coef[:, :, i, i, 1] = 1.0
        coef[:, :, i, i + 1, 0] = -1.0
    coef[:, :, n - 1, n - 1, 1] = a[n]  # z_{n-1}' + sum_k a_k z_k = r
    for k in range(n):
        coef[:, :, n - 1, k, 0] += a[k]
    rhs = torch.zeros(1, n_steps, n, dtype=torch.float64)
    rhs[:, :, n - 1] = float(r)
    init = torch.tensor(ic, dtype=torch.float64).reshape(1, 1, n, 1)
    steps = torch.full((1, n_steps - 1), step, dtype=torch.float64)
    return coef, rhs, init, steps
