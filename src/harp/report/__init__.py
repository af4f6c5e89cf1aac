"""Rendering of results for people: Markdown tables and PNG plots, one module per command
(`harp.report.bench`, `harp.report.analyze`). Everything here reads finished result dicts or
dataclasses and computes nothing new; matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from harp.util.fsio import atomic_file


def check_plot_available() -> None:
    """Raise ValueError early if matplotlib (needed for the PNG) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("The plot needs matplotlib: pip install 'harp-prune[plot]' (or pass `plot=False`).") from None


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def integer_ticks(axis: Any) -> None:
    """Only whole numbers on `axis` (e.g. `ax.xaxis`): layer indices are integers, so a tick at
    layer 2.5 means nothing."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write `fig` to the PNG `path` atomically (a temporary file, then a rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_file(path, suffix=".png") as tmp:  # savefig picks the format by the extension
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return path
