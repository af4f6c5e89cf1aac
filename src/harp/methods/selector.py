"""Pruning methods selectable by name, all at equal KV-cache reduction (k attention sub-layers removed
or bypassed), all on the same calibration windows and replay machinery (docs/method.md, "Baselines").

    plan = select("attention-drop", model, calib_windows, k=8)
    with applied(model, plan):
        ...  # the model is pruned here, restored exactly afterwards

| name | what is pruned | how the layers / alphas are chosen |
|---|---|---|
| harp | attention of the top k layers -> rescaled identity | greedy top-down alpha search |
| harp-refine | same | greedy search + coordinate-descent passes (coarse, then finer grid) |
| no-rescale | same layers, alpha = 1 | none |
| attn-drop-top | same layers, alpha = 0 (attention sub-layer removed) | none |
| harp-low | attention of the bottom k layers -> rescaled identity | the same greedy search |
| harp-any | attention of k layers, any depth -> rescaled identity | Attention Drop's layers, greedy search |
| harp-ls | attention of the top k layers -> least-squares refit map | closed-form ridge fit per layer |
| harp-any-ls | attention of k layers, any depth -> least-squares refit map | Attention Drop's layers, closed-form fit |
| attention-drop | k attention sub-layers, any depth, removed | highest cos(X, X + Attn(LN X)) (He et al.) |
| shortgpt | k whole layers removed | lowest Block Influence (Men et al.) |
| sleb | k whole layers removed | greedy: least calibration-perplexity increase (Song et al.) |
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harp.engine.perplexity import perplexity
from harp.methods.blocks import layers_removed
from harp.methods.fit import LayerFit, fit_layers
from harp.methods.refine import RefineResult, refine_alphas
from harp.methods.registry import parse_methods
from harp.methods.scores import attention_drop_scores, block_influence, pick
from harp.methods.search import DEFAULT_GRID, parse_grid, search_alphas, top_layers
from harp.methods.sleb import SlebResult, sleb
from harp.model.prune import check_k, temporarily_pruned
from harp.modeling import LinearMap, decoder_layers


@dataclass
class Plan:
    """What a method decided: which layers, and (attention methods) which alphas."""

    method: str
    kind: str  # "attention" | "blocks" | "none"
    layers: list[int]  # original layer indices, in the order chosen
    alphas: list[float] | None = None  # attention methods: one per layer
    search_seconds: float = 0.0
    calib_ppl: float | None = None  # calibration perplexity of the pruned model, when the method measured it
    info: dict[str, Any] = field(default_factory=dict)
    maps: dict[int, LinearMap] | None = None  # refit methods: each layer's fitted map (alpha scales it)

    @property
    def k(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "kind": self.kind, "layers": self.layers, "alphas": self.alphas,
                "search_seconds": self.search_seconds, "calib_ppl": self.calib_ppl, "info": self.info}

    def describe(self) -> str:
        if self.kind == "none":
            return "-"
        pairs = sorted(zip(self.layers, self.alphas or [None] * self.k, strict=True), reverse=True)
        if self.kind == "blocks":
            return "layers " + ",".join(str(i) for i, _ in pairs) + " removed"
        return ", ".join(f"{i}:{a:g}" for i, a in pairs)


ORIGINAL = Plan("original", "none", [])


@contextmanager
def applied(model: nn.Module, plan: Plan) -> Iterator[nn.Module]:
    """The model with `plan` applied, restored exactly on exit."""
    if plan.kind == "none":
        yield model
    elif plan.kind == "attention":
        with temporarily_pruned(model, plan.layers, list(plan.alphas or []), plan.maps):
            yield model
    elif plan.kind == "blocks":
        with layers_removed(model, plan.layers):
            yield model
    else:
        raise ValueError(f"Unknown plan kind {plan.kind!r}.")


class Selector:
    """Runs the methods' selection rules on one model and one calibration set, sharing work:

    - the greedy top-down search, the SLEB order and the one-shot scores are prefix-consistent, so
      the result for the largest k also answers every smaller k (ask for the largest k first);
    - harp-refine starts from the harp search.

    Search time reported for a prefix is the time the search had taken when that prefix was fixed.
    """

    def __init__(
        self,
        model: nn.Module,
        windows: torch.Tensor,
        *,
        grid: str | Sequence[float] | None = None,
        batch_size: int = 4,
        refine_passes: int = 6,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if getattr(model.config, "harp", None):
            raise ValueError("Compare methods on the original model, not on a HARP-pruned checkpoint.")
        self.model = model
        self.windows = windows
        self.grid = parse_grid(grid) if grid is not None else list(DEFAULT_GRID)
        self.batch_size = batch_size
        self.refine_passes = refine_passes
        self.progress = progress
        self.log = log or (lambda m: None)
        self.num_layers = len(decoder_layers(model))
        self._greedy: dict[tuple[int, ...], dict[str, Any]] = {}
        self._sleb: SlebResult | None = None
        self._scores: dict[str, tuple[list[float], float]] = {}
        self._fits: dict[int, tuple[LayerFit, float]] = {}  # per layer: its refit and the seconds it took

    # -- shared pieces ------------------------------------------------------------------------
    def greedy(self, layers: list[int]) -> dict[str, Any]:
        """Greedy search over `layers` (searched top first); reuses a longer search with this prefix."""
        order = sorted(layers, reverse=True)
        for key, res in self._greedy.items():
            if list(key[: len(order)]) == order:
                return _prefix(res, len(order))
        t0 = time.perf_counter()
        times: list[float] = []
        ppls: list[float] = []

        def on_layer(layer: int, alpha: float, log: list[dict[str, float]]) -> None:
            times.append(time.perf_counter() - t0)
            ppls.append(min(e["ppl"] for e in log if e["layer"] == layer))
            self.log(f"  layer {layer}: alpha {alpha:g}, calibration ppl {ppls[-1]:.3f}")

        res = search_alphas(self.model, self.windows, order, grid=self.grid, batch_size=self.batch_size,
                            progress=self.progress, callback=on_layer)
        entry = {"layers": res.layers, "alphas": res.alphas, "times": times, "ppls": ppls,
                 "layer_forwards": res.layer_forwards, "log": res.log}
        self._greedy[tuple(order)] = entry
        return _prefix(entry, len(order))

    def sleb_order(self, k: int) -> dict[str, Any]:
        if self._sleb is None or len(self._sleb.removed) < k:
            self._sleb = sleb(self.model, self.windows, k, batch_size=self.batch_size, progress=self.progress,
                              callback=lambda s, layer, p: self.log(f"  step {s + 1}: remove layer {layer}, "
                                                                    f"calibration ppl {p:.3f}"))
        r = self._sleb
        return {"layers": r.removed[:k], "ppls": r.ppl[:k], "seconds": r.seconds[k - 1], "base_ppl": r.base_ppl}

    def fit(self, layers: list[int]) -> Plan:
        """Refit plan for `layers`. Each layer is fitted on the original model's inputs, independently of
        the others, so fits are cached per layer and shared by every k and every layer set."""
        todo = [i for i in layers if i not in self._fits]
        if todo:
            t0 = time.perf_counter()
            res = fit_layers(self.model, self.windows, todo, batch_size=self.batch_size, progress=self.progress)
            each = (time.perf_counter() - t0) / len(todo)
            for i in todo:
                self._fits[i] = (res.fits[i], each)
        order = sorted(layers, reverse=True)
        maps = {i: self._fits[i][0].map for i in order}
        t0 = time.perf_counter()
        with temporarily_pruned(self.model, order, [1.0] * len(order), maps):
            cal = perplexity(self.model, self.windows, batch_size=self.batch_size).ppl
        seconds = sum(self._fits[i][1] for i in order) + time.perf_counter() - t0
        per_layer = [self._fits[i][0].to_dict() for i in order]
        self.log(f"  refit layers {order}: calibration ppl {cal:.3f}")
        return Plan("harp-ls", "attention", order, [1.0] * len(order), seconds, cal, {"fit": per_layer}, maps)

    def scores(self, which: str) -> tuple[list[float], float]:
        if which not in self._scores:
            t0 = time.perf_counter()
            fn = attention_drop_scores if which == "attention-drop" else block_influence
            s = fn(self.model, self.windows, self.batch_size)
            self._scores[which] = (s, time.perf_counter() - t0)
        return self._scores[which]

    # -- the methods -----------------------------------------------------------------------------
    def select(self, method: str, k: int) -> Plan:
        (method,) = parse_methods([method])
        n = self.num_layers
        check_k(k, n, keep_one=True)  # whole-layer methods are among those compared at this k
        top = top_layers(n, k)
        if method == "no-rescale":
            return Plan(method, "attention", top, [1.0] * k)
        if method == "attn-drop-top":
            return Plan(method, "attention", top, [0.0] * k)
        if method in ("harp", "harp-low"):
            layers = top if method == "harp" else list(range(k - 1, -1, -1))
            g = self.greedy(layers)
            return Plan(method, "attention", g["layers"], g["alphas"], g["seconds"], g["ppl"],
                        {"grid": self.grid, "calib_ppl_per_layer": g["ppls"]})
        if method == "harp-any":
            s, sec = self.scores("attention-drop")
            g = self.greedy(pick(s, k, highest=True))
            return Plan(method, "attention", g["layers"], g["alphas"], sec + g["seconds"], g["ppl"],
                        {"grid": self.grid, "calib_ppl_per_layer": g["ppls"], "scores": s,
                         "score": "mean cos(X, X + Attn(LN(X)))", "score_seconds": sec})
        if method in ("harp-ls", "harp-any-ls"):
            if method == "harp-ls":
                plan = self.fit(top)
            else:
                s, sec = self.scores("attention-drop")
                plan = self.fit(pick(s, k, highest=True))
                plan.search_seconds += sec
                plan.info.update(scores=s, score="mean cos(X, X + Attn(LN(X)))", score_seconds=sec)
            plan.method = method
            return plan
        if method == "harp-refine":
            g = self.greedy(top)
            r: RefineResult = refine_alphas(self.model, self.windows, g["layers"], g["alphas"], grid=self.grid,
                                            max_passes=self.refine_passes, batch_size=self.batch_size,
                                            progress=self.progress)
            self.log(f"  refine: calibration ppl {r.start_ppl:.3f} -> {r.final_ppl:.3f} "
                     f"({100 * r.gain:.2f} % lower) in {len(r.passes)} passes")
            info = {"greedy_alphas": g["alphas"], "greedy_calib_ppl": r.start_ppl, "refined_calib_ppl": r.final_ppl,
                    "gain": r.gain, "passes": r.passes, "greedy_seconds": g["seconds"],
                    "refine_seconds": r.seconds, "evaluations": r.evaluations}
            return Plan(method, "attention", r.layers, r.alphas, g["seconds"] + r.seconds, r.final_ppl, info)
        if method == "attention-drop":
            s, sec = self.scores(method)
            layers = pick(s, k, highest=True)
            return Plan(method, "attention", layers, [0.0] * k, sec, None,
                        {"scores": s, "score": "mean cos(X, X + Attn(LN(X)))"})
        if method == "shortgpt":
            s, sec = self.scores(method)
            layers = pick(s, k, highest=False)
            return Plan(method, "blocks", layers, None, sec, None, {"block_influence": s})
        if method == "sleb":
            r2 = self.sleb_order(k)
            return Plan(method, "blocks", r2["layers"], None, r2["seconds"], r2["ppls"][-1],
                        {"calib_ppl_per_step": r2["ppls"], "base_calib_ppl": r2["base_ppl"]})
        raise AssertionError(method)  # parse_methods guards this


def _prefix(entry: dict[str, Any], j: int) -> dict[str, Any]:
    return {"layers": entry["layers"][:j], "alphas": entry["alphas"][:j], "seconds": entry["times"][j - 1],
            "ppl": entry["ppls"][j - 1], "ppls": entry["ppls"][:j]}


def select(method: str, model: nn.Module, windows: torch.Tensor, k: int, **kwargs: Any) -> Plan:
    """Run one method's selection rule: see `Selector` for the options."""
    return Selector(model, windows, **kwargs).select(method, k)

