"""Evaluating a trained Lorenz model (docs/experiments.md, Lorenz).

The recovered coefficients ``xi`` against the truth (errors; terms wrongly kept, wrongly dropped,
with the wrong sign), the recovered equations simulated with scipy from the data's initial state
against the true trajectory, the denoiser's error against the clean data, and the figures of
:mod:`smnn.experiments.lorenz.figures`; :func:`evaluate` writes ``metrics.json`` and the plots.

A model trained with a solver whose CG solves did not converge (``mnn_cg``: its training
recorded ``cg_converged`` 0 in the model's final metrics) is marked wherever its numbers
appear: ``metrics.json`` carries ``"converged": false`` and the ``cg_*`` metrics of its
training, the summary lines and the figures' titles say ``mnn_cg (not converged)``
(:func:`smnn.solver.mnn.convergence_label`). Solvers with nothing to converge (direct solvers)
carry no such key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from smnn.data.lorenz import load_lorenz, make_windows, window_starts
from smnn.experiments.base import Evaluation
from smnn.experiments.library import CandidateLibrary
from smnn.experiments.lorenz.figures import (
    plot_coefficients,
    plot_losses,
    plot_time_series,
    plot_trajectories,
)
from smnn.experiments.lorenz.models import lorenz_library, true_coefficients
from smnn.experiments.lorenz.settings import LorenzSettings
from smnn.experiments.lorenz.tasks import load_model
from smnn.io import atomic_write_json
from smnn.solver.mnn import converged_flag, convergence_label

__all__ = ["coefficient_metrics", "simulate", "simulation_metrics", "evaluate"]


def coefficient_metrics(
    xi: np.ndarray, truth: np.ndarray, library: CandidateLibrary
) -> dict[str, float]:
    """Recovered ``xi`` vs ``truth`` (both ``(n_terms, n_vars)``).

    Returns errors, the counts of wrongly kept (true 0, recovered != 0), wrongly dropped (true
    != 0, recovered 0) and sign-flipped terms, and every true term's recovered value as
    ``coef_d{var}_{term}`` (e.g. ``coef_dy_xz``).
    """
    true_on = truth != 0
    on = xi != 0
    metrics = {
        "coef_max_abs_error": float(np.abs(xi - truth).max()),
        "coef_rel_error": float(np.linalg.norm(xi - truth) / np.linalg.norm(truth)),
        "coef_max_rel_error_true_terms": float(
            (np.abs(xi - truth)[true_on] / np.abs(truth[true_on])).max()
        ),
        "n_wrongly_kept": float(np.sum(on & ~true_on)),
        "n_wrongly_dropped": float(np.sum(~on & true_on)),
        "n_sign_errors": float(np.sum(true_on & (np.sign(xi) != np.sign(truth)))),
        "n_active_terms": float(on.sum()),
    }
    metrics["sign_pattern_recovered"] = float(
        metrics["n_wrongly_kept"] == 0 and metrics["n_sign_errors"] == 0
    )
    for i, j in zip(*np.nonzero(true_on), strict=True):
        name = library.names[i].replace(" ", "")
        metrics[f"coef_d{library.variables[j]}_{name}"] = float(xi[i, j])
    return metrics


def simulate(
    library: CandidateLibrary,
    xi: np.ndarray,
    initial_state: np.ndarray,
    n_points: int,
    dt: float,
    blow_up: float = 1e6,
) -> np.ndarray:
    """Integrate ``d state/dt = Theta(state) xi`` (scipy DOP853) on ``dt * arange(n_points)``.

    Returns ``(n, n_vars)`` with ``n <= n_points``: shorter when the solution leaves
    ``|state| < blow_up`` (the recovered equations diverge).
    """
    from scipy.integrate import solve_ivp

    times = dt * np.arange(n_points)

    def escaped(t: float, s: np.ndarray) -> float:
        return blow_up - np.abs(s).max()

    escaped.terminal = True
    sol = solve_ivp(
        lambda t, s: library.rhs(s, xi),
        (0.0, float(times[-1])),
        np.asarray(initial_state, dtype=float),
        method="DOP853",
        t_eval=times,
        rtol=1e-10,
        atol=1e-10,
        events=escaped,
    )
    return sol.y.T.copy()


def simulation_metrics(sim: np.ndarray, true: np.ndarray, dt: float) -> dict[str, float]:
    """Error of a simulated trajectory ``(n, 3)`` against the true one ``(N, 3)``, N >= n.

    ``simulation_valid_time``: the time until the error norm first exceeds 10% of the true
    trajectory's RMS norm (chaos makes every error grow; this says for how long it stays small).
    """
    n = sim.shape[0]
    err = np.linalg.norm(sim - true[:n], axis=-1)
    scale = float(np.sqrt(np.mean(np.sum(true**2, axis=-1))))
    bad = np.nonzero(err > 0.1 * scale)[0]
    valid_steps = int(bad[0]) if bad.size else n
    horizon = min(n, int(round(1.0 / dt)) + 1)
    return {
        "simulation_rmse": float(np.sqrt(np.mean(err**2))),
        "simulation_rmse_first_time_unit": float(np.sqrt(np.mean(err[:horizon] ** 2))),
        "simulation_valid_time": valid_steps * dt,
        "simulation_diverged": float(n < true.shape[0]),
    }


def evaluate(
    settings: LorenzSettings,
    solver: str,
    data_path: str | Path,
    model_path: str | Path,
    out_dir: str | Path,
) -> Evaluation:
    """Evaluate a trained model; writes ``metrics.json`` and ``plots/*.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    ds = load_lorenz(data_path, settings.data)
    model, payload = load_model(model_path)
    library = lorenz_library()
    with torch.no_grad():
        xi = model.coefficients().numpy()
    truth = true_coefficients(library, settings.data)
    metrics = coefficient_metrics(xi, truth, library)

    clean = ds["clean"].values
    n_sim = min(settings.simulate_points, clean.shape[0])
    sim = simulate(library, xi, clean[0], n_sim, settings.data.dt)
    metrics.update(simulation_metrics(sim, clean[:n_sim], settings.data.dt))

    # denoising quality on the (possibly noisy) observations, on every window start
    starts = window_starts(clean.shape[0], settings.data.window, settings.max_windows)
    windows = make_windows(ds["observed"].values, starts, settings.data.window)
    with torch.no_grad():
        x_hat = model.denoise(windows.double())
    target = make_windows(clean, starts, settings.data.window)
    metrics["denoise_rmse_vs_clean"] = float(torch.sqrt(torch.mean((x_hat - target) ** 2)))
    final_metrics = payload.get("final_metrics", {})
    final_loss = final_metrics.get("final_train_loss")
    if final_loss is not None:
        metrics["train_final_loss"] = float(final_loss)
    # the training's CG record (mnn_cg): carried next to every number the model produced
    cg_metrics = {k: float(v) for k, v in final_metrics.items() if k.startswith("cg_")}
    metrics.update(cg_metrics)
    converged = converged_flag(cg_metrics.get("cg_converged"))
    label = f"solver {convergence_label(solver, converged)}"

    files = [
        plot_trajectories(clean[:n_sim], sim, plots / "trajectories.png", label),
        plot_time_series(
            clean[:n_sim], sim, settings.data.dt, plots / "time_series.png", label
        ),
        plot_losses(
            payload.get("history", []), payload.get("step_losses", []),
            settings.epochs_per_cycle, plots / "loss.png", label,
        ),
        plot_coefficients(library, xi, truth, plots / "coefficients.png", label),
    ]  # fmt: skip
    equations = library.equations(xi)
    document = {
        "experiment": "lorenz",
        "solver": solver,
        "metrics": metrics,
        "equations": equations,
        "true_equations": library.equations(truth),
        "coefficients": xi.tolist(),
        "true_coefficients": truth.tolist(),
        "terms": list(library.names),
    }
    if converged is not None:
        document["converged"] = converged
    atomic_write_json(document, out_dir / "metrics.json")
    summary = [
        f"{label}: recovered equations:",
        *(f"  {line}" for line in equations),
        f"terms wrongly kept {metrics['n_wrongly_kept']:.0f}, wrongly dropped "
        f"{metrics['n_wrongly_dropped']:.0f}, sign errors {metrics['n_sign_errors']:.0f}; "
        f"simulation valid for {metrics['simulation_valid_time']:.2f} time units",
    ]
    if converged is False:
        summary.append(
            f"{label}: the model was trained with {cg_metrics.get('cg_unconverged_solves', 0):.0f} "
            "CG solve(s) stopped at the iteration cap; these numbers come from the last "
            "iterates, not from solutions of the MNN problem"
        )
    tags = {"train_run_id": payload["run_id"]} if payload.get("run_id") else {}
    return Evaluation(metrics, document, files, tags, summary)
