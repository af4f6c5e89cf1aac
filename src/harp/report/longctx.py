"""Long-context results for people: the PNG of mean loss against position (one line per model) and
a Markdown table of retrieval accuracy per task and context."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harp.engine.longctx import PositionLosses, RetrievalScore
from harp.report import pyplot, save_figure


def _as_dict(r: PositionLosses | Mapping[str, Any]) -> dict[str, Any]:
    return r.to_dict(curve=True) if isinstance(r, PositionLosses) else dict(r)


def smooth_curve(curve: list[float], points: int = 64) -> tuple[list[float], list[float]]:
    """Mean of `curve` (curve[p - 1] = loss at position p) over about `points` log-spaced spans:
    (positions at the span centres, mean loss). Long curves are too noisy to plot token by token."""
    n = len(curve)
    if n == 0:
        return [], []
    edges = sorted({1} | {max(1, round((n + 1) ** (i / points))) for i in range(points + 1)} | {n + 1})
    xs, ys = [], []
    for a, b in zip(edges[:-1], edges[1:], strict=False):
        seg = curve[a - 1:b - 1]
        if seg:
            xs.append((a + b - 1) / 2)
            ys.append(sum(seg) / len(seg))
    return xs, ys


def _series(d: Mapping[str, Any], seq_len: int) -> tuple[list[float], list[float], bool]:
    """(positions, mean loss, per-bucket?) of one result dict: the smoothed curve when it has one, else its
    buckets' means at their centres."""
    curve, points = d.get("curve") or [], d.get("curve_points") or {}
    if curve or points.get("position"):
        xs, ys = smooth_curve(curve) if curve else (list(points["position"]), list(points["nll"]))
        return xs, ys, False
    bs = d.get("buckets") or []
    return [(b["start"] + min(b["end"], seq_len or b["end"])) / 2 for b in bs], [b["nll"] for b in bs], True


def plot_position_losses(results: Mapping[str, PositionLosses | Mapping[str, Any]], path: str | os.PathLike,
                         *, title: str | None = None, reference: str | None = "original") -> Path:
    """Write a PNG of mean next-token loss against position, one line per model (`results`: name ->
    `position_losses` result or its dict). With the per-position curve present the line is the curve
    averaged over log-spaced spans (`smooth_curve`; a dict may carry those spans instead, as
    `curve_points` {'position': [...], 'nll': [...]}); from a JSON without either, one point per bucket.

    When `reference` names one of several results, a second panel shows each other model's loss minus the
    reference's at the same positions: the position-dependent noise every model shares cancels there, and
    what is left is what pruning costs at each distance — the panel to read."""
    if not results:
        raise ValueError("`results` is empty: nothing to plot.")
    import numpy as np

    plt = pyplot()
    dicts = {name: _as_dict(r) for name, r in results.items()}
    seq_len = max(int(d.get("seq_len") or 0) for d in dicts.values())
    series = {name: _series(d, seq_len) for name, d in dicts.items()}
    ref = series.get(reference) if reference is not None and len(series) > 1 else None
    if ref is not None and len(ref[0]) < 2:
        ref = None  # one point: nothing to interpolate against
    fig, axes = plt.subplots(2 if ref is not None else 1, 1, sharex=True,
                             figsize=(9.5 if len(series) > 6 else 7.5, 7.0 if ref is not None else 4.5))
    axes = list(np.atleast_1d(axes))
    # more models than one palette has colours: the second ten get dashed lines
    colours = plt.get_cmap("tab10").colors
    style = {name: {"color": colours[i % 10], "linestyle": ("-", "--", ":", "-.")[(i // 10) % 4], "linewidth": 1.5}
             for i, name in enumerate(series)}
    for name, (xs, ys, buckets) in series.items():
        marker = "o" if buckets else None
        axes[0].plot(xs, ys, marker=marker, label=f"{name} (ppl {dicts[name]['ppl']:.2f})", **style[name])
        if ref is not None:
            base = np.interp(np.log(xs), np.log(ref[0]), ref[1])  # the reference at this line's positions
            axes[1].plot(xs, np.asarray(ys) - base, marker=marker, **style[name])
    axes[0].set_ylabel("mean next-token loss (nats)")
    axes[0].set_title(title or f"Loss by position ({seq_len}-token windows)")
    if ref is not None:
        axes[1].axhline(0.0, color="black", linewidth=0.8)
        axes[1].set_ylabel(f"loss − {reference}'s (nats)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    axes[-1].set_xlabel("position in the window (tokens, log scale)")
    if len(series) > 6:  # a long legend beside the plot, not over the lines
        axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def retrieval_markdown(rows: Mapping[str, Mapping[str, RetrievalScore | Mapping[str, Any]]]) -> str:
    """A Markdown table: one row per model (`rows`: model -> {'passkey@4096': score, ...}), one column
    per task and context, cells 'acc ±stderr (n)', or '(n of N)' for a cell whose dict says it has
    only n of the `planned` N items so far."""
    cols: list[str] = []
    for scores in rows.values():
        for k in scores:
            if k not in cols:
                cols.append(k)
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for model, scores in rows.items():
        cells = []
        for c in cols:
            s = scores.get(c)
            if s is None:
                cells.append("–")
                continue
            d = s.to_dict() if isinstance(s, RetrievalScore) else s
            of = d.get("planned")  # a cell measured in part so far (a resumable run cut short)
            n = f"{d['n']} of {of}" if of and of > d["n"] else d["n"]
            cells.append(f"{d['acc']:.2f} ±{d['stderr']:.2f} ({n})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
