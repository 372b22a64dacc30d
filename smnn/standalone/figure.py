"""The standalone validation's figure, ``solutions.png``
(docs/experiments.md, "Standalone validation").

3 x 6 panels: rows y, y', y''; one column per equation, its first initial condition. Each panel
draws the closed form (wide grey line underneath) and every solver's solution, each solver with
its own colour, line style and width (solid, dashed, dotted, dash-dot in registry order, widest
first), so curves that lie on top of each other stay distinguishable; a solver that did not
converge on a drawn case says so in the legend. Made with
:mod:`smnn.plotting` (no pyplot), written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from smnn.plotting import new_figure, save_figure
from smnn.solver.registry import solver_info
from smnn.standalone.equations import EQUATIONS

__all__ = ["CLOSED_FORM_LABEL", "solver_styles", "solutions_figure", "write_solutions_figure"]

CLOSED_FORM_LABEL = "closed form"
_STYLES = (
    dict(color="tab:blue", ls="-", lw=2.2),
    dict(color="tab:orange", ls="--", lw=1.7),
    dict(color="tab:green", ls=":", lw=1.6),
    dict(color="tab:red", ls="-.", lw=1.2),
    dict(color="tab:purple", ls=(0, (5, 1, 1, 1, 1, 1)), lw=1.0),
)


def solver_styles(solvers: Sequence[str]) -> dict[str, dict]:
    """Line style keywords per solver (cycling through five distinct styles)."""
    return {s: dict(_STYLES[i % len(_STYLES)]) for i, s in enumerate(solvers)}


def solutions_figure(
    t: np.ndarray, curves: dict, solvers: Sequence[str], notes: Mapping[str, str] | None = None
) -> Figure:
    """The figure (module docstring). ``curves[(solver or "closed", equation key, ic index)]``
    is ``(3, T)``: x, x', x''. ``notes[solver]`` is appended to its legend label (e.g. that an
    iterative solver did not converge)."""
    notes = notes or {}
    labels = ("y", "y'", "y''")
    fig, axes = new_figure(
        3, len(EQUATIONS), size=(3.2 * len(EQUATIONS), 7.8), sharex=True, squeeze=False
    )
    styles = solver_styles(solvers)
    for j, ode in enumerate(EQUATIONS):
        for k in range(3):
            ax = axes[k, j]
            ax.plot(
                t, curves[("closed", ode.key, 0)][k], color="0.75", lw=4.5, label=CLOSED_FORM_LABEL
            )
            for solver in solvers:
                label = solver_info(solver).label
                if notes.get(solver):
                    label += f" ({notes[solver]})"
                ax.plot(t, curves[(solver, ode.key, 0)][k], label=label, **styles[solver])
            if j == 0:
                ax.set_ylabel(labels[k])
            if k == 0:
                ax.set_title(f"{ode.name}\n{ode.equation}", fontsize=9)
            if k == 2:
                ax.set_xlabel("t")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(
        "Closed form and every solver's solution (first initial condition, "
        "T = 1000, step 0.01, float64)",
        fontsize=10,
    )
    return fig


def write_solutions_figure(
    t: np.ndarray,
    curves: dict,
    solvers: Sequence[str],
    path: Path,
    notes: Mapping[str, str] | None = None,
) -> Path:
    """Write :func:`solutions_figure` as PNG to ``path``; returns the path."""
    return save_figure(solutions_figure(t, curves, solvers, notes), path, dpi=110)
