"""Score plots as PNG files: heatmaps (depth x length for the text NIAH, depth x frames for the
V-NIAH) and grouped bars (models or settings side by side).

The colour scale is fixed to 0-1 so heatmaps of different models and runs compare at a glance,
and every cell carries its score as text. The figure is drawn on an Agg canvas of its own (no
pyplot, no global backend switch) and written atomically; the PNG carries no software version,
so the same scores give the same bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

from omnilong import atomic

COLOUR_MAP = "RdYlGn"  # red (0) through yellow to green (1), as the usual NIAH heatmaps
CELL_INCHES = 0.7


def save_heatmap(
    scores: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    path: str | Path,
    *,
    xlabel: str = "",
    ylabel: str = "",
) -> None:
    """Write `scores` (one row per row label, one column per column label, values in [0, 1];
    NaN for a cell without a score) as an annotated heatmap PNG at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(scores) != len(row_labels) or not row_labels or not col_labels:
        raise ValueError(
            f"save_heatmap: expected {len(row_labels)} row(s) of scores for the row labels (at least one row "
            f"and one column), given {len(scores)} row(s) and {len(col_labels)} column label(s)"
        )
    for row, values in zip(row_labels, scores):
        if len(values) != len(col_labels):
            raise ValueError(
                f"save_heatmap: row {row!r} has {len(values)} score(s), expected {len(col_labels)} (one per column)"
            )
        outside = [value for value in values if not math.isnan(value) and not 0.0 <= value <= 1.0]
        if outside:
            raise ValueError(f"save_heatmap: row {row!r} has scores outside [0, 1]: {outside}")

    # At least as wide as two columns: a one-column grid would clip the title.
    width = 2.5 + CELL_INCHES * max(2, len(col_labels))
    figure = Figure(figsize=(width, 1.5 + 0.5 * CELL_INCHES * len(row_labels)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(
        [list(values) for values in scores], cmap=COLOUR_MAP, vmin=0.0, vmax=1.0, aspect="auto",
        interpolation="nearest",
    )
    axes.set_xticks(range(len(col_labels)), labels=list(col_labels))
    axes.set_yticks(range(len(row_labels)), labels=list(row_labels))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    for row, values in enumerate(scores):
        for col, value in enumerate(values):
            text = "-" if math.isnan(value) else f"{value:.2f}"
            axes.text(col, row, text, ha="center", va="center", fontsize=8, color="black")
    figure.colorbar(image, ax=axes, label="score")
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", metadata={"Software": None})
    atomic.write_bytes(path, png.getvalue())


def grouped_bars_png(
    series: dict[str, Sequence[float]], categories: Sequence[str], title: str, *, ylabel: str = "score",
    reference: tuple[float, str] | None = None,
) -> bytes:
    """PNG bytes: one group of bars per category, one bar (and colour) per series, each labelled
    with its value; `reference` (value, label) draws a dotted line such as chance level."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for name, values in series.items():
        if len(values) != len(categories):
            raise ValueError(f"grouped bars: series {name!r} has {len(values)} value(s), expected {len(categories)}")
    figure = Figure(figsize=(2.5 + 1.2 * len(categories), 3.8), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(len(series), 1)
    for offset, (name, values) in enumerate(series.items()):
        positions = [i + (offset - (len(series) - 1) / 2) * width for i in range(len(categories))]
        bars = axes.bar(positions, list(values), width, label=name)
        axes.bar_label(bars, fmt="%.2f", fontsize=7)
    if reference is not None:
        axes.axhline(reference[0], color="grey", linestyle=":", linewidth=1, label=reference[1])
    axes.set_xticks(range(len(categories)), list(categories), fontsize=8)
    axes.set_ylim(0, 1.1)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(loc="upper right", fontsize=7)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", metadata={"Software": None})  # same values, same bytes
    return png.getvalue()


def save_grouped_bars(series: dict[str, Sequence[float]], categories: Sequence[str], title: str, path: str | Path,
                      **kwargs) -> None:
    atomic.write_bytes(path, grouped_bars_png(series, categories, title, **kwargs))
