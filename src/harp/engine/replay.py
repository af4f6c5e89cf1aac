"""Replaying decoder layers on cached inputs: the machinery the cached search, the streamed search, the
refit and the block baselines share.

One forward of the model keeps the residual stream entering a chosen layer and the exact arguments
(masks, rotary tables, cache flags) every decoder layer above it is called with; afterwards any
stretch of layers can be run again on any hidden state with those arguments (`run_layers`), and the
loss of the model's top (`tail_nll`) computed from any layer up, the LM head in chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harp.engine.perplexity import head_nll, model_device
from harp.modeling import arch_for, get_module


class StopForward(Exception):
    """Raised by a capture hook to end a forward once everything needed was recorded."""


@dataclass
class Batch:
    """One batch of calibration windows, ready to replay from its first cached layer."""

    windows: torch.Tensor  # (B, S) token ids (for the loss)
    hidden: torch.Tensor  # residual stream entering the first searched layer
    kwargs: dict[int, tuple[tuple, dict]]  # per layer >= start: (args after hidden, kwargs)



# What a search or a fit needs to begin with: the batches entering layer `lo` and how many decoder-layer
# passes producing them took. In memory that is `capture_inputs`; the streamed model streams its bottom
# layers (harp.streaming).
Prepare = Callable[[int, Any], tuple[list[Batch], int]]

def layer_output(out: Any) -> torch.Tensor:
    """The hidden state a decoder layer returns (transformers returns a tensor or a tuple)."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_inputs(model: nn.Module, windows: torch.Tensor, start: int, batch_size: int) -> list[Batch]:
    """One forward of the model per batch, keeping the input of layer `start` and the arguments every
    layer >= start receives. Stops before the top layer runs (nothing above is needed)."""
    arch = arch_for(model.config)
    stack = get_module(model, arch.layers)
    backbone = get_module(model, arch.backbone)
    dev = model_device(model)
    batches: list[Batch] = []
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size].to(dev)
        got, hidden = record_layer_calls(backbone, stack, w, start)
        batches.append(Batch(w, hidden, got))
    return batches


def record_layer_calls(
    backbone: nn.Module, stack: nn.ModuleList, input_ids: torch.Tensor, start: int
) -> tuple[dict[int, tuple[tuple, dict]], torch.Tensor]:
    """One forward of `backbone` on `input_ids`, recording what every decoder layer >= `start` is called
    with (the arguments after the hidden state: masks, rotary tables, cache flags) and a copy of the
    hidden state entering layer `start`. Stops before the top layer runs: nothing above is needed."""
    num = len(stack)
    got: dict[int, tuple[tuple, dict]] = {}
    hidden: list[torch.Tensor] = []

    def make_hook(j: int) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            got[j] = (args[1:] if args else (), {k: v for k, v in kwargs.items() if k != "hidden_states"})
            if j == start:
                hidden.append(h.detach().clone())
            if j == num - 1:
                raise StopForward

        return hook

    handles = [stack[j].register_forward_pre_hook(make_hook(j), with_kwargs=True) for j in range(start, num)]
    try:
        backbone(input_ids=input_ids, use_cache=False)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return got, hidden[0]


@torch.no_grad()
def run_layers(model: nn.Module, batch: Batch, hidden: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Run decoder layers lo..hi-1 on `hidden` with the arguments captured for this batch."""
    stack = get_module(model, arch_for(model.config).layers)
    if lo < hi:  # activations kept off the device (streamed search) come back for the computation
        dev = next(stack[lo].parameters()).device
        if dev.type != "meta" and hidden.device != dev:
            hidden = hidden.to(dev)
    for j in range(lo, hi):
        rest, kw = batch.kwargs[j]
        hidden = layer_output(stack[j](hidden, *rest, **kw))
    return hidden


@torch.no_grad()
def tail_nll(model: nn.Module, batch: Batch, hidden: torch.Tensor, lo: int, chunk_tokens: int) -> float:
    """NLL sum of the batch when `hidden` enters layer `lo`: layers lo..L-1, final norm, head."""
    arch = arch_for(model.config)
    num = len(get_module(model, arch.layers))
    h = run_layers(model, batch, hidden, lo, num)
    h = get_module(model, arch.final_norm)(h)
    return head_nll(model, h, batch.windows, chunk_tokens)
