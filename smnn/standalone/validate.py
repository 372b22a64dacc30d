"""Solving the standalone cases, their error statistics and the output files
(docs/experiments.md, "Standalone validation").

Every case of :data:`smnn.standalone.equations.EQUATIONS` is solved by every solver of the
registry (:data:`smnn.solver.registry.SOLVERS`: S-MNN, MNN dense, MNN CG), after a warm-up solve
per solver and state count on a 16-step problem (so the times exclude compilation), and compared
for y, y', y'' with the closed form and with solve_ivp (max and mean absolute error).

Outputs in the output directory (:data:`OUTPUT_FILES`, each written atomically):

- ``metrics.json``: the settings and every case (per solver: errors against the closed form and
  against solve_ivp, solve time, and for iterative solvers convergence, largest relative
  residual and iterations; and the closed form against solve_ivp);
- ``errors.csv``: the same as a tidy table (solver x equation x initial condition x reference x
  order);
- ``errors.md``: max |error| against the closed form, per solver and case;
- ``solutions.png``: 3 x 6 panels (:mod:`smnn.standalone.figure`).

With a tracking target, one MLflow run in the experiment ``standalone``: the settings (and the
config) as params, ``max_err.<solver>.<equation>.ic<i>.<y|dy|ddy>`` against the closed form
and ``solve_time_s.<solver>.<equation>.ic<i>`` as metrics, the files as artifacts.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smnn.io import atomic_write, atomic_write_json, atomic_write_text
from smnn.solver.mnn import NOT_CONVERGED, converged_flag
from smnn.solver.registry import SOLVERS, solver_info
from smnn.standalone.equations import (
    EQUATIONS,
    IVP_ATOL,
    IVP_RTOL,
    N_ORDERS,
    N_STEPS,
    ORDER_NAMES,
    STEP,
    LinearOde,
    ivp_solution,
    solver_inputs,
    time_grid,
)
from smnn.standalone.figure import write_solutions_figure
from smnn.tracking import RunTracker, TrackingTarget

__all__ = [
    "OUTPUT_FILES",
    "EXPERIMENT",
    "check_solvers",
    "solve_case",
    "error_stats",
    "run_standalone",
]

OUTPUT_FILES = ("metrics.json", "errors.csv", "errors.md", "solutions.png")
EXPERIMENT = "standalone"


def check_solvers(solvers: Sequence[str] | None) -> list[str]:
    """The registry's solvers by default; ValueError naming ``--solvers`` for unknown ones."""
    solvers = list(SOLVERS) if solvers is None else list(dict.fromkeys(solvers))
    unknown = [s for s in solvers if s not in SOLVERS]
    if unknown or not solvers:
        raise ValueError(
            f"--solvers: unknown solver(s) {unknown or 'none given'}; choose from {list(SOLVERS)}"
        )
    return solvers


