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

from ..core import check_k, temporarily_pruned
from ..fit import fit_layers
from ..modeling import arch_for, get_module
from ..perplexity import perplexity
from ..progress import Progress
from ..replay import capture_inputs, run_layers, tail_nll
from ..search import DEFAULT_GRID, SearchResult, parse_grid, search_alphas, top_layers


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
    if len(layers) != len(cur) or not layers:
        raise ValueError("refine_alphas needs one alpha per layer (and at least one layer).")
    if len(set(layers)) != len(layers):
        raise ValueError(f"Layer indices must be distinct; got {layers}.")
    if getattr(model.config, "harp", None):
        raise ValueError("This model is already HARP-pruned; refine alphas on the original model.")
    if max_passes < 1:
        raise ValueError(f"max_passes must be at least 1 (got {max_passes}).")
    coarse = parse_grid(grid)
    spacing = min((b - a for a, b in zip(coarse, coarse[1:], strict=False)), default=0.1)
    g_lo, g_hi = min(coarse + cur), max(coarse + cur)
    num = len(get_module(model, arch_for(model.config).layers))
    if max(layers) >= num or min(layers) < 0:
        raise ValueError(f"Layers {layers} out of range: this model has layers 0..{num - 1}.")
    n_tokens = windows.shape[0] * (windows.shape[1] - 1)
    lo = min(layers)
    t0 = time.perf_counter()
    batches = capture_inputs(model, windows, lo, batch_size)  # original stream entering `lo`

    def ppl_of(alphas_: list[float], start: int, entry: list[torch.Tensor]) -> float:
        with temporarily_pruned(model, layers, alphas_):
            nll = sum(tail_nll(model, b, h, start, chunk_tokens) for b, h in zip(batches, entry, strict=True))
        return math.exp(nll / n_tokens)

    base_entry = [b.hidden for b in batches]
    best_ppl = ppl_of(cur, lo, base_entry)
    start_ppl = best_ppl
    evaluations = 1
    log: list[dict[str, float]] = []
    passes: list[dict[str, Any]] = []
    order = sorted(range(len(layers)), key=lambda i: -layers[i])  # top first
    phase = "coarse"
    with Progress(max_passes * len(layers), "refine", enabled=progress) as bar:
        for p in range(max_passes):
            before = best_ppl
            changed = 0
            for i in order:
                layer = layers[i]
                cands = ([a for a in coarse if abs(a - cur[i]) > 1e-9] if phase == "coarse"
                         else _fine_grid(cur[i], spacing / 4, g_lo, g_hi))
                bar.describe(f"refine pass {p + 1} ({phase}) layer {layer}")
                with temporarily_pruned(model, layers, cur):  # stream entering `layer` under the plan
                    entry = [run_layers(model, b, h, lo, layer) for b, h in zip(batches, base_entry, strict=True)]
                for a in cands:
                    trial = list(cur)
                    trial[i] = a
                    q = ppl_of(trial, layer, entry)
                    evaluations += 1
                    log.append({"pass": p, "layer": layer, "alpha": a, "ppl": q})
                    if q < best_ppl * (1 - 1e-12):
                        best_ppl, cur = q, trial
                        changed += 1
                bar.advance(1)
            passes.append({"pass": p, "grid": phase, "ppl": best_ppl, "changed": changed})
            if callback is not None:
                callback(p, best_ppl)
            if (before - best_ppl) / before < tol:
                if phase == "coarse" and fine:
                    phase = "fine"
                else:
                    break
    return RefineResult(layers, cur, start_ppl, best_ppl, passes, log, evaluations, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# auto-k
# ------------------------------------------------------------------------------------------------


@dataclass
class AutoKResult:
    k: int
    layers: list[int]  # top first, the chosen k
    alphas: list[float]
    base_ppl: float  # calibration perplexity of the original model
    budget_ppl: float
    max_increase: float  # relative, 0.1 = +10 %
    per_k: list[dict[str, float]]  # {"k", "layer", "alpha", "ppl", "seconds"} for every k searched
    seconds: float
    stopped_early: bool
    search: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _OverBudget(Exception):
    pass


def parse_ppl_increase(spec: str | float) -> float:
    """'10' or '10%' -> 0.10 (a percentage: the perplexity may rise by at most this much)."""
    s = str(spec).strip().rstrip("%").strip()
    try:
        v = float(s)
    except ValueError:
        raise ValueError(f"`max_ppl_increase={spec!r}`: give a percentage, e.g. 10 (or 10%).") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"`max_ppl_increase` must be a positive percentage (got {spec!r}).")
    return v / 100.0


