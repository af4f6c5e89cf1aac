"""Whole decoder-layer removal (ShortGPT, SLEB): the layer — attention and MLP — is taken out of the
model, so the remaining layers are renumbered and the KV cache has one slot fewer per removed layer.

Everything that knows the layer count is kept consistent: the ModuleList, `config.num_hidden_layers`,
`config.layer_types` (sliding/full attention per layer, used for masks and cache layers) and every
`layer_idx` attribute inside the kept layers (the attention modules use it to find their cache slot).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from harp.model.prune import refuse_pruned
from harp.modeling import arch_for, get_module, layer_indices


def _validate(model: nn.Module, layers: Sequence[int]) -> list[int]:
    n = len(get_module(model, arch_for(model.config).layers))
    out = layer_indices(layers, n)
    if len(out) >= n:
        raise ValueError(f"Cannot remove all {n} decoder layers; remove at most {n - 1}.")
    return sorted(out)


def _remove(model: nn.Module, layers: Sequence[int]) -> Callable[[], None]:
    """Remove decoder layers in place; return a function that undoes it exactly."""
    refuse_pruned(model, "Whole-layer removal on a HARP-pruned model is not supported: use the original model.")
    drop = set(_validate(model, layers))
    arch = arch_for(model.config)
    parent_path, attr = arch.layers.rsplit(".", 1)
    parent = get_module(model, parent_path)
    stack = getattr(parent, attr)
    keep = [i for i in range(len(stack)) if i not in drop]
    cfg = model.config
    old_num = cfg.num_hidden_layers
    old_types = getattr(cfg, "layer_types", None)
    renumbered: list[tuple[Any, int]] = []
    for new_i, old_i in enumerate(keep):
        for m in stack[old_i].modules():
            idx = getattr(m, "layer_idx", None)
            if isinstance(idx, int) and not isinstance(idx, bool):
                renumbered.append((m, idx))
                m.layer_idx = new_i
    setattr(parent, attr, nn.ModuleList([stack[i] for i in keep]))
    cfg.num_hidden_layers = len(keep)
    if old_types is not None:
        cfg.layer_types = [old_types[i] for i in keep]

    def undo() -> None:
        setattr(parent, attr, stack)
        cfg.num_hidden_layers = old_num
        if old_types is not None:
            cfg.layer_types = old_types
        for m, idx in renumbered:
            m.layer_idx = idx

    return undo


def remove_layers(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """Delete whole decoder layers (attention + MLP) from `model`, in place; returns the model.

    `layers` are indices of the current model. The result is an ordinary transformers model with
    fewer layers (`save_pretrained` writes it as such).
    """
    _remove(model, layers)
    return model


@contextmanager
def layers_removed(model: nn.Module, layers: Sequence[int]) -> Iterator[nn.Module]:
    """`remove_layers`, undone exactly on exit (the removed modules are kept aside, not copied)."""
    undo = _remove(model, layers)
    try:
        yield model
    finally:
        undo()
