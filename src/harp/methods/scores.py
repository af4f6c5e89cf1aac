"""Per-layer statistics from one forward pass over calibration windows, with hooks (no copies).

- `attn_cos[l]`: mean per-token cosine similarity between the input X of layer l and X + Attn(LN(X))
  (the residual stream right after the attention sub-layer) — Attention Drop's importance score
  (He et al. 2024): the higher, the less the attention sub-layer changes the stream.
- `block_cos[l]`: mean per-token cosine similarity between the input and the output of layer l;
  ShortGPT's Block Influence is `1 - block_cos` (Men et al. 2024).
- `sim[l]`: Sim(H) of the layer's output, the mean pairwise cosine similarity of the token states of
  one window (the over-smoothing measure of the HARP paper), averaged over windows.
- `attn_self[l]` / `attn_first[l]`: mean attention weight a query puts on itself / on the first token
  (averaged over heads and query positions 1..S-1); needs eager attention (weights are returned).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harp.engine.perplexity import model_device
from harp.engine.replay import layer_output
from harp.model.prune import check_k
from harp.modeling import Arch, HarpLinearAttention, HarpNoAttention, arch_for, get_module

STATS = ("attn_cos", "block_cos", "sim", "attn_self", "attn_first")


def pairwise_similarity_sums(h: torch.Tensor) -> torch.Tensor:
    """Per window (B, S, D): mean over token pairs i != j of cos(h_i, h_j), computed in O(S·D)."""
    hn = F.normalize(h.double(), dim=-1)
    s = hn.sum(dim=1)
    total = (s * s).sum(-1)
    diag = (hn * hn).sum(dim=(1, 2))
    n = h.shape[1]
    return (total - diag) / (n * (n - 1))


class _StatHooks:
    """The hooks `layer_stats` attaches to every decoder layer, and the running sums they add to."""

    def __init__(self, want: set[str], num_layers: int) -> None:
        self.want = want
        self.sums: dict[str, list[float]] = {k: [0.0] * num_layers for k in want}
        self.counts: dict[str, list[int]] = {k: [0] * num_layers for k in want}
        self.emb_sum = 0.0
        self.inputs: dict[int, torch.Tensor] = {}  # each layer's input in the current forward

    def attach(self, stack: nn.Module, arch: Arch, handles: list) -> None:
        """Register the hooks the wanted statistics need on every layer of `stack`, into `handles`."""
        want = self.want
        for j, layer in enumerate(stack):
            handles.append(layer.register_forward_pre_hook(self.pre(j), with_kwargs=True))
            if want & {"block_cos", "sim"}:
                handles.append(layer.register_forward_hook(self.post_layer(j), with_kwargs=True))
            attn = getattr(layer, arch.attn)
            if "attn_cos" in want:
                # the term added to the residual: the attention output, normed first in Gemma 2/3
                src = getattr(layer, arch.attn_out_norm) if arch.attn_out_norm else attn
                if isinstance(attn, HarpNoAttention):
                    src = attn  # removed sub-layer: adds 0, cosine 1
                handles.append(src.register_forward_hook(self.post_attn_residual(j)))
            if want & {"attn_self", "attn_first"}:
                handles.append(attn.register_forward_hook(self.post_attn_weights(j)))

    def means(self, n_windows: int) -> dict[str, list[float]]:
        """Every statistic's mean per layer (NaN where nothing was measured), and 'embedding_sim' with 'sim'."""
        out = {k: [s / c if c else float("nan") for s, c in zip(self.sums[k], self.counts[k], strict=True)]
               for k in self.want}
        if "sim" in self.want:
            out["embedding_sim"] = [self.emb_sum / n_windows]
        return out

    def add(self, key: str, j: int, value: torch.Tensor, count: int) -> None:
        self.sums[key][j] += float(value.double().sum())
        self.counts[key][j] += count

    def pre(self, j: int) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            self.inputs[j] = args[0] if args else kwargs["hidden_states"]

        return hook

    def post_layer(self, j: int) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            y = layer_output(out)
            x = self.inputs[j]
            if "block_cos" in self.want:
                self.add("block_cos", j, F.cosine_similarity(x.float(), y.float(), dim=-1), x.shape[0] * x.shape[1])
            if "sim" in self.want:
                self.add("sim", j, pairwise_similarity_sums(y), y.shape[0])
                if j == 0:
                    self.emb_sum += float(pairwise_similarity_sums(x).sum())

        return hook

    def post_attn_residual(self, j: int) -> Callable:
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            a = layer_output(out)
            x = self.inputs[j]
            self.add("attn_cos", j, F.cosine_similarity(x.float(), (x + a).float(), dim=-1), x.shape[0] * x.shape[1])

        return hook

    def post_attn_weights(self, j: int) -> Callable:
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            x = self.inputs[j]
            rows = x.shape[0] * (x.shape[1] - 1)
            if isinstance(mod, HarpLinearAttention):  # identity attention: all weight on itself
                if "attn_self" in self.want:
                    self.add("attn_self", j, torch.tensor(float(rows)), rows)
                if "attn_first" in self.want:
                    self.add("attn_first", j, torch.zeros(()), rows)
                return
            if w is None:
                return  # no weights (sdpa / flash, or the sub-layer is removed): stays NaN
            w = w.float()  # (B, H, S, S)
            if "attn_self" in self.want:
                d = torch.diagonal(w, dim1=-2, dim2=-1)[..., 1:]  # (B, H, S-1)
                self.add("attn_self", j, d.mean(dim=1), rows)
            if "attn_first" in self.want:
                self.add("attn_first", j, w[..., 1:, 0].mean(dim=1), rows)

        return hook