def _solve(name: str, inputs: tuple) -> tuple[torch.Tensor, dict]:
    """``(u, info)`` of registry solver ``name``; iterative solvers report convergence, their
    largest relative residual and iterations (their warnings are recorded instead)."""
    info = solver_info(name)
    if not info.reports_convergence:
        return info.function(*inputs), {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence is recorded in the metrics instead
        u, raw = info.function(*inputs, return_info=True)
    out: dict[str, Any] = {"converged": bool(torch.as_tensor(raw["converged"]).all())}
    if "relative_residual" in raw:
        out["relative_residual"] = float(torch.as_tensor(raw["relative_residual"]).max())
    if "iterations" in raw:
        out["iterations"] = int(torch.as_tensor(raw["iterations"]).max())
    return u, out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def solve_case(
    solver: str, ode: LinearOde, ic: tuple[float, ...], device: str | torch.device = "cpu"
) -> tuple[np.ndarray, float, dict]:
    """Solve one case; returns (x, x', x'' as ``(3, T)``, wall seconds, solver info)."""
    dev = torch.device(device)
    inputs = tuple(x.to(dev) for x in solver_inputs(ode, ic))
    _sync(dev)
    start = time.perf_counter()
    with torch.no_grad():
        u, info = _solve(solver, inputs)
    _sync(dev)
    seconds = time.perf_counter() - start
    return u[0, :, 0, :3].T.cpu().numpy(), seconds, info


def _warm_up(solver: str, device: torch.device) -> None:
    """Compile/initialise each solver path once on a tiny problem, so timings exclude it."""
    shapes = {ode.order: ode for ode in EQUATIONS}
    for ode in shapes.values():
        inputs = tuple(x.to(device) for x in solver_inputs(ode, ode.initial_conditions[0], 16))
        with torch.no_grad():
            _solve(solver, inputs)


def error_stats(approx: np.ndarray, exact: np.ndarray) -> dict[str, dict[str, float]]:
    """``(3, T)`` each -> {order name: {"max": .., "mean": ..}} of the absolute error."""
    err = np.abs(approx - exact)
    return {
        name: {"max": float(err[k].max()), "mean": float(err[k].mean())}
        for k, name in enumerate(ORDER_NAMES)
    }


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_standalone(
    out_dir: str | Path,
    solvers: Sequence[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    tracking: TrackingTarget | None = None,
    tags: Mapping[str, str] | None = None,
    config_data: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = _stderr,
) -> dict:
    """Solve every case with every solver, write :data:`OUTPUT_FILES` into ``out_dir``
    (created when missing), log the MLflow run when ``tracking`` is given; returns the
    metrics dict (what ``metrics.json`` holds)."""
    solvers = check_solvers(solvers)
    say = progress or (lambda line: None)
    dev = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = time_grid()
    for solver in solvers:
        _warm_up(solver, dev)

    cases: list[dict] = []
    curves: dict[tuple[str, str, int], np.ndarray] = {}
    for ode in EQUATIONS:
        for i, ic in enumerate(ode.initial_conditions):
            closed = ode.closed_form(t, ic, ode.constants)
            ivp = ivp_solution(ode, ic, t)
            curves[("closed", ode.key, i)] = closed
            base = {
                "equation": ode.key,
                "ode_id": ode.ode_id,
                "initial_condition": i,
                "initial_values": list(ic),
            }
            cases.append({**base, "solver": "closed_form", "vs_ivp": error_stats(closed, ivp)})
            for solver in solvers:
                approx, seconds, info = solve_case(solver, ode, ic, dev)
                curves[(solver, ode.key, i)] = approx
                errors = error_stats(approx, closed)
                cases.append(
                    {
                        **base,
                        "solver": solver,
                        "solve_time_s": seconds,
                        "vs_closed_form": errors,
                        "vs_ivp": error_stats(approx, ivp),
                        **info,
                    }
                )
                say(
                    f"[standalone] {solver_info(solver).label} {ode.key} ic{i}: max |error| "
                    f"y {errors['y']['max']:.2e}, y' {errors['dy']['max']:.2e}, "
                    f"y'' {errors['ddy']['max']:.2e} ({1e3 * seconds:.1f} ms)"
                )

    metrics = {
        "config": {
            "step": STEP,
            "n_steps": N_STEPS,
            "n_orders": N_ORDERS,
            "dtype": "float64",
            "solvers": solvers,
            "device": str(dev),
            "ivp": {"method": "DOP853", "rtol": IVP_RTOL, "atol": IVP_ATOL},
            "equations": [
                {
                    "key": o.key,
                    "ode_id": o.ode_id,
                    "name": o.name,
                    "equation": o.equation,
                    "constants": list(o.constants),
                    "n_states": o.order,
                    "initial_conditions": [list(ic) for ic in o.initial_conditions],
                }
                for o in EQUATIONS
            ],
        },
        "cases": cases,
    }
    atomic_write_json(metrics, out / "metrics.json", indent=1)
    _write_csv(cases, out / "errors.csv")
    atomic_write_text(markdown_table(cases, solvers), out / "errors.md")
    drawn = [c for c in cases if c["initial_condition"] == 0 and c.get("converged") is False]
    notes = {c["solver"]: NOT_CONVERGED for c in drawn}
    write_solutions_figure(t, curves, solvers, out / "solutions.png", notes)
    if tracking is not None:
        run_id = _log_mlflow(tracking, out, metrics, tags, config_data)
        say(
            f"[standalone] MLflow run {run_id} in experiment {EXPERIMENT} at "
            f"{tracking.tracking_uri}"
        )
    say(
        f"[standalone] {len(cases) - sum(c['solver'] == 'closed_form' for c in cases)} solves; "
        f"outputs in {out.resolve()}: {', '.join(OUTPUT_FILES)}"
    )
    return metrics


def _csv_rows(cases: list[dict]) -> list[dict]:
    rows = []
    for case in cases:
        for reference in ("vs_closed_form", "vs_ivp"):
            if reference not in case:
                continue
            for order, stats in case[reference].items():
                rows.append(
                    {
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
                    }
                )
    return rows


def _write_csv(cases: list[dict], path: Path) -> None:
    """One row per solver x equation x initial condition x reference x order."""
    import pandas as pd

    frame = pd.DataFrame(_csv_rows(cases))
    atomic_write(path, lambda f: frame.to_csv(f, index=False))


def markdown_table(cases: list[dict], solvers: Sequence[str]) -> str:
    """errors.md: max |error| against the closed form, one row per solver and case."""
    lines = [
        f"Max |error| against the closed form (T = {N_STEPS}, step {STEP}, float64)",
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
                residual = case.get("relative_residual")
                note = (
                    "converged"
                    if converged_flag(case["converged"])
                    else (NOT_CONVERGED + (f" (residual {residual:.1e})" if residual else ""))
                )
            lines.append(
                f"| {solver_info(solver).label} | {case['equation']} "
                f"| {case['initial_condition']} "
                f"| {err['y']['max']:.2e} | {err['dy']['max']:.2e} | {err['ddy']['max']:.2e} "
                f"| {1e3 * case['solve_time_s']:.1f} | {note} |"
            )
    return "\n".join(lines) + "\n"


def _log_mlflow(target: TrackingTarget, out: Path, metrics: dict, tags, config_data) -> str:
    with RunTracker.start(target, EXPERIMENT, "standalone", tags=dict(tags or {})) as tracker:
        if config_data is not None:
            tracker.log_config(config_data)
        settings = metrics["config"]
        tracker.log_params(
            {
                "standalone.step": settings["step"],
                "standalone.n_steps": settings["n_steps"],
                "standalone.n_orders": settings["n_orders"],
                "standalone.dtype": settings["dtype"],
                "standalone.run_solvers": ",".join(settings["solvers"]),
                "standalone.run_device": settings["device"],
            }
        )
        values: dict[str, float] = {}
        for case in metrics["cases"]:
            if case["solver"] == "closed_form":
                continue
            key = f"{case['solver']}.{case['equation']}.ic{case['initial_condition']}"
            for order, stats in case["vs_closed_form"].items():
                values[f"max_err.{key}.{order}"] = stats["max"]
            values[f"solve_time_s.{key}"] = case["solve_time_s"]
        tracker.log_metrics(values)
        for name in OUTPUT_FILES:
            tracker.log_artifact(out / name)
    return tracker.run_id
