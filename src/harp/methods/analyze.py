"""`harp analyze`: the per-layer evidence for which layers to prune.

For every decoder layer, over calibration windows:

- Sim(H): mean pairwise cosine similarity of the token states the layer outputs (the HARP paper's
  over-smoothing measure: near 1, tokens look alike and attention has little left to mix);
- how diagonal its attention is: mean weight a query puts on itself (and, for contrast, on the first
  token, the usual "attention sink"); a pruned HARP layer is exactly diagonal;
- Attention Drop's score cos(X, X + Attn(LN X)) and ShortGPT's Block Influence 1 - cos(X, layer(X)).

The table and the plot are drawn by `harp.report.analyze`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from harp.methods.scores import layer_stats
from harp.modeling import HarpBlock, decoder_layers


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
    alpha_of = HarpBlock.from_config(model).plan
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