@torch.no_grad()
def layer_stats(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    stats: Iterable[str] = ("attn_cos", "block_cos"),
) -> dict[str, list[float]]:
    """The requested statistics (see module docstring) for every decoder layer, as lists indexed by
    layer. Also 'embedding_sim' (one value) when 'sim' is asked. Windows: (N, S) token ids, S >= 2."""
    want = set(stats)
    bad = want - set(STATS)
    if bad:
        raise ValueError(f"Unknown statistics {sorted(bad)}; choose from {', '.join(STATS)}.")
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError("windows must be a (N, seq_len) tensor with N >= 1 and seq_len >= 2.")
    arch = arch_for(model.config)
    stack = get_module(model, arch.layers)
    backbone = get_module(model, arch.backbone)
    dev = model_device(model)
    acc = _StatHooks(want, len(stack))
    handles: list = []
    try:
        acc.attach(stack, arch, handles)
        for i in range(0, len(windows), batch_size):
            backbone(input_ids=windows[i : i + batch_size].to(dev), use_cache=False)
            acc.inputs.clear()
    finally:
        for h in handles:
            h.remove()
    return acc.means(len(windows))


ATTENTION_DROP_SCORE = "mean cos(X, X + Attn(LN(X)))"  # what `attention_drop_scores` measures: the label results carry


def attention_drop_scores(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> list[float]:
    """Attention Drop (He et al. 2024): per layer, mean cos(X, X + Attn(LN(X))) over calibration tokens.
    The k highest-scoring attention sub-layers are the ones to drop."""
    return layer_stats(model, windows, batch_size, ("attn_cos",))["attn_cos"]


def block_influence(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> list[float]:
    """ShortGPT's Block Influence: per layer, 1 - mean cos(input, output) over calibration tokens.
    The k lowest-BI layers are the ones to remove."""
    return [1.0 - c for c in layer_stats(model, windows, batch_size, ("block_cos",))["block_cos"]]


def pick(scores: list[float], k: int, highest: bool) -> list[int]:
    """Indices of the k highest (or lowest) scores; ties broken by the higher layer index (for a
    pruning rule the higher layer is the conventional, cheaper-to-lose choice)."""
    check_k(k, len(scores))
    order = sorted(range(len(scores)), key=lambda i: ((-scores[i]) if highest else scores[i], -i))
    return order[:k]
