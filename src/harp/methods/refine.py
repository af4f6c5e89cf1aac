"""Beyond the paper's single greedy pass:

- `refine_alphas`: coordinate descent over the pruned layers' alphas — each layer re-searched with
  all the others fixed, pass after pass, first on the coarse grid and then on a finer grid centred
  on each optimum — until calibration perplexity stops improving. The greedy pass fixes the top
  layer's alpha before any lower layer is pruned; refinement lets it adapt to them.
- `auto_k`: the largest k whose searched model stays within a calibration-perplexity budget.

Both use the cached replay of `harp.search`: everything below the lowest pruned layer is the
original model, so its stream is cached once; a candidate for layer l replays only layers l..L-1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from harp.engine.replay import Batch, capture_inputs, run_layers, tail_nll
from harp.methods.search import parse_grid
from harp.model.prune import refuse_pruned, temporarily_pruned
from harp.modeling import arch_for, get_module
from harp.util.progress import Progress


@dataclass
class RefineResult:
    layers: list[int]  # same order as given (top first)
    alphas: list[float]
    start_ppl: float  # calibration perplexity of the starting (greedy) alphas
    final_ppl: float
    passes: list[dict[str, Any]]  # per pass: {"pass", "grid", "ppl", "changed"}
    log: list[dict[str, float]]  # every (pass, layer, alpha, ppl) evaluated
    evaluations: int
    seconds: float

    @property
    def gain(self) -> float:
        """Relative calibration-perplexity reduction over the starting alphas (0.02 = 2 % lower)."""
        return 1.0 - self.final_ppl / self.start_ppl

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gain"] = self.gain
        return d


def _fine_grid(center: float, step: float, lo: float, hi: float) -> list[float]:
    """center ± step, ± 2 step (step = a quarter of the coarse spacing), clipped to [lo, hi]."""
    vals = {round(center + i * step, 6) for i in (-2, -1, 1, 2)}
    return sorted(v for v in vals if lo - 1e-9 <= v <= hi + 1e-9 and abs(v - center) > 1e-9)


@dataclass
class _Tail:
    """The cached replay refinement runs on: the original stream entering the lowest pruned layer, and the
    model's top from any pruned layer up under a plan; counts the perplexity evaluations."""

    model: nn.Module
    layers: list[int]
    batches: list[Batch]
    chunk_tokens: int
    n_tokens: int
    evaluations: int = 0

    @property
    def lo(self) -> int:
        return min(self.layers)

    def entry(self, alphas: list[float], layer: int) -> list[torch.Tensor]:
        """The stream entering `layer` with `layers` pruned at `alphas`."""
        with temporarily_pruned(self.model, self.layers, alphas):
            return [run_layers(self.model, b, b.hidden, self.lo, layer) for b in self.batches]

    def ppl(self, alphas: list[float], start: int, entry: list[torch.Tensor]) -> float:
        """Calibration perplexity with `layers` pruned at `alphas`, replayed from layer `start` on `entry`."""
        with temporarily_pruned(self.model, self.layers, alphas):
            nll = sum(tail_nll(self.model, b, h, start, self.chunk_tokens)
                      for b, h in zip(self.batches, entry, strict=True))
        self.evaluations += 1
        return math.exp(nll / self.n_tokens)


@dataclass
class _Grids:
    """The candidates for one layer's alpha: the coarse grid, or ± 1/4 and ± 1/2 its spacing around the
    current alpha, within the span of the grid and the starting alphas."""

    coarse: list[float]
    spacing: float
    lo: float
    hi: float

    def candidates(self, phase: str, current: float) -> list[float]:
        if phase == "coarse":
            return [a for a in self.coarse if abs(a - current) > 1e-9]
        return _fine_grid(current, self.spacing / 4, self.lo, self.hi)


@dataclass
class _Descent:
    """Where coordinate descent stands: the current alphas, their perplexity, every evaluation so far."""

    alphas: list[float]
    ppl: float
    log: list[dict[str, float]] = field(default_factory=list)


