"""Figures for the pipeline's PNG outputs, made without pyplot.

Every figure is a :class:`matplotlib.figure.Figure` created directly (not through ``pyplot``), so
making one never selects or switches the caller's matplotlib backend, opens no window and keeps no
global figure registry: plotting from inside a notebook or a GUI program leaves it as it was.
:func:`save_figure` writes the PNG atomically (a killed job never leaves half an image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from smnn.io import atomic_write

__all__ = ["new_figure", "save_figure", "mark_quick", "QUICK_NOTE"]

QUICK_NOTE = "quick mode: few repeats, indicative only"
QUICK_NOTE_COLOR = "tab:red"


def new_figure(
    nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (6.4, 4.8), **subplot_kw: Any
) -> tuple[Figure, Any]:
    """A figure of ``size`` inches with an ``nrows x ncols`` grid of axes.

    Returns ``(figure, axes)``: one ``Axes`` for a 1 x 1 grid, else a numpy array of them (as
    ``plt.subplots`` returns). Extra keywords go to ``Figure.subplots`` (e.g. ``squeeze``).
    """
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, **subplot_kw)
    return fig, axes


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically; returns the path. The figure's title
    (``suptitle``), when it has one, is also stored as the PNG's ``Title`` text chunk, so a
    reader (or a test: ``PIL.Image.open(path).info["Title"]``) sees what the image says."""
    title = fig.get_suptitle()
    metadata = {"Title": title} if title else None
    return atomic_write(
        path, lambda f: fig.savefig(f, format="png", dpi=dpi, metadata=metadata), binary=True
    )


def mark_quick(fig: Figure, note: str = QUICK_NOTE) -> Figure:
    """Stamp ``note`` (default :data:`QUICK_NOTE`) just above the upper-right corner of every
    axes of ``fig``, outside the plotting area (so it never covers data or a legend entry), so no
    panel of a quick run is mistaken for a measurement at full size; returns ``fig``.

    Each stamp is an axes text (``ax.texts``) with the attribute ``smnn_quick = True``.
    """
    for ax in fig.axes:
        text = ax.text(1.0, 1.005, note, transform=ax.transAxes, ha="right", va="bottom",
                       fontsize=7, color=QUICK_NOTE_COLOR, fontweight="bold", zorder=10,
                       clip_on=False)  # fmt: skip
        text.smnn_quick = True
    return fig
