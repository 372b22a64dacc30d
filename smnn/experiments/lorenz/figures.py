"""The Lorenz evaluation's figures (PNG, through :mod:`smnn.plotting`, never pyplot).

- :func:`plot_trajectories`: the true and the recovered system in 3-D, side by side;
- :func:`plot_time_series`: x, y, z against time, true and recovered;
- :func:`plot_losses`: the loss per epoch (thresholding cycles marked) and per optimisation step;
- :func:`plot_coefficients`: recovered against true coefficients, one panel per equation.

Each takes a ``title`` (the evaluation passes ``solver <name>``, with the mark of
:func:`smnn.solver.mnn.convergence_label` -- ``solver mnn_cg (not converged)`` -- for a model
whose CG solves did not converge), drawn above the panels and stored as the PNG's ``Title``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from smnn.experiments.library import CandidateLibrary
from smnn.plotting import new_figure, save_figure

__all__ = ["plot_trajectories", "plot_time_series", "plot_losses", "plot_coefficients"]


def plot_trajectories(true: np.ndarray, sim: np.ndarray, path: Path, title: str = "") -> Path:
    """``true`` ``(N, 3)`` and ``sim`` ``(n, 3)`` as 3-D curves."""
    fig, axes = new_figure(1, 2, size=(11, 5), subplot_kw={"projection": "3d"}, squeeze=False)
    for ax, data, label, color in (
        (axes[0, 0], true, "true equations", "tab:blue"),
        (axes[0, 1], sim, "recovered equations", "tab:orange"),
    ):
        ax.plot(data[:, 0], data[:, 1], data[:, 2], lw=0.6, color=color)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_zlabel("z")
        ax.set_title(f"{label} ({data.shape[0]} points)")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_time_series(
    true: np.ndarray, sim: np.ndarray, dt: float, path: Path, title: str = ""
) -> Path:
    """x, y, z of ``true`` ``(N, 3)`` and ``sim`` ``(n, 3)`` against time (step ``dt``)."""
    fig, axes = new_figure(3, 1, size=(10, 6), sharex=True)
    t_true = dt * np.arange(true.shape[0])
    t_sim = dt * np.arange(sim.shape[0])
    for k, name in enumerate("xyz"):
        axes[k].plot(t_true, true[:, k], lw=1.0, label="true")
        axes[k].plot(t_sim, sim[:, k], lw=1.0, ls="--", label="recovered")
        axes[k].set_ylabel(name)
    axes[0].legend(loc="upper right")
    axes[-1].set_xlabel("time")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_losses(
    history: list[dict],
    step_losses: list[float],
    epochs_per_cycle: int,
    path: Path,
    title: str = "",
) -> Path:
    """Loss per epoch (left; dotted lines where a thresholding cycle starts) and per step;
    ``title`` (e.g. the solver) above both."""
    fig, axes = new_figure(1, 2, size=(11, 4))
    epochs = [r["epoch"] for r in history]
    for key, label in (
        ("train_loss", "total"),
        ("loss_solution", "MSE(u, x)"),
        ("loss_denoise", "MSE(x_hat, x)"),
    ):
        if history and key in history[0]:
            axes[0].semilogy(epochs, [r[key] for r in history], label=label)
    for c in range(epochs_per_cycle, len(history), epochs_per_cycle):
        axes[0].axvline(c - 0.5, color="grey", lw=0.5, ls=":")
    axes[0].set_xlabel("epoch (dotted: thresholding)")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[1].semilogy(np.arange(len(step_losses)), step_losses)
    axes[1].set_xlabel("optimisation step")
    axes[1].set_ylabel("training loss")
    axes[1].set_title(f"first {len(step_losses)} steps")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_coefficients(
    library: CandidateLibrary, xi: np.ndarray, truth: np.ndarray, path: Path, title: str = ""
) -> Path:
    """Bars of the recovered ``xi`` and the true coefficients ``(n_terms, n_vars)``;
    ``title`` (e.g. the solver) above the panels."""
    fig, axes = new_figure(1, library.n_vars, size=(13, 4), squeeze=False)
    pos = np.arange(library.n_terms)
    for j, var in enumerate(library.variables):
        ax = axes[0, j]
        ax.bar(pos - 0.2, truth[:, j], width=0.4, label="true")
        ax.bar(pos + 0.2, xi[:, j], width=0.4, label="recovered")
        ax.set_xticks(pos, library.names, rotation=60)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"d{var}/dt")
        ax.set_xlabel("library term")
        ax.set_ylabel(f"coefficient in d{var}/dt")
    axes[0, 0].legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
