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


def plot_position_losses(results: Mapping[str, PositionLosses | Mapping[str, Any]], path: str | os.PathLike,
                         *, title: str | None = None) -> Path:
    """Write a PNG of mean next-token loss against position, one line per model (`results`: name ->
    `position_losses` result or its dict). With the per-position curve present the line is the curve
    averaged over log-spaced spans (`smooth_curve`; a dict may carry those spans instead, as
    `curve_points` {'position': [...], 'nll': [...]}); from a JSON without either, one point per bucket."""
    if not results:
        raise ValueError("`results` is empty: nothing to plot.")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    seq_len = 0
    for name, r in results.items():
        d = _as_dict(r)
        seq_len = max(seq_len, int(d.get("seq_len") or 0))
        curve, points = d.get("curve") or [], d.get("curve_points") or {}
        if curve or points.get("position"):
            xs, ys = smooth_curve(curve) if curve else (points["position"], points["nll"])
            ax.plot(xs, ys, label=f"{name} (ppl {d['ppl']:.2f})", linewidth=1.6)
        else:
            bs = d.get("buckets") or []
            xs = [(b["start"] + min(b["end"], seq_len or b["end"])) / 2 for b in bs]
            ax.plot(xs, [b["nll"] for b in bs], marker="o", label=f"{name} (ppl {d['ppl']:.2f})", linewidth=1.6)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the window (tokens, log scale)")
    ax.set_ylabel("mean next-token loss (nats)")
    ax.set_title(title or f"Loss by position ({seq_len}-token windows)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
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
