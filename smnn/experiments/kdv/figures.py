"""The KdV evaluation's own figures, through :mod:`smnn.plotting` (never pyplot).

- :func:`plot_spacetime`: per sample trajectory, space-time images (x horizontal, t vertical,
  time upwards) of the truth, the rollout and their difference, the given steps marked;
- :func:`plot_training_curves`: the training and validation loss and the learning rate per
  epoch.

The NMSE against the rollout step is :func:`smnn.experiments.forecast_figures.plot_error_by_lead`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from smnn.plotting import new_figure, save_figure

__all__ = ["plot_spacetime", "spacetime_figure", "plot_training_curves"]


def _edges(centres: np.ndarray) -> tuple[float, float]:
    """The outer edges of a uniform grid of cell centres."""
    c = np.asarray(centres, dtype=np.float64)
    half = 0.5 * (c[-1] - c[0]) / max(len(c) - 1, 1)
    return float(c[0] - half), float(c[-1] + half)


def plot_spacetime(
    truth: np.ndarray,
    prediction: np.ndarray,
    x: np.ndarray,
    t: np.ndarray,
    n_given: int,
    path: Path,
    *,
    labels: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """:func:`spacetime_figure` written as PNG to ``path``."""
    fig = spacetime_figure(truth, prediction, x, t, n_given, labels=labels, title=title)
    return save_figure(fig, path)


def spacetime_figure(
    truth: np.ndarray,
    prediction: np.ndarray,
    x: np.ndarray,
    t: np.ndarray,
    n_given: int,
    *,
    labels: Sequence[str] | None = None,
    title: str = "",
) -> Figure:
    """One row per trajectory: truth, prediction, prediction - truth.

    Args:
        truth, prediction: ``(n, T, n_x)``.
        x: ``(n, n_x)`` grid points of each trajectory; t: ``(n, T)`` its times.
        n_given: the first steps given to the model (a dashed line above the last one).
        labels: ``n`` row titles.

    Truth and prediction of a row share one colour scale (labelled ``u``), the error a
    symmetric one (``u error``).
    """
    truth, prediction = np.asarray(truth), np.asarray(prediction)
    if truth.shape != prediction.shape or truth.ndim != 3:
        raise ValueError(
            f"truth and prediction must be the same (n, T, n_x), got {truth.shape} and "
            f"{prediction.shape}"
        )
    n = truth.shape[0]
    fig, axes = new_figure(n, 3, size=(12, 3.2 * n + 0.6), squeeze=False)
    for i in range(n):
        extent = (*_edges(x[i]), *_edges(t[i]))
        lo = float(min(truth[i].min(), prediction[i].min()))
        hi = float(max(truth[i].max(), prediction[i].max()))
        err = prediction[i] - truth[i]
        e = float(np.abs(err).max()) or 1.0
        panels = (
            ("truth", truth[i], "viridis", lo, hi, "u"),
            ("prediction", prediction[i], "viridis", lo, hi, "u"),
            ("prediction - truth", err, "RdBu_r", -e, e, "u error"),
        )
        for j, (name, values, cmap, vmin, vmax, quantity) in enumerate(panels):
            ax = axes[i, j]
            image = ax.imshow(values, origin="lower", aspect="auto", extent=extent, cmap=cmap,
                              vmin=vmin, vmax=vmax, interpolation="nearest")  # fmt: skip
            ax.axhline(0.5 * (t[i][n_given - 1] + t[i][n_given]), color="white", lw=0.8,
                       ls="--")  # fmt: skip
            fig.colorbar(image, ax=ax, shrink=0.9, label=quantity)
            ax.set_xlabel("x")
            ax.set_ylabel("t")
            head = f"{labels[i]}: {name}" if labels is not None else name
            ax.set_title(head, fontsize=9)
    if title:
        fig.suptitle(f"{title} (dashed: end of the {n_given} given steps)")
    return fig


def plot_training_curves(history: Sequence[Mapping[str, float]], path: Path, *,
                         title: str = "") -> Path:  # fmt: skip
    """The training loss and (when recorded) the validation loss per epoch on a log scale,
    and the learning rate of each epoch."""
    fig, (ax, ax_lr) = new_figure(1, 2, size=(11, 3.8))
    epochs = [r["epoch"] for r in history]
    for key, label in (("train_loss", "training"), ("valid_loss", "validation")):
        values = [r[key] for r in history if key in r]
        if values and len(values) == len(epochs) and all(v > 0 for v in values):
            ax.semilogy(epochs, values, marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("L1 loss")
    ax.grid(alpha=0.3)
    if history:
        ax.legend(fontsize=8)
    lrs = [r["lr"] for r in history if "lr" in r]
    if lrs and len(lrs) == len(epochs):
        ax_lr.semilogy(epochs, lrs, marker="o", ms=3, color="tab:grey")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
