"""The benchmark's figures: log-log time and peak memory against T and against the batch size,
and the error against T (``accuracy_T.png``: median over the batch of each system's max relative
error against the float64 reference solve, :mod:`smnn.benchmark.accuracy`, with the batch's
maximum as crosses; the methods that compute the S-MNN function).

One line per method and dtype (colour per method, solid float64, dashed float32; peers drawn
with square markers), measured cases only; a method with rows that did not converge is labelled
``mnn_cg (not converged)`` (:func:`smnn.benchmark.report.method_label`). A quick run's figures carry
:data:`smnn.plotting.QUICK_NOTE` in their title and as a stamp (:func:`smnn.plotting.mark_quick`).
Made with :mod:`smnn.plotting` (no pyplot) and written atomically.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from smnn.benchmark.report import method_label
from smnn.plotting import QUICK_NOTE, mark_quick, new_figure, save_figure

__all__ = ["SWEEPS", "ACCURACY_FIGURE", "scaling_figure", "accuracy_figure", "write_figures"]

# file name -> (shape group, x axis column)
SWEEPS: dict[str, tuple[str, str]] = {
    "scaling_T.png": ("T_sweep", "T"),
    "scaling_batch.png": ("batch_sweep", "B"),
}
ACCURACY_FIGURE = "accuracy_T.png"


def scaling_figure(table, group: str, axis: str, quick: bool = False) -> Figure:
    """Time (left) and peak memory (right) of ``group``'s measured rows against ``axis``
    (``"T"`` or ``"B"``)."""
    part = table[(table["group"] == group) & (table["status"] == "ok")]
    fig, (ax_t, ax_m) = new_figure(1, 2, size=(11, 4.4))
    colors = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(table["method"]))}
    peers = set(table.loc[table["family"] == "peer", "method"])
    for (m, d), line in part.groupby(["method", "dtype"], sort=False):
        line = line.sort_values(axis)
        style = dict(
            color=colors[m],
            ls="-" if d == "float64" else "--",
            marker="s" if m in peers else "o",
            ms=3.5,
            label=f"{method_label(table, m)} {d}",
        )
        ax_t.plot(line[axis], line["median_ms"], **style)
        ax_m.plot(line[axis], line["peak_mb"].clip(lower=1e-3), **style)
    for ax, ylabel in ((ax_t, "forward+backward time (ms, median)"), (ax_m, "peak memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("steps T" if axis == "T" else "batch size B")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    if part.empty:
        ax_t.text(0.5, 0.5, "no measured cases", ha="center", transform=ax_t.transAxes)
    else:
        ax_t.legend(fontsize=8)
    fixed = ", ".join(
        f"{k} = {int(part[k].iloc[0])}"
        for k in ("B", "T", "D", "R")
        if k != axis and not part.empty and part[k].nunique() == 1
    )
    title = f"Solver scaling against {'T' if axis == 'T' else 'batch size'}"
    title += f" ({fixed})" if fixed else ""
    if len(part):
        title += f", median of {int(part['repeats'].min())}+ repeats after a warm-up"
    if quick:
        title += f"\n{QUICK_NOTE}"
        mark_quick(fig)
    fig.suptitle(title)
    return fig


def accuracy_figure(table, quick: bool = False, reference: str = "qr") -> Figure:
    """Error against T (the T sweep's rows with a measured error), one line per method and
    dtype (solid float64, dashed float32): the batch median, crosses at the batch maximum."""
    part = table[(table["group"] == "T_sweep") & table["error_median"].notna()]
    fig, ax = new_figure(1, 1, size=(7.5, 4.6))
    colors = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(table["method"]))}
    for (m, d), line in part.groupby(["method", "dtype"], sort=False):
        line = line.sort_values("T")
        color, ls = colors[m], "-" if d == "float64" else "--"
        ax.plot(
            line["T"],
            line["error_median"].clip(lower=1e-18),
            color=color,
            ls=ls,
            marker="o",
            ms=3.5,
            label=f"{method_label(table, m)} {d}",
        )
        ax.plot(
            line["T"], line["error_max"].clip(lower=1e-18), color=color, ls="none", marker="x", ms=4
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("steps T")
    ax.set_ylabel(f"max relative error of u vs float64 {reference}")
    ax.grid(True, which="both", alpha=0.3)
    if part.empty:
        ax.text(0.5, 0.5, "no measured errors", ha="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
    title = f"Error against T (median over the batch; x: max), reference float64 {reference}"
    if quick:
        title += f"\n{QUICK_NOTE}"
        mark_quick(fig)
    fig.suptitle(title)
    return fig


def write_figures(table, out: Path, quick: bool = False, reference: str = "qr") -> list[Path]:
    """Write every figure of :data:`SWEEPS` and :data:`ACCURACY_FIGURE` into ``out``; returns
    their paths."""
    paths = []
    for name, (group, axis) in SWEEPS.items():
        paths.append(save_figure(scaling_figure(table, group, axis, quick), out / name, dpi=110))
    paths.append(
        save_figure(accuracy_figure(table, quick, reference), out / ACCURACY_FIGURE, dpi=110)
    )
    return paths
