"""Counting what HARP removes: from the config alone, and measured on a model and its KV cache."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .modeling import arch_for, attention_geometry


def attention_parameters(config: Any) -> dict[str, int]:
    """Parameter counts of one original attention sub-layer, by part."""
    arch = arch_for(config)
    g = attention_geometry(config)
    hidden, heads, kv, hd = g["hidden"], g["heads"], g["kv_heads"], g["head_dim"]
    if arch.bias == "qkv":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
    return {
        "q": hidden * heads * hd + (heads * hd if qkv_bias else 0),
        "k": hidden * kv * hd + (kv * hd if qkv_bias else 0),
        "v": hidden * kv * hd + (kv * hd if qkv_bias else 0),
        "o": heads * hd * hidden + (hidden if o_bias else 0),
        "o_folded": kv * hd * hidden + (hidden if o_bias else 0),
        "qk_norms": 2 * hd if arch.qk_extra else 0,
        "norms": hidden * (2 if arch.attn_out_norm else 1),
    }


def removed_parameters(config: Any, layers: list[int], alphas: list[float]) -> int:
    """How many parameters `harp.prune(model, layers, alphas)` removes (docs/method.md, "The fold").

    alpha != 0: q, k (+ q/k norms) deleted; o shrinks from hidden x heads*hd to hidden x kv*hd.
    alpha == 0: the whole attention sub-layer goes, with the norm(s) that only it used.
    """
    p = attention_parameters(config)
    total = 0
    for a in alphas:
        if float(a) == 0.0:
            total += p["q"] + p["k"] + p["v"] + p["o"] + p["qk_norms"] + p["norms"]
        else:
            total += p["q"] + p["k"] + p["qk_norms"] + (p["o"] - p["o_folded"])
    return total


def count_parameters(model: Any) -> int:
    """Distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    n = 0
    for prm in model.parameters():
        if id(prm) not in seen:
            seen.add(id(prm))
            n += prm.numel()
    return n


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by the key/value tensors of a transformers Cache object."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


def output_cache(output: Any) -> Any:
    """The KV cache object of a model output (`cache` in transformers >= 5.2x, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


@torch.no_grad()
def kv_bytes_after_prefill(model: nn.Module, tokens: int = 16) -> int:
    """Bytes in the KV cache after a prefill of `tokens` tokens (a real cache object, measured)."""
    ids = torch.arange(1, tokens + 1).unsqueeze(0).to(next(model.parameters()).device)
    return kv_cache_bytes(output_cache(model(input_ids=ids, use_cache=True)))
