"""The largest k within a perplexity budget (`harp compare --auto-k`)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from harp.engine.perplexity import perplexity
from harp.methods.fit import fit_layers
from harp.methods.search import DEFAULT_GRID, SearchResult, parse_grid, search_alphas, top_layers
from harp.model.prune import check_k, temporarily_pruned
from harp.modeling import arch_for, get_module


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