def auto_k(
    model: nn.Module,
    windows: torch.Tensor,
    max_increase: float,
    *,
    max_k: int | None = None,
    grid: str | Sequence[float] | None = None,
    batch_size: int = 4,
    chunk_tokens: int = 1024,
    progress: bool = False,
    fit: bool = False,
) -> AutoKResult:
    """Choose k: HARP's greedy top-down search, run one layer deeper at a time, stops at the first k
    whose calibration perplexity exceeds `(1 + max_increase) x` the original's; the answer is the
    k before it (the greedy alphas of the top j layers do not depend on how many more follow, so
    one search serves every k). Returns k = 0 if even one layer breaks the budget.

    With `fit`, the layers get the least-squares refit instead (harp.fit_layers, each layer fitted on
    the original model's inputs, so one fit of the top `max_k` layers serves every k); k grows until the
    refit model's calibration perplexity breaks the budget.

    The budget is checked on calibration text, never on evaluation text.
    """
    if not (max_increase > 0 and math.isfinite(max_increase)):
        raise ValueError(f"max_increase must be a positive fraction (got {max_increase}).")
    num = len(get_module(model, arch_for(model.config).layers))
    max_k = num - 1 if max_k is None else check_k(max_k, num, keep_one=True, name="max_k")  # harp compare's k
    t0 = time.perf_counter()
    base = perplexity(model, windows, batch_size=batch_size, chunk_tokens=chunk_tokens).ppl
    budget = base * (1.0 + max_increase)
    per_k: list[dict[str, float]] = []

    def on_layer(layer: int, alpha: float, log: list[dict[str, float]]) -> None:
        ppl = min(e["ppl"] for e in log if e["layer"] == layer)
        per_k.append({"k": len(per_k) + 1, "layer": layer, "alpha": alpha, "ppl": ppl,
                      "seconds": time.perf_counter() - t0})
        if ppl > budget:
            raise _OverBudget

    if fit:
        return _auto_k_fit(model, windows, max_k, base, budget, max_increase, t0, batch_size, chunk_tokens, progress)
    stopped = False
    res: SearchResult | None = None
    try:
        res = search_alphas(model, windows, max_k, grid=grid if grid is not None else list(DEFAULT_GRID),
                            batch_size=batch_size, chunk_tokens=chunk_tokens, progress=progress, callback=on_layer)
    except _OverBudget:
        stopped = True
    within = [r for r in per_k if r["ppl"] <= budget]
    k = 0
    for r in per_k:  # the longest prefix within budget
        if r["ppl"] > budget:
            break
        k = int(r["k"])
    chosen = per_k[:k]
    info = {"grid": parse_grid(grid), "searched_k": len(per_k), "within_budget": len(within)}
    if res is not None:
        info["layer_forwards"] = res.layer_forwards
    return AutoKResult(
        k=k, layers=[int(r["layer"]) for r in chosen], alphas=[float(r["alpha"]) for r in chosen],
        base_ppl=base, budget_ppl=budget, max_increase=max_increase, per_k=per_k,
        seconds=time.perf_counter() - t0, stopped_early=stopped, search=info,
    )


def _auto_k_fit(model: nn.Module, windows: torch.Tensor, max_k: int, base: float, budget: float, max_increase: float,
                t0: float, batch_size: int, chunk_tokens: int, progress: bool) -> AutoKResult:
    order = top_layers(len(get_module(model, arch_for(model.config).layers)), max_k)
    fits = fit_layers(model, windows, order, batch_size=batch_size, progress=progress)
    per_k: list[dict[str, float]] = []
    k = 0
    for j in range(1, max_k + 1):
        with temporarily_pruned(model, order[:j], [1.0] * j, fits.maps):
            ppl = perplexity(model, windows, batch_size=batch_size, chunk_tokens=chunk_tokens).ppl
        per_k.append({"k": j, "layer": order[j - 1], "alpha": 1.0, "ppl": ppl, "seconds": time.perf_counter() - t0})
        if ppl > budget:
            break
        k = j
    return AutoKResult(
        k=k, layers=order[:k], alphas=[1.0] * k, base_ppl=base, budget_ppl=budget, max_increase=max_increase,
        per_k=per_k, seconds=time.perf_counter() - t0, stopped_early=k < max_k,
        search={"method": "lstsq", "searched_k": len(per_k), "fit_seconds": fits.seconds},
    )
