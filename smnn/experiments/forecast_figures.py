"""Forecast figures shared by the forecasting experiments (SST, KdV), through
:mod:`smnn.plotting` (never pyplot).

- :func:`plot_forecast_samples`: at a few sample points, the observed history, the truth over
  the forecast window and each model's forecast, the given (initial) steps marked;
- :func:`plot_error_by_lead`: every model's MSE against the lead time.

Time axes count steps relative to the start of the forecast window (the history is negative).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from smnn.plotting import new_figure, save_figure

__all__ = ["plot_forecast_samples", "plot_error_by_lead", "MODEL_STYLES"]

# line style per model name (others get the default colour cycle)
MODEL_STYLES: dict[str, dict[str, object]] = {
    "mechanistic_identifier": {"color": "tab:red", "label": "Mechanistic Identifier"},
    "adagvae": {"color": "tab:purple", "label": "Ada-GVAE"},
    "climatology": {"color": "tab:green", "label": "climatology", "ls": "--"},
    "persistence": {"color": "tab:grey", "label": "persistence", "ls": ":"},
}


def _style(name: str) -> dict[str, object]:
    return dict(MODEL_STYLES.get(name, {"label": name}))


def plot_forecast_samples(
    history: np.ndarray,
    truth: np.ndarray,
    forecasts: Mapping[str, np.ndarray],
    n_given: int,
    path: Path,
    *,
    labels: Sequence[str] | None = None,
    title: str = "",
    ylabel: str = "value",
    step_unit: str = "steps",
) -> Path:
    """One panel per sample point.

    Args:
        history: ``(n, H)`` observations before the forecast window (``H`` may be 0).
        truth: ``(n, F)`` the truth over the forecast window.
        forecasts: model name -> ``(n, F)``.
        n_given: the first steps of the forecast window given to the models (shaded).
        labels: ``n`` panel titles (e.g. the cells' coordinates).
        ylabel, step_unit: axis labels.
    """
    history, truth = np.asarray(history), np.asarray(truth)
    n, n_hist, n_fut = truth.shape[0], history.shape[1], truth.shape[1]
    fig, axes = new_figure(n, 1, size=(10, 2.2 * n + 0.6), squeeze=False, sharex=True)
    t_hist, t_fut = np.arange(-n_hist, 0), np.arange(n_fut)
    for i in range(n):
        ax = axes[i, 0]
        if n_hist:
            ax.plot(t_hist, history[i], color="black", lw=0.8, alpha=0.5, label="observed")
        ax.plot(t_fut, truth[i], color="black", lw=1.0, label="truth")
        for name, f in forecasts.items():
            ax.plot(t_fut, np.asarray(f)[i], lw=1.0, **_style(name))
        ax.axvspan(-0.5, n_given - 0.5, color="tab:blue", alpha=0.12, lw=0)
        ax.axvline(-0.5, color="grey", lw=0.6)
        ax.set_ylabel(ylabel)
        if labels is not None:
            ax.set_title(labels[i], fontsize=9)
    axes[0, 0].legend(loc="upper left", fontsize=7, ncol=3)
    axes[-1, 0].set_xlabel(
        f"{step_unit} from the start of the forecast window (shaded: {n_given} given)"
    )
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_error_by_lead(
    errors: Mapping[str, np.ndarray],
    path: Path,
    *,
    title: str = "",
    ylabel: str = "MSE",
    step_unit: str = "steps",
    log: bool = False,
) -> Path:
    """Each model's MSE ``(L,)`` against the lead time ``1 .. L``."""
    fig, ax = new_figure(size=(8, 4.5))
    for name, e in errors.items():
        e = np.asarray(e)
        lead = np.arange(1, e.shape[0] + 1)
        ax.plot(lead, e, lw=1.2, **_style(name))
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(f"lead time ({step_unit} after the given ones)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
