"""The KdV rollout protocol, its persistence baseline and the NMSE (docs/experiments.md,
KdV).

Protocol. Each test trajectory ``u`` ``(T_traj, n_x)`` starts from its first ``window`` true
steps (the *given* steps). A model call maps the last ``window`` known steps to ``window`` steps
whose first is the last known one again (the windows overlap by one), so each call adds
``window - 1`` new steps; the new steps are appended and the next call starts from the last
``window`` known ones (predicted ones included: the rollout is autoregressive). Calls repeat
until all ``T_traj`` steps are covered, the last call clipped (:func:`rollout_plan`).

Persistence (:func:`persistence_forecast`): the last given step held for every later step.

Metric (:func:`score_rollout`). The normalised MSE of step ``t`` of a trajectory is
``sum_x (pred - true)^2 / sum_x true^2`` (the squared error relative to the true state's energy
at that step). It is computed for every predicted step ``window .. T_traj - 1`` (the given
steps are inputs, not scored), averaged over the trajectories per step (the NMSE against the
rollout step), and that curve averaged over the steps (equal to the mean over steps and
trajectories).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from smnn.data.windows import seeded_generator
from smnn.experiments.base import Evaluation
from smnn.experiments.forecast_figures import plot_error_by_lead
from smnn.experiments.kdv.figures import plot_spacetime, plot_training_curves
from smnn.experiments.kdv.settings import FIRST_STEPS, KdvSettings
from smnn.experiments.kdv.store import open_store
from smnn.experiments.kdv.tasks import load_model
from smnn.io import atomic_write_json

__all__ = [
    "rollout_plan",
    "rollout",
    "persistence_forecast",
    "NmseScore",
    "score_rollout",
]


class _Forecaster(Protocol):
    window: int

    def predict(self, x: torch.Tensor) -> torch.Tensor: ...


def rollout_plan(n_steps: int, window: int) -> list[tuple[int, int]]:
    """The model calls of a rollout over ``n_steps`` steps from ``window`` given ones: one
    ``(first_new_step, n_new)`` per call, ``n_new <= window - 1`` (the last one clipped).

    Raises:
        ValueError: ``window < 2`` or ``n_steps <= window`` (nothing to predict).
    """
    if window < 2:
        raise ValueError(f"the window must have at least 2 steps, got {window}")
    if n_steps <= window:
        raise ValueError(
            f"a rollout over {n_steps} steps from {window} given ones predicts nothing"
        )
    plan, known = [], window
    while known < n_steps:
        n_new = min(window - 1, n_steps - known)
        plan.append((known, n_new))
        known += n_new
    return plan


@torch.no_grad()
def rollout(
    model: _Forecaster, truth: torch.Tensor, batch_size: int, n_steps: int | None = None
) -> np.ndarray:
    """Autoregressive rollout of ``model`` from the first ``model.window`` steps of ``truth``.

    Args:
        model: ``predict`` maps ``(B, window, n_x)`` to ``(B, window, n_x)``, the first output
            step being the last input step (only the others are used).
        truth: ``(N, T_traj, n_x)`` on the model's device and in its dtype; only the first
            ``window`` steps are read.
        batch_size: trajectories per model call.
        n_steps: steps to cover (default ``T_traj``).

    Returns:
        ``(N, n_steps, n_x)`` float64: the given steps (true) followed by the predicted ones.

    Raises:
        ValueError: wrong shapes, or the model's output has another shape or is not finite.
    """
    w = model.window
    if truth.ndim != 3 or truth.shape[1] < w:
        raise ValueError(f"truth must be (N, T >= {w}, n_x), got {tuple(truth.shape)}")
    n_steps = truth.shape[1] if n_steps is None else n_steps
    plan = rollout_plan(n_steps, w)
    out = []
    for batch in truth.split(batch_size):
        pred = torch.empty(batch.shape[0], n_steps, batch.shape[2], dtype=batch.dtype,
                           device=batch.device)  # fmt: skip
        pred[:, :w] = batch[:, :w]
        for first, n_new in plan:
            y = model.predict(pred[:, first - w : first])
            if y.shape != (batch.shape[0], w, batch.shape[2]):
                raise ValueError(
                    f"the model returned {tuple(y.shape)} for {batch.shape[0]} windows of "
                    f"{w} x {batch.shape[2]}"
                )
            if not bool(torch.isfinite(y).all()):
                raise ValueError(f"the model's prediction of steps {first}.. is not finite")
            pred[:, first : first + n_new] = y[:, 1 : 1 + n_new]
        out.append(pred.double().cpu())
    return torch.cat(out).numpy()


def persistence_forecast(truth: np.ndarray, n_given: int) -> np.ndarray:
    """The last given step held: ``truth`` ``(N, T, n_x)`` -> ``(N, T, n_x)`` float64 (the
    first ``n_given`` steps are the truth)."""
    truth = np.asarray(truth, dtype=np.float64)
    out = np.repeat(truth[:, n_given - 1 : n_given], truth.shape[1], axis=1)
    out[:, :n_given] = truth[:, :n_given]
    return out


@dataclass(frozen=True)
class NmseScore:
    """The normalised MSE of one model's rollouts on the steps after the given ones.

    Attributes:
        nmse: the mean over the scored steps of :attr:`by_step`.
        by_step: ``(T - n_given,)`` the NMSE at each predicted step, averaged over trajectories.
        per_trajectory: ``(N,)`` each trajectory's NMSE averaged over the scored steps.
    """

    nmse: float
    by_step: np.ndarray
    per_trajectory: np.ndarray

    def over_first(self, n: int) -> float:
        """The mean NMSE over the first ``n`` scored steps."""
        return float(self.by_step[:n].mean())


def score_rollout(prediction: np.ndarray, truth: np.ndarray, n_given: int) -> NmseScore:
    """Score ``prediction`` against ``truth`` (both ``(N, T, n_x)``) on the steps after the
    first ``n_given`` (see the module docstring).

    Raises:
        ValueError: the shapes differ, a prediction is not finite, or a true step is zero
            everywhere (its normalisation would be 0).
    """
    prediction = np.asarray(prediction, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if prediction.shape != truth.shape or truth.ndim != 3 or truth.shape[1] <= n_given:
        raise ValueError(
            f"prediction and truth must be the same (N, T > {n_given}, n_x), got "
            f"{prediction.shape} and {truth.shape}"
        )
    p, t = prediction[:, n_given:], truth[:, n_given:]
    if not np.isfinite(p).all():
        bad = int((~np.isfinite(p)).any(axis=(1, 2)).sum())
        raise ValueError(f"the rollouts of {bad} trajectory(ies) are not finite")
    energy = np.sum(t**2, axis=2)  # (N, T - n_given)
    if not (energy > 0).all():
        n, s = np.argwhere(~(energy > 0))[0]
        raise ValueError(
            f"true step {n_given + s} of trajectory {n} is zero everywhere: its NMSE is undefined"
        )
    nmse = np.sum((p - t) ** 2, axis=2) / energy  # (N, T - n_given)
    by_step = nmse.mean(axis=0)
    return NmseScore(float(by_step.mean()), by_step, nmse.mean(axis=1))


def _score_entry(score: NmseScore) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "nmse": score.nmse,
        "nmse_median_trajectory": float(np.median(score.per_trajectory)),
        "nmse_by_step": [float(v) for v in score.by_step],
    }
    if score.by_step.size >= FIRST_STEPS:
        entry[f"nmse_first_{FIRST_STEPS}"] = score.over_first(FIRST_STEPS)
    return entry


def evaluate(
    s: KdvSettings,
    solver: str,
    data_path: str | Path,
    model_path: str | Path,
    out_dir: str | Path,
    device: torch.device,
) -> Evaluation:
    """The rollout protocol above for the model and persistence on the test split; writes
    ``metrics.json`` and ``plots/*.png`` into ``out_dir``."""
    store = open_store(data_path, s.source)
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    dtype = s.torch_dtype
    model, payload = load_model(
        model_path, solver=solver, dtype=dtype, device=device, solve_args=s.solve_args()
    )
    if model.window != s.window or model.n_x != store.n_x:
        raise ValueError(
            f"{model_path} was trained with window {model.window} on {model.n_x} grid points; "
            f"the config says window {s.window} and the store has {store.n_x}: retrain"
        )
    if store.n_time <= s.window:
        raise ValueError(
            f"the store's trajectories have {store.n_time} steps, no more than the "
            f"{s.window} given ones: nothing to roll out"
        )
    # scored against the stored float64 values; the model reads them in its own dtype
    truth_t = store.read("test", dtype=torch.float64, limit=s.n_trajectories)
    n_traj, n_steps = truth_t.shape[0], truth_t.shape[1]
    w = s.window
    plan = rollout_plan(n_steps, w)
    given = truth_t[:, :w].to(device=device, dtype=dtype)
    forecasts = {"model": rollout(model, given, s.batch_size, n_steps=n_steps)}
    truth = truth_t.numpy()
    del truth_t, given
    forecasts["persistence"] = persistence_forecast(truth, w)
    scores = {name: score_rollout(f, truth, w) for name, f in forecasts.items()}

    metrics: dict[str, float] = {}
    for name, score in scores.items():
        metrics[f"nmse_{name}"] = score.nmse
        if score.by_step.size >= FIRST_STEPS:
            metrics[f"nmse_{name}_first{FIRST_STEPS}"] = score.over_first(FIRST_STEPS)
    final = payload.get("final_metrics", {})
    for key, name in (("final_train_loss", "train_final_loss"),
                      ("final_valid_loss", "valid_final_loss")):  # fmt: skip
        if final.get(key) is not None:
            metrics[name] = float(final[key])
    metrics["n_parameters"] = float(payload.get("n_parameters", 0))

    label = f"data: {store.source}"
    gen = seeded_generator(s.seed, "kdv", "evaluate", "sample trajectories")
    n_sample = min(s.sample_trajectories, n_traj)
    picks = torch.randperm(n_traj, generator=gen)[:n_sample].sort().values.numpy()
    x, t = store.coordinates("test", picks)
    model_label = f"model ({solver})"
    files = [
        plot_spacetime(
            truth[picks], forecasts["model"][picks], x, t, w, plots / "spacetime.png",
            labels=[f"test trajectory {int(i)}" for i in picks],
            title=f"KdV rollout, solver {solver} ({label})",
        ),
        plot_error_by_lead(
            {model_label: scores["model"].by_step, "persistence": scores["persistence"].by_step},
            plots / "nmse_by_step.png", ylabel="NMSE", step_unit="steps", log=True,
            title=f"KdV rollout NMSE over {n_traj} test trajectories, solver {solver} ({label})",
        ),
        plot_training_curves(
            payload.get("history", []), plots / "loss.png",
            title=f"KdV training, solver {solver} ({label})",
        ),
    ]  # fmt: skip
    document = {
        "experiment": "kdv",
        "solver": solver,
        "source": store.source,
        "n_parameters": int(payload.get("n_parameters", 0)),
        "data": {
            "n_x": store.n_x,
            "n_steps": n_steps,
            "n_test_trajectories": int(store.rows("test").size),
            "n_trajectories_scored": n_traj,
            "trajectories_scored": f"the first {n_traj} of the test split",
        },
        "protocol": {
            "window": w,
            "given_steps": w,
            "scored_steps": [w, n_steps - 1],
            "n_scored_steps": n_steps - w,
            "model_calls": len(plan),
            "new_steps_per_call": w - 1,
            "last_call_new_steps": plan[-1][1],
            "scored": f"steps {w}..{n_steps - 1} (0-based, inclusive) of each stored "
            f"trajectory; the {w} given steps 0..{w - 1} are inputs and not scored",
            "rollout": "autoregressive: each call maps the last window known steps (predicted "
            "ones included) to the next window - 1 new ones",
            "persistence": f"step {w - 1} (the last given one) held",
            f"first_{FIRST_STEPS}": f"nmse_first_{FIRST_STEPS}: the mean over steps "
            f"{w}..{w + FIRST_STEPS - 1} only",
        },
        "normalisation": "NMSE of a step of a trajectory = sum over x of (prediction - truth)^2 "
        "divided by sum over x of truth^2; nmse_by_step = its mean over the trajectories, nmse = "
        "the mean of nmse_by_step over the scored steps (= the mean over steps and trajectories)",
        "models": {name: _score_entry(score) for name, score in scores.items()},
        "sample_trajectories": [int(i) for i in picks],
    }
    atomic_write_json(document, out_dir / "metrics.json")
    summary = [
        f"rollout NMSE over steps {w}..{n_steps - 1} of {n_traj} test trajectories ({label}):",
        *(f"  {name:12s} {score.nmse:.6g}" for name, score in scores.items()),
    ]
    tags = {"source": store.source, "solve_dtype": str(model.solve_dtype or dtype).split(".")[-1],
            "solve_method": model.layer.method}  # fmt: skip
    if payload.get("run_id"):
        tags["train_run_id"] = str(payload["run_id"])
    return Evaluation(metrics, document, files, tags, summary)
