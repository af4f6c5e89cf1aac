"""Running the pruning methods by name, all at equal KV-cache reduction (k attention sub-layers removed
or bypassed), all on the same calibration windows and replay machinery (docs/method.md, "Baselines").

    selection = select("attention-drop", model, calib_windows, k=8)
    with applied(model, selection):
        ...  # the model is pruned here, restored exactly afterwards

The methods themselves (what each prunes and how it chooses) are declared in `harp.methods.catalog`;
`Selector` holds what they share: the greedy search's prefixes, the refits, the scores, the SLEB order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from harp.engine.perplexity import perplexity
from harp.methods.blocks import layers_removed
from harp.methods.fit import LayerFit, fit_layers
from harp.methods.registry import METHODS, Selection, parse_methods
from harp.methods.registry import Plan as Plan
from harp.methods.scores import attention_drop_scores, block_influence
from harp.methods.search import DEFAULT_GRID, parse_grid, search_alphas
from harp.methods.sleb import SlebResult, sleb
from harp.model.prune import check_k, refuse_pruned, temporarily_pruned
from harp.modeling import decoder_layers

ORIGINAL = Selection("original", "none", [])


@contextmanager
def applied(model: nn.Module, plan: Selection) -> Iterator[nn.Module]:
    """The model with `plan` applied, restored exactly on exit."""
    if plan.kind == "none":
        yield model
    elif plan.kind == "attention":
        with temporarily_pruned(model, plan.layers, list(plan.alphas or []), plan.maps):
            yield model
    elif plan.kind == "window":
        with temporarily_pruned(model, [], [], windows=plan.windows, sinks=plan.sinks,
                                fitted_sinks=plan.fitted_sinks):
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
        calib_ids: torch.Tensor | None = None,
        seed: int = 0,
        bos: int | None = None,
    ) -> None:
        """`windows`: the calibration windows every method is chosen on. `calib_ids` (the calibration text's
        whole token stream), `seed` and `bos` are what the fitted-sink methods cut their own, longer
        windows from (`harp.methods.sinks.sink_fit_windows`); without them those methods are refused."""
        refuse_pruned(model, "Compare methods on the original model, not on a HARP-pruned checkpoint.")
        self.model = model
        self.windows = windows
        self.calib_ids, self.seed, self.bos = calib_ids, seed, bos
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

    def fit(self, layers: list[int]) -> Selection:
        """Refit selection for `layers`. Each layer is fitted on the original model's inputs, independently of
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
        return Selection("harp-ls", "attention", order, [1.0] * len(order), seconds, cal, {"fit": per_layer}, maps)

    def scores(self, which: str) -> tuple[list[float], float]:
        if which not in self._scores:
            t0 = time.perf_counter()
            fn = attention_drop_scores if which == "attention-drop" else block_influence
            s = fn(self.model, self.windows, self.batch_size)
            self._scores[which] = (s, time.perf_counter() - t0)
        return self._scores[which]

    # -- the methods -----------------------------------------------------------------------------
    def select(self, method: str, k: int) -> Selection:
        """`method`'s selection rule at this k (the rules are registered in `harp.methods.catalog`)."""
        (method,) = parse_methods([method])
        check_k(k, self.num_layers, keep_one=True)  # whole-layer methods are among those compared at this k
        rule = METHODS[method].select
        assert rule is not None, method  # `register` sets it
        return rule(self, k)


def _prefix(entry: dict[str, Any], j: int) -> dict[str, Any]:
    return {"layers": entry["layers"][:j], "alphas": entry["alphas"][:j], "seconds": entry["times"][j - 1],
            "ppl": entry["ppls"][j - 1], "ppls": entry["ppls"][:j]}


def select(method: str, model: nn.Module, windows: torch.Tensor, k: int, **kwargs: Any) -> Selection:
    """Run one method's selection rule: see `Selector` for the options."""
    return Selector(model, windows, **kwargs).select(method, k)

