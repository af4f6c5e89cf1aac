"""`harp.prune`: turn chosen decoder layers of a transformers model into HARP layers, in place."""

from __future__ import annotations

from typing import Any

from torch import nn

from .modeling import FORMAT_VERSION, arch_for, prune_layer, validate_plan


def pruned_plan(model: nn.Module) -> dict[str, Any]:
    """The HARP block of a model: {'format_version', 'layers', 'alphas'} (empty lists if unpruned)."""
    harp = getattr(model.config, "harp", None) or {}
    return {
        "format_version": FORMAT_VERSION,
        "layers": list(harp.get("layers", [])),
        "alphas": list(harp.get("alphas", [])),
    }


def prune(model: nn.Module, layers: list[int], alphas: list[float]) -> nn.Module:
    """Apply HARP to `model` in place and return it.

    Each layer in `layers` gets identity attention rescaled by its alpha (HARP.md section 1): q/k
    projections (and q/k norms) are deleted, the GQA repeat and alpha are folded into a
    `hidden x kv_dim` output matrix, the layer keeps no KV cache. `alpha == 0` removes the layer's
    whole attention sub-layer. Everything is validated before anything is changed.

    Args:
        model: a transformers causal LM of a supported family (LLaMA, Mistral, Qwen2, Qwen3,
            Gemma, Gemma2, Gemma3 text).
        layers: decoder layer indices (0-based, any order, any depth, distinct).
        alphas: one finite rescaling factor per layer, in the same order.
    """
    arch_for(model.config)  # clear error for unsupported families first
    layers, alphas = validate_plan(model.config, layers, alphas)
    plan = pruned_plan(model)
    again = sorted(set(plan["layers"]) & set(layers))
    if again:
        raise ValueError(f"Layers {again} are already pruned in this model; prune each layer once.")
    for idx, alpha in zip(layers, alphas, strict=True):
        prune_layer(model, idx, alpha)
    merged = sorted(zip(plan["layers"] + layers, plan["alphas"] + alphas, strict=True))
    model.config.harp = {
        "format_version": FORMAT_VERSION,
        "layers": [i for i, _ in merged],
        "alphas": [a for _, a in merged],
    }
    return model