def _check_refine(model: nn.Module, layers: list[int], alphas: list[float], max_passes: int) -> None:
    if len(layers) != len(alphas) or not layers:
        raise ValueError("refine_alphas needs one alpha per layer (and at least one layer).")
    if len(set(layers)) != len(layers):
        raise ValueError(f"Layer indices must be distinct; got {layers}.")
    refuse_pruned(model, "This model is already HARP-pruned; refine alphas on the original model.")
    if max_passes < 1:
        raise ValueError(f"max_passes must be at least 1 (got {max_passes}).")


def _refine_pass(tail: _Tail, at: _Descent, grids: _Grids, p: int, phase: str, bar: Progress) -> int:
    """One pass: each layer, top first, re-searched with the others fixed; returns how many changes it kept."""
    changed = 0
    for i in sorted(range(len(tail.layers)), key=lambda i: -tail.layers[i]):  # top first
        layer = tail.layers[i]
        cands = grids.candidates(phase, at.alphas[i])
        bar.describe(f"refine pass {p + 1} ({phase}) layer {layer}")
        entry = tail.entry(at.alphas, layer)  # stream entering `layer` under the plan
        for a in cands:
            trial = list(at.alphas)
            trial[i] = a
            q = tail.ppl(trial, layer, entry)
            at.log.append({"pass": p, "layer": layer, "alpha": a, "ppl": q})
            if q < at.ppl * (1 - 1e-12):
                at.ppl, at.alphas = q, trial
                changed += 1
        bar.advance(1)
    return changed


@torch.no_grad()
def refine_alphas(
    model: nn.Module,
    windows: torch.Tensor,
    layers: Sequence[int],
    alphas: Sequence[float],
    *,
    grid: str | Sequence[float] | None = None,
    fine: bool = True,
    max_passes: int = 6,
    tol: float = 1e-4,
    batch_size: int = 4,
    chunk_tokens: int = 1024,
    progress: bool = False,
    callback: Callable[[int, float], None] | None = None,
) -> RefineResult:
    """Coordinate descent on the alphas of `layers`, starting from `alphas` (e.g. the greedy result).

    Each pass visits the layers top first; for each it evaluates every grid value with the other
    alphas fixed and keeps the best (a change must lower calibration perplexity). Coarse passes
    (the search grid) repeat until a pass improves perplexity by less than `tol` (relative); then,
    if `fine`, passes on a grid of ± 1/4 and ± 1/2 the coarse spacing around each current alpha,
    again until no improvement. At most `max_passes` passes in all. The model is left unchanged.
    `callback(pass_index, ppl)` is called after each pass.
    """
    layers = [int(i) for i in layers]
    cur = [float(a) for a in alphas]
    _check_refine(model, layers, cur, max_passes)
    coarse = parse_grid(grid)
    spacing = min((b - a for a, b in zip(coarse, coarse[1:], strict=False)), default=0.1)
    grids = _Grids(coarse, spacing, min(coarse + cur), max(coarse + cur))
    num = len(get_module(model, arch_for(model.config).layers))
    if max(layers) >= num or min(layers) < 0:
        raise ValueError(f"Layers {layers} out of range: this model has layers 0..{num - 1}.")
    n_tokens = windows.shape[0] * (windows.shape[1] - 1)
    t0 = time.perf_counter()
    batches = capture_inputs(model, windows, min(layers), batch_size)  # original stream entering the lowest
    tail = _Tail(model, layers, batches, chunk_tokens, n_tokens)
    at = _Descent(cur, tail.ppl(cur, tail.lo, [b.hidden for b in batches]))
    start_ppl = at.ppl
    passes: list[dict[str, Any]] = []
    phase = "coarse"
    with Progress(max_passes * len(layers), "refine", enabled=progress) as bar:
        for p in range(max_passes):
            before = at.ppl
            changed = _refine_pass(tail, at, grids, p, phase, bar)
            passes.append({"pass": p, "grid": phase, "ppl": at.ppl, "changed": changed})
            if callback is not None:
                callback(p, at.ppl)
            if (before - at.ppl) / before < tol:
                if phase == "coarse" and fine:
                    phase = "fine"
                else:
                    break
    return RefineResult(layers, at.alphas, start_ppl, at.ppl, passes, at.log, tail.evaluations,
                        time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# auto-k
# ------------------------------------------------------------------------------------------------










