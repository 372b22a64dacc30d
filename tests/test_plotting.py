"""smnn.plotting: figures without pyplot, atomic PNG writes, the quick-mode stamp."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.image import imread

from smnn.plotting import QUICK_NOTE, mark_quick, new_figure, save_figure


def test_new_figure_leaves_the_backend_and_pyplot_alone():
    backend = matplotlib.get_backend()
    fig, axes = new_figure(2, 3, size=(6, 4))
    assert axes.shape == (2, 3) and fig.get_size_inches().tolist() == [6, 4]
    single_fig, ax = new_figure()
    assert not isinstance(ax, np.ndarray)
    assert matplotlib.get_backend() == backend
    assert fig.canvas.manager is None  # not registered with pyplot


def test_save_figure_writes_a_png_atomically(tmp_path):
    fig, ax = new_figure(size=(3, 2))
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "sub" / "f.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).shape[:2] == (100, 150)
    assert [p.name for p in path.parent.iterdir()] == ["f.png"]  # no temporary file left


def _stamps(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts if getattr(t, "smnn_quick", False)]


def test_mark_quick_stamps_every_axes(tmp_path):
    fig, _ = new_figure(1, 2)
    assert mark_quick(fig) is fig
    assert _stamps(fig) == [QUICK_NOTE, QUICK_NOTE]
    custom, _ = new_figure()
    mark_quick(custom, "quick: 1 repeat")
    assert _stamps(custom) == ["quick: 1 repeat"]
    unmarked, _ = new_figure()
    assert _stamps(unmarked) == []
    save_figure(fig, tmp_path / "q.png", dpi=40)  # the stamps render


def test_quick_stamp_covers_no_legend_entry():
    """The stamp sits outside the plotting area, so a legend anywhere inside stays readable."""
    for loc in ("lower right", "upper right", "best"):
        fig, ax = new_figure()
        for i in range(4):
            ax.plot([0, 1], [i, i + 1], label=f"series {i}")
        legend = ax.legend(loc=loc)
        mark_quick(fig)
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)  # the constrained layout places axes, legend and stamp
        stamp = next(t for t in ax.texts if getattr(t, "smnn_quick", False))
        box = stamp.get_window_extent(renderer)
        assert not box.overlaps(legend.get_window_extent(renderer)), loc
        assert box.y0 >= ax.get_window_extent(renderer).y1 - 0.5, loc  # above the axes
