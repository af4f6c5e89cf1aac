"""`harp analyze`: the per-layer evidence for which layers to prune.

For every decoder layer, over calibration windows:

- Sim(H): mean pairwise cosine similarity of the token states the layer outputs (the HARP paper's
  over-smoothing measure: near 1, tokens look alike and attention has little left to mix);
- how diagonal its attention is: mean weight a query puts on itself (and, for contrast, on the first
  token, the usual "attention sink"); a pruned HARP layer is exactly diagonal;
- Attention Drop's score cos(X, X + Attn(LN X)) and ShortGPT's Block Influence 1 - cos(X, layer(X)).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .methods.scores import layer_stats
from .modeling import decoder_layers


@dataclass
class AnalyzeResult:
    model: str
    layers: list[dict[str, Any]]  # per layer: layer, sim, attn_self, attn_first, attn_cos, block_influence, alpha
    embedding_sim: float
    windows: int
    seq_len: int
    text: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        head = ("| layer | Sim(H) | attn on self | attn on 1st token | cos(X, X+Attn) | Block Influence | pruned |\n"
                "|---:|---:|---:|---:|---:|---:|---|")
        rows = [f"| emb | {self.embedding_sim:.3f} | | | | | |"]
        for r in self.layers:
            pruned = "" if r["alpha"] is None else f"alpha {r['alpha']:g}"
            rows.append(f"| {r['layer']} | {_f(r['sim'])} | {_f(r['attn_self'])} | {_f(r['attn_first'])} | "
                        f"{_f(r['attn_cos'])} | {_f(r['block_influence'], 4)} | {pruned} |")
        lines = [f"Per-layer analysis of {self.model} on {self.windows} x {self.seq_len} tokens of {self.text}.",
                 "", head, *rows]
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


@torch.no_grad()
def analyze(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 2, name: str = "model",
            text: str = "") -> AnalyzeResult:
    """Per-layer Sim(H), attention diagonality, Attention Drop and Block Influence scores of `model`.

    Attention weights need eager attention: the model is switched to it for the pass and back after.
    """
    t0 = time.perf_counter()
    impl = getattr(model.config, "_attn_implementation", None)
    switched = impl not in (None, "eager")
    if switched:
        model.set_attn_implementation("eager")
    try:
        st = layer_stats(model, windows, batch_size, ("sim", "attn_self", "attn_first", "attn_cos", "block_cos"))
    finally:
        if switched:
            model.set_attn_implementation(impl)
    plan = getattr(model.config, "harp", None) or {}
    alpha_of = dict(zip(plan.get("layers", []), plan.get("alphas", []), strict=True))
    layers = []
    for j in range(len(decoder_layers(model))):
        layers.append({
            "layer": j,
            "sim": st["sim"][j],
            "attn_self": _none_if_nan(st["attn_self"][j]),
            "attn_first": _none_if_nan(st["attn_first"][j]),
            "attn_cos": st["attn_cos"][j],
            "block_influence": 1.0 - st["block_cos"][j],
            "alpha": alpha_of.get(j),
        })
    notes = []
    removed = [r["layer"] for r in layers if r["alpha"] == 0]
    if removed:
        notes.append(f"layers {removed} have no attention sub-layer (alpha = 0): no attention weights")
    return AnalyzeResult(name, layers, st["embedding_sim"][0], int(windows.shape[0]), int(windows.shape[1]), text,
                         time.perf_counter() - t0, notes)


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


def plot(result: AnalyzeResult, path: str | Path, highlight_top: int | None = None) -> Path:
    """Two panels over depth: similarities (Sim(H), cos(X, X+Attn), 1 - BI) and attention shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
