"""SLEB (Song et al. 2024): remove whole decoder layers greedily, each time the one whose removal
raises calibration perplexity least — on harp's cached-replay machinery.

Per step, one forward of the current model caches the residual stream entering every layer; the
candidate "remove layer c" then only replays the layers above c (from the cached input of c), the
final norm and the LM head. That is L(L-1)/2 layer passes + L head evaluations per step instead of
L full forwards, and exactly the same numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from harp.engine.perplexity import perplexity
from harp.engine.replay import capture_inputs, run_layers, tail_nll
from harp.methods.blocks import layers_removed
from harp.model.prune import check_k
from harp.modeling import arch_for, get_module
from harp.util.progress import Progress


@dataclass
class SlebResult:
    removed: list[int]  # original layer indices, in removal order
    ppl: list[float]  # calibration perplexity after each removal
    log: list[dict[str, float]]  # every (step, layer, ppl) evaluated
    seconds: list[float]  # elapsed time after each step (from the start)
    base_ppl: float
    calib_tokens: int
    method: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sleb(
    model: nn.Module,
    windows: torch.Tensor,
    k: int,
    *,
    method: str = "cached",
    batch_size: int = 4,
    chunk_tokens: int = 1024,
    progress: bool = False,
    callback: Callable[[int, int, float], None] | None = None,
) -> SlebResult:
    """Greedily choose `k` whole layers to remove (SLEB). `method="naive"` runs a full perplexity per
    candidate (the reference); "cached" replays only the layers above the candidate. The model is
    left unchanged. `callback(step, layer, ppl)` is called after each removal."""
    arch = arch_for(model.config)
    num = len(get_module(model, arch.layers))
    check_k(k, num, keep_one=True)
    if method not in ("cached", "naive"):
        raise ValueError(f"Unknown SLEB method {method!r}: use 'cached' or 'naive'.")
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError("Calibration windows must be a (N, seq_len) tensor with seq_len >= 2.")
    n_tokens = windows.shape[0] * (windows.shape[1] - 1)
    t0 = time.perf_counter()
    base = perplexity(model, windows, batch_size=batch_size, chunk_tokens=chunk_tokens).ppl
    removed: list[int] = []
    ppls: list[float] = []
    log: list[dict[str, float]] = []
    seconds: list[float] = []
    total = sum(num - s for s in range(k))
    with Progress(total, "SLEB", enabled=progress) as bar:
        for step in range(k):
            kept = [i for i in range(num) if i not in removed]
            scores: list[tuple[float, int]] = []
            with layers_removed(model, removed):
                if method == "cached":
                    cur = len(kept)
                    batches = capture_inputs(model, windows, 0, batch_size)
                    entries = []  # entries[b][j]: stream entering current layer j
                    for b in batches:
                        ins = [b.hidden]
                        for j in range(cur - 1):
                            ins.append(run_layers(model, b, ins[-1], j, j + 1))
                        entries.append(ins)
                    for c in range(cur):
                        nll = sum(tail_nll(model, b, ins[c], c + 1, chunk_tokens)
                                  for b, ins in zip(batches, entries, strict=True))
                        scores.append((math.exp(nll / n_tokens), kept[c]))
                        bar.advance(1)
                    del batches, entries
            if method == "naive":
                for layer in kept:
                    with layers_removed(model, sorted(removed + [layer])):
                        p = perplexity(model, windows, batch_size=batch_size, chunk_tokens=chunk_tokens).ppl
                    scores.append((p, layer))
                    bar.advance(1)
            for p, layer in scores:
                log.append({"step": step, "layer": layer, "ppl": p})
            best_ppl, best = min(scores, key=lambda s: (s[0], -s[1]))  # ties -> the higher layer
            removed.append(best)
            ppls.append(best_ppl)
            seconds.append(time.perf_counter() - t0)
            if callback is not None:
                callback(step, best, best_ppl)
    return SlebResult(removed, ppls, log, seconds, base, n_tokens, method)
