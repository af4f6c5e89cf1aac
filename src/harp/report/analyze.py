"""`harp analyze` results for people: the per-layer Markdown table and the two-panel plot over depth."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from harp.methods.analyze import AnalyzeResult
from harp.report import integer_ticks, pyplot, save_figure


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def analyze_markdown(result: AnalyzeResult) -> str:
    """analyze.md: one row per layer (Sim(H), attention on itself and on the first token, the
    Attention Drop and Block Influence scores, the layer's alpha if pruned), then the notes."""
    head = (
        "| layer | Sim(H) | attn on self | attn on 1st token | cos(X, X+Attn) | Block Influence | pruned |\n"
        "|---:|---:|---:|---:|---:|---:|---|"
    )
    rows = [f"| emb | {result.embedding_sim:.3f} | | | | | |"]
    for r in result.layers:
        pruned = "" if r["alpha"] is None else f"alpha {r['alpha']:g}"
        rows.append(
            f"| {r['layer']} | {_f(r['sim'])} | {_f(r['attn_self'])} | {_f(r['attn_first'])} | "
            f"{_f(r['attn_cos'])} | {_f(r['block_influence'], 4)} | {pruned} |"
        )
    lines = [
        f"Per-layer analysis of {result.model} on {result.windows} x {result.seq_len} tokens of {result.text}.",
        "",
        head,
        *rows,
    ]
    if result.notes:
        lines += ["", *[f"- {n}" for n in result.notes]]
    return "\n".join(lines) + "\n"


def analyze_figure(result: AnalyzeResult, highlight_top: int | None = None) -> Any:
    """The matplotlib figure of `plot_analyze`: similarities (Sim(H), cos(X, X+Attn), 1 - BI) and
    attention shape over depth, pruned layers marked, layers on integer ticks."""
    plt = pyplot()
    xs = [r["layer"] for r in result.layers]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    a1.plot(xs, [r["sim"] for r in result.layers], "o-", label="Sim(H): mean pairwise cos of token states")
    a1.plot(xs, [r["attn_cos"] for r in result.layers], "s--", label="cos(X, X + Attn(LN X))  (Attention Drop)")
    a1.plot(xs, [1 - r["block_influence"] for r in result.layers], "^:", label="cos(X, layer(X))  (1 - BI, ShortGPT)")
    a1.set_ylabel("cosine similarity")
    a1.legend(fontsize=8, loc="lower right")
    a1.grid(alpha=0.3)
    nan = float("nan")
    a2.plot(xs, [r["attn_self"] if r["attn_self"] is not None else nan for r in result.layers], "o-",
            label="attention weight on itself (diagonal)")
    a2.plot(xs, [r["attn_first"] if r["attn_first"] is not None else nan for r in result.layers], "s--",
            label="attention weight on the first token")
    a2.set_ylabel("mean attention weight")
    a2.set_xlabel("decoder layer")
    a2.set_ylim(-0.02, 1.02)
    a2.legend(fontsize=8, loc="upper left")
    a2.grid(alpha=0.3)
    integer_ticks(a2.xaxis)  # shared with a1
    if highlight_top:
        n = len(xs)
        for ax in (a1, a2):
            ax.axvspan(n - highlight_top - 0.5, n - 0.5, color="tab:orange", alpha=0.12, lw=0)
        a2.text(n - highlight_top / 2 - 0.5, 0.98, f"top {highlight_top}", ha="center", va="top",
                fontsize=8, color="tab:orange")
    for r in result.layers:
        if r["alpha"] is not None:
            for ax in (a1, a2):
                ax.axvline(r["layer"], color="grey", lw=0.6, ls=":")
    fig.suptitle(f"{result.model}: per-layer evidence ({result.windows} x {result.seq_len} tokens)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_analyze(result: AnalyzeResult, path: str | os.PathLike, highlight_top: int | None = None) -> Path:
    """Write analyze.png (see `analyze_figure`), optionally shading the top `highlight_top` layers."""
    return save_figure(analyze_figure(result, highlight_top), path)
