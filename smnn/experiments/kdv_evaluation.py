"""The KdV rollout protocol, its persistence baseline and the NMSE (docs/experiments.md
section 3).

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
from typing import Protocol

import numpy as np
import torch

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
