"""Standalone validation: linear ODEs with closed-form solutions (EXPERIMENTS.md section 1).

Six constant-coefficient linear ODEs from ODEBench (ids 1, 2, 9, 24, 25) plus a third-order
equation, each with its initial conditions, on the grid t = 0, 0.01, ..., 9.99 (T = 1000) in
float64. Every case is solved by S-MNN (:func:`smnn.ode_forward`), MNN dense and MNN CG
(:mod:`smnn.solver.mnn`), and compared for y, y', y'' against

- the closed-form solution (derived below, per equation), and
- scipy's ``solve_ivp`` (DOP853, rtol 1e-10, atol 1e-12) on the equation as written in the table.

Discretisation choices:

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
  equation two: 11 cases.

Outputs in ``--out``: ``metrics.json`` (every case: max and mean |error| of y, y', y'' against
the closed form and against solve_ivp, solve time, MNN CG convergence; and the closed form against
solve_ivp), ``errors.csv`` (the same as a tidy table), ``errors.md`` (max |error| against the
closed form, per solver and case) and ``solutions.png`` (3 x 6: rows y, y', y''; one column per
equation; closed form, S-MNN and MNN dense for the first initial condition).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

__all__ = [
    "LinearOde",
    "EQUATIONS",
    "SOLVERS",
    "time_grid",
    "ivp_solution",
    "solve_case",
    "run_standalone",
    "prepare_output_dir",
    "add_parser",
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
        rhs, (t[0], t[-1]), np.asarray(ic, float), t_eval=t, method="DOP853",
        rtol=IVP_RTOL, atol=IVP_ATOL,
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


# --------------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------------

SolverFn = Callable[..., tuple[torch.Tensor, dict]]


def _solve_smnn(c, b, u0, h) -> tuple[torch.Tensor, dict]:
    from smnn.solver.api import ode_forward

    return ode_forward(c, b, u0, h), {}


def _solve_mnn_dense(c, b, u0, h) -> tuple[torch.Tensor, dict]:
    from smnn.solver.mnn import mnn_dense

    return mnn_dense(c, b, u0, h), {}


def _solve_mnn_cg(c, b, u0, h) -> tuple[torch.Tensor, dict]:
    from smnn.solver.mnn import mnn_cg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence is recorded below instead
        u, info = mnn_cg(c, b, u0, h, return_info=True)
    return u, {
        "converged": bool(torch.as_tensor(info["converged"]).all()),
        "relative_residual": float(torch.as_tensor(info["relative_residual"]).max()),
        "iterations": int(torch.as_tensor(info["iterations"]).max()),
    }


# name -> solver(c, b, u0, h) -> (u (..., T, D, R), extra info)
SOLVERS: dict[str, SolverFn] = {
    "smnn": _solve_smnn,
    "mnn_dense": _solve_mnn_dense,
    "mnn_cg": _solve_mnn_cg,
}
SOLVER_LABELS = {"smnn": "S-MNN", "mnn_dense": "MNN dense", "mnn_cg": "MNN CG"}


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


def solve_case(
    solver: str, ode: LinearOde, ic: tuple[float, ...]
) -> tuple[np.ndarray, float, dict]:
    """Solve one case; returns (x, x', x'' as ``(3, T)``, wall seconds, solver info)."""
    inputs = solver_inputs(ode, ic)
    start = time.perf_counter()
    with torch.no_grad():
        u, info = SOLVERS[solver](*inputs)
    seconds = time.perf_counter() - start
    return u[0, :, 0, :3].T.numpy(), seconds, info


def _warm_up(solver: str) -> None:
    """Compile/initialise each solver path once on a tiny problem, so timings exclude it."""
    shapes = {ode.order: ode for ode in EQUATIONS}
    for ode in shapes.values():
        with torch.no_grad():
            SOLVERS[solver](*solver_inputs(ode, ode.initial_conditions[0], n_steps=16))


def _error_stats(approx: np.ndarray, exact: np.ndarray) -> dict[str, dict[str, float]]:
    """``(3, T)`` each -> {order name: {"max": .., "mean": ..}} of the absolute error."""
    err = np.abs(approx - exact)
    return {
        name: {"max": float(err[k].max()), "mean": float(err[k].mean())}
        for k, name in enumerate(ORDER_NAMES)
    }


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def prepare_output_dir(path: str | Path, option: str = "--out") -> Path:
    """Create ``path`` (with parents) and check that files can be written into it.

    Raises ValueError naming ``option`` and the problem: the path is an existing file, cannot be
    created, or is not writable.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{option} {out}: cannot create directory ({exc.strerror})") from exc
    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"{option} {out}: directory is not writable ({exc.strerror})") from exc
    return out


def run_standalone(out_dir: str | Path, solvers: list[str] | None = None) -> dict:
    """Solve every case with every solver, write the outputs, return the metrics dict."""
    solvers = list(SOLVERS) if solvers is None else solvers
    unknown = [s for s in solvers if s not in SOLVERS]
    if unknown or not solvers:
        raise ValueError(
            f"--solvers: unknown solver(s) {unknown or 'none given'}; choose from {list(SOLVERS)}"
        )
    out = prepare_output_dir(out_dir)
    t = time_grid()
    for solver in solvers:
        _warm_up(solver)

    cases: list[dict] = []
    curves: dict[tuple[str, str, int], np.ndarray] = {}
    for ode in EQUATIONS:
        for i, ic in enumerate(ode.initial_conditions):
            closed = ode.closed_form(t, ic, ode.constants)
            ivp = ivp_solution(ode, ic, t)
            curves[("closed", ode.key, i)] = closed
            base = {"equation": ode.key, "ode_id": ode.ode_id, "initial_condition": i,
                    "initial_values": list(ic)}
            cases.append({**base, "solver": "closed_form", "vs_ivp": _error_stats(closed, ivp)})
            for solver in solvers:
                approx, seconds, info = solve_case(solver, ode, ic)
                curves[(solver, ode.key, i)] = approx
                cases.append({
                    **base,
                    "solver": solver,
                    "solve_time_s": seconds,
                    "vs_closed_form": _error_stats(approx, closed),
                    "vs_ivp": _error_stats(approx, ivp),
                    **info,
                })

    metrics = {
        "config": {
            "step": STEP, "n_steps": N_STEPS, "n_orders": N_ORDERS, "dtype": "float64",
            "solvers": solvers,
            "ivp": {"method": "DOP853", "rtol": IVP_RTOL, "atol": IVP_ATOL},
            "equations": [
                {"key": o.key, "ode_id": o.ode_id, "name": o.name, "equation": o.equation,
                 "constants": list(o.constants), "n_states": o.order,
                 "initial_conditions": [list(ic) for ic in o.initial_conditions]}
                for o in EQUATIONS
            ],
        },
        "cases": cases,
    }
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=1)
    _write_csv(cases, out / "errors.csv")
    (out / "errors.md").write_text(_markdown_table(cases, solvers))
    _plot(t, curves, solvers, out / "solutions.png")
    return metrics


def _write_csv(cases: list[dict], path: Path) -> None:
    """One row per solver x equation x initial condition x reference x order."""
    import pandas as pd

    rows = []
    for case in cases:
        for reference in ("vs_closed_form", "vs_ivp"):
            if reference not in case:
                continue
            for order, stats in case[reference].items():
                rows.append({
                    "solver": case["solver"],
                    "equation": case["equation"],
                    "ode_id": case["ode_id"],
                    "initial_condition": case["initial_condition"],
                    "reference": reference.removeprefix("vs_"),
                    "order": order,
                    "max_abs_err": stats["max"],
                    "mean_abs_err": stats["mean"],
                    "solve_time_s": case.get("solve_time_s", float("nan")),
                    "converged": case.get("converged", ""),
                })
    pd.DataFrame(rows).to_csv(path, index=False)


def _markdown_table(cases: list[dict], solvers: list[str]) -> str:
    lines = [
        "Max |error| against the closed form (T = 1000, step 0.01, float64)",
        "",
        "| solver | equation | IC | y | y' | y'' | time (ms) | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for solver in solvers:
        for case in cases:
            if case["solver"] != solver:
                continue
            err = case["vs_closed_form"]
            note = ""
            if "converged" in case:
                note = "converged" if case["converged"] else (
                    f"not converged (residual {case['relative_residual']:.1e})")
            lines.append(
                f"| {SOLVER_LABELS[solver]} | {case['equation']} | {case['initial_condition']} "
                f"| {err['y']['max']:.2e} | {err['dy']['max']:.2e} | {err['ddy']['max']:.2e} "
                f"| {1e3 * case['solve_time_s']:.1f} | {note} |"
            )
    return "\n".join(lines) + "\n"


def _plot(t: np.ndarray, curves: dict, solvers: list[str], path: Path) -> None:
    """3 x 6 grid: rows y, y', y''; columns equations; first initial condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ("y", "y'", "y''")
    fig, axes = plt.subplots(3, len(EQUATIONS), figsize=(3.2 * len(EQUATIONS), 7.5),
                             sharex=True, squeeze=False)
    styles = {"smnn": dict(color="tab:blue", lw=1.2),
              "mnn_dense": dict(color="tab:orange", lw=1.2, ls="--")}
    for j, ode in enumerate(EQUATIONS):
        for k in range(3):
            ax = axes[k, j]
            ax.plot(t, curves[("closed", ode.key, 0)][k], color="0.6", lw=3.5, label="closed form")
            for solver, style in styles.items():
                if solver in solvers:
                    ax.plot(t, curves[(solver, ode.key, 0)][k], label=SOLVER_LABELS[solver],
                            **style)
            if j == 0:
                ax.set_ylabel(labels[k])
            if k == 0:
                ax.set_title(f"{ode.name}\n{ode.equation}", fontsize=9)
            if k == 2:
                ax.set_xlabel("t")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "standalone",
        help="validate the solvers on linear ODEs with closed-form solutions",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument(
        "--solvers", default=",".join(SOLVERS),
        help=f"comma-separated subset of {','.join(SOLVERS)} (default: all)",
    )
    p.set_defaults(func=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    try:
        metrics = run_standalone(args.out, solvers)
    except ValueError as exc:
        print(f"smnn standalone: error: {exc}", file=sys.stderr)
        return 2
    print((Path(args.out) / "errors.md").read_text(), end="")
    n = sum(1 for c in metrics["cases"] if c["solver"] != "closed_form")
    print(f"{n} solves; outputs in {args.out}")
    return 0
