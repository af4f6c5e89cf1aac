"""`harp.prune`: turn chosen decoder layers of a transformers model into HARP layers, in place."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from harp.model.accounting import attention_windows
from harp.modeling import (
    FittedSink,
    HarpBlock,
    LinearMap,
    arch_for,
    check_fitted_sink,
    get_module,
    prune_layer,
    unwindow_layer,
    validate_plan,
    window_layer,
)


def check_k(k: Any, num_layers: int, *, keep_one: bool = False, name: str = "k") -> int:
    """The number of layers to prune, checked against the model's `num_layers`: a whole number from 1
    to `num_layers` (every attention sub-layer may become a HARP layer), or to `num_layers - 1` with
    `keep_one` (methods that remove whole layers, and `harp compare`, which sets them side by side at
    equal k: a model keeps at least one layer). Returns k; raises ValueError naming `name`."""
    top = num_layers - 1 if keep_one else num_layers
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= top:
        if keep_one:
            raise ValueError(f"`{name}={k!r}`: choose between 1 and {top} layers for this {num_layers}-layer model "
                             "(whole layers are removed, and a model keeps at least one).")
        raise ValueError(f"`{name}={k!r}`: must be between 1 and the model's {num_layers} layers.")
    return k


def pruned_plan(model: nn.Module) -> dict[str, Any]:
    """The HARP block of a model: {'format_version', 'layers', 'alphas'} (empty lists if unpruned), and
    'window_layers', 'windows' when it has window layers."""
    return HarpBlock.from_config(model).to_dict()


def refuse_pruned(model_or_config: Any, message: str | Callable[[HarpBlock], str]) -> None:
    """Raise ValueError(`message`) if `model_or_config` (a model, its config, or a config.json dict) is
    already HARP-pruned: every method that starts from the original model refuses a pruned one. `message`
    may be a function of the block (to name its layers)."""
    if HarpBlock.is_pruned(model_or_config):
        raise ValueError(message(HarpBlock.from_config(model_or_config)) if callable(message) else message)


def check_window_plan(config: Any, windows: Mapping[int, int] | None, bypassed: Any = (),
                      sinks: int = 0) -> dict[int, int]:
    """{layer: window} checked against `config`: whole numbers >= 1, layers in range, distinct and not among
    `bypassed`, and not a layer that is already local with a window no larger (Gemma 2/3 local layers,
    Mistral/Qwen sliding layers): that would save nothing. Raises ValueError naming the first problem."""
    if not windows:
        return {}
    if not isinstance(windows, Mapping):
        raise ValueError(f"`windows` must map layer index -> window size, got {type(windows).__name__}.")
    for w in windows.values():
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"Window {w!r}: a window is a whole number of tokens, at least 1 (the token itself).")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"`sinks={sinks!r}`: the number of first tokens a window layer also sees is a whole "
                         "number >= 0.")
    block = HarpBlock.from_lists(list(bypassed), [1.0] * len(list(bypassed)), config.num_hidden_layers)
    plan = block.with_windows(windows, config.num_hidden_layers).windows_plan
    own = attention_windows(config)
    for i, w in plan.items():
        if own[i] is not None and sinks:
            raise ValueError(f"Layer {i} is already a sliding-window layer of {own[i]} tokens: its own mask hides "
                             "the first tokens, so it cannot keep sink tokens. Use `sinks=0`, or window layers "
                             "that have full attention now.")
        if own[i] is not None and w >= own[i]:
            raise ValueError(f"Layer {i} is already a sliding-window layer of {own[i]} tokens: a window of {w} "
                             f"saves nothing there. Choose a window below {own[i]}, or another layer.")
    return plan


def prune(
    model: nn.Module, layers: list[int], alphas: list[float], maps: Mapping[int, LinearMap] | None = None,
    *, windows: Mapping[int, int] | None = None, sinks: int = 0,
    fitted_sinks: Mapping[int, FittedSink] | None = None,
) -> nn.Module:
    """Apply HARP to `model` in place and return it.

    Each layer in `layers` gets identity attention rescaled by its alpha (docs/method.md): q/k
    projections (and q/k norms) are deleted, the GQA repeat and alpha are folded into a
    `hidden x kv_dim` output matrix, the layer keeps no KV cache. `alpha == 0` removes the layer's
    whole attention sub-layer. Everything is validated before anything is changed.

    Args:
        model: a transformers causal LM of a supported family (LLaMA, Mistral, Qwen2, Qwen3,
            Gemma, Gemma2, Gemma3 text).
        layers: decoder layer indices (0-based, any order, any depth, distinct).
        alphas: one finite rescaling factor per layer, in the same order.
        maps: optional `{layer: LinearMap}` replacing a layer's folded `W_O R` by a fitted map of the
            same shape (`harp.fit_layers`); alpha scales it. Layers with alpha 0 ignore it.
        windows: optional `{layer: w}`: these layers become window layers instead (other layers than
            `layers`): they keep their attention, each token sees itself and the w - 1 tokens before it,
            and their KV cache holds at most w - 1 past tokens.
        sinks: window layers also see the first `sinks` positions (attention sinks, as StreamingLLM's), and
            keep them in their cache.
        fitted_sinks: optional `{layer: FittedSink}` for window layers (`harp.fit_sinks`): a per-head sink
            logit and an output bias standing in for sink tokens (with `sinks=0`), caching nothing more.
    """
    arch_for(model.config)  # clear error for unsupported families first
    layers, alphas = validate_plan(model.config, layers, alphas)
    window_plan = check_window_plan(model.config, windows, layers, sinks)
    fitted_sinks = dict(fitted_sinks or {})
    stray = sorted(set(fitted_sinks) - set(window_plan))
    if stray:
        raise ValueError(f"Fitted sinks given for layers {stray}, which are not being made window layers.")
    if fitted_sinks and sinks:
        raise ValueError(f"Fitted sinks stand in for sink tokens: pass `sinks=0` with them (got sinks={sinks}).")
    for idx, fitted in fitted_sinks.items():
        check_fitted_sink(model.config, idx, fitted)
    added = HarpBlock(tuple(layers), tuple(alphas)).with_windows(window_plan, model.config.num_hidden_layers, sinks,
                                                                 fitted=sorted(fitted_sinks))
    merged = HarpBlock.from_config(model).merged(added)
    maps = dict(maps or {})
    stray = sorted(set(maps) - set(layers))
    if stray:
        raise ValueError(f"Fitted maps given for layers {stray}, which are not being pruned.")
    for idx, alpha in zip(layers, alphas, strict=True):
        prune_layer(model, idx, alpha, maps.get(idx))
    for idx, w in window_plan.items():
        window_layer(model, idx, w, sinks, fitted_sinks.get(idx, False))
    model.config.harp = merged.to_dict()
    return model


@contextmanager
def temporarily_pruned(
    model: nn.Module, layers: list[int], alphas: list[float], maps: Mapping[int, LinearMap] | None = None,
    *, windows: Mapping[int, int] | None = None, sinks: int = 0,
    fitted_sinks: Mapping[int, FittedSink] | None = None,
) -> Iterator[nn.Module]:
    """Prune like `prune`, then put the original modules and weights back on exit.

    Used to score candidate alphas and baselines without copying the model: only the attention
    modules (and, for Gemma, the output-norm weight alpha is folded into) of the listed layers are
    swapped out, and they are restored exactly.
    """
    arch = arch_for(model.config)
    layers, alphas = validate_plan(model.config, layers, alphas)
    stack = get_module(model, arch.layers)
    names = [arch.attn, arch.attn_norm] + ([arch.attn_out_norm] if arch.attn_out_norm else [])
    saved = []
    for idx in layers:
        layer = stack[idx]
        mods = {n: getattr(layer, n) for n in names}
        weights = {n: m.weight.detach().clone() for n, m in mods.items() if n != arch.attn and hasattr(m, "weight")}
        saved.append((layer, mods, weights))
    old_harp = getattr(model.config, "harp", None)
    try:
        prune(model, layers, alphas, {i: m for i, m in (maps or {}).items() if i in layers}, windows=windows,
              sinks=sinks, fitted_sinks=fitted_sinks)
        yield model
    finally:
        for idx in windows or {}:
            unwindow_layer(model, idx)
        with torch.no_grad():
            for layer, mods, weights in saved:
                for n, m in mods.items():
                    setattr(layer, n, m)
                for n, w in weights.items():
                    mods[n].weight.copy_(w)
        if old_harp is None:
            if hasattr(model.config, "harp"):
                del model.config.harp
        else:
            model.config.harp = old_harp




