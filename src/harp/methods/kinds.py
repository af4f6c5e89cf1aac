"""Choosing, per layer, what a pruned layer becomes (`harp prune --kind auto`).

Three kinds of pruned layer save a layer's KV cache: a **window** layer (attention over its last w tokens
and the first `sinks`; it keeps min(n, w - 1 + sinks) tokens), a **refit** bypass (the closed-form map in
place of attention; no cache) and a **drop** (the attention sub-layer removed: alpha 0; no cache). A window
layer costs least quality and saves least; the two bypasses save the whole layer. Under a KV budget stated
at a context (the saving of k bypassed layers, or a fraction), `choose_kinds` picks the layers and their
kinds greedily on held-out loss:

1. every (layer, kind) alone is scored: the rise of the objective over the original model;
2. from the empty plan, each step measures the few moves (a full layer to any kind, a window layer to a
   bypass) with the best estimated loss per KV saved on top of the plan so far, and takes the best
   measured one; until the plan saves at least the budget.

The objective is the mean next-token loss on the second half of long held-out windows (by default
2 x 2048 tokens): where a window layer has dropped the most context, so a window of w is judged at
positions up to 2w and more past its edge, not where it is exact. Everything is replayed on cached layer
inputs (`engine/replay.py`): a plan is scored from its lowest changed layer up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from harp.engine.longctx import token_nll
from harp.engine.replay import Batch, capture_inputs, run_layers
from harp.methods.fit import fit_layers
from harp.model.accounting import kv_cache_bytes_expected
from harp.model.prune import check_window_plan, refuse_pruned, temporarily_pruned
from harp.modeling import LinearMap, arch_for, get_module, layer_indices
from harp.util.progress import Progress

KINDS = ("window", "refit", "drop")
_RANK = {"full": 0, "window": 1, "refit": 2, "drop": 2}  # a move goes to a kind of higher rank


@dataclass
class KindPlan:
    """The chosen layers and what each became, with the evidence."""

    kinds: dict[int, str]  # layer -> "window" | "refit" | "drop"
    window: int
    sinks: int
    context: int  # the KV saving is stated at this many tokens
    target_saving: float  # fraction of the original KV cache at `context` the plan had to save
    saving: float  # what it saves
    base_loss: float  # objective of the original model (mean NLL, nats)
    loss: float  # objective of the plan
    maps: dict[int, LinearMap] = field(default_factory=dict, repr=False)  # refit layers' maps
    singles: list[dict[str, Any]] = field(default_factory=list)  # {"layer", "kind", "loss", "saving"}
    steps: list[dict[str, Any]] = field(default_factory=list)  # {"layer", "kind", "loss", "saving", "tried"}
    objective: dict[str, Any] = field(default_factory=dict)
    evaluations: int = 0
    seconds: float = 0.0

    @property
    def window_layers(self) -> dict[int, int]:
        return {i: self.window for i, k in sorted(self.kinds.items(), reverse=True) if k == "window"}

    @property
    def bypassed(self) -> tuple[list[int], list[float], dict[int, LinearMap]]:
        """(layers top first, alphas: 1 refit / 0 drop, maps of the refit ones) for `harp.prune`."""
        layers = [i for i, k in sorted(self.kinds.items(), reverse=True) if k != "window"]
        return (layers, [0.0 if self.kinds[i] == "drop" else 1.0 for i in layers],
                {i: self.maps[i] for i in layers if self.kinds[i] == "refit"})

    def describe(self) -> str:
        """'29 refit, 28 window 1024, ...' top layer first."""
        return ", ".join(f"{i} {k}" + (f" {self.window}" if k == "window" else "")
                         for i, k in sorted(self.kinds.items(), reverse=True))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("maps")
        d["kinds"] = {str(i): k for i, k in sorted(self.kinds.items(), reverse=True)}
        return d


def plan_block(kinds: dict[int, str], window: int, sinks: int) -> dict[str, Any]:
    """The `harp` block of a kinds plan ({'layers', 'alphas', 'window_layers', 'windows', 'sinks'}), for the
    accounting."""
    wins = sorted((i for i, k in kinds.items() if k == "window"), reverse=True)
    byp = sorted((i for i, k in kinds.items() if k != "window"), reverse=True)
    return {"layers": byp, "alphas": [0.0 if kinds[i] == "drop" else 1.0 for i in byp], "window_layers": wins,
            "windows": [window] * len(wins), **({"sinks": [sinks] * len(wins)} if sinks and wins else {})}


def kv_saving(config: Any, kinds: dict[int, str], window: int, sinks: int, context: int) -> float:
    """Fraction of the original model's KV cache the plan saves after `context` tokens (exact, from the config:
    the family's own local layers included)."""
    before = kv_cache_bytes_expected(config, context, {"layers": [], "alphas": []})
    return 1.0 - kv_cache_bytes_expected(config, context, plan_block(kinds, window, sinks)) / before


def saving_of_bypass(config: Any, k: int, context: int) -> float:
    """The KV saving of bypassing the top k layers at `context`: the budget `--layers k` states."""
    num = config.num_hidden_layers
    return kv_saving(config, {i: "refit" for i in range(num - k, num)}, 1, 0, context)


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"Unknown layer kind(s) {bad or list(kinds)}: use some of {', '.join(KINDS)}.")
    return tuple(dict.fromkeys(kinds))


def _windowable(config: Any, layer: int, window: int, sinks: int) -> bool:
    """Whether `layer` can become a window layer of `window` (not already local with a window no larger)."""
    try:
        check_window_plan(config, {layer: window}, (), sinks)
    except ValueError:
        return False
    return True


class _Scorer:
    """The objective of any plan, replayed from its lowest changed layer on cached original inputs: the mean
    next-token loss at the positions `mask` (B, T) marks in `windows` (B, T)."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, mask: torch.Tensor, lo: int, batch_size: int,
                 window: int, sinks: int, maps: dict[int, LinearMap]) -> None:
        if mask.shape != windows.shape or bool(mask[:, -1].any()) or not bool(mask.any()):
            raise ValueError("The objective's mask must mark some positions of its windows, not the last one "
                             "(it has no next token).")
        self.model, self.lo = model, lo
        self.window, self.sinks, self.maps = window, sinks, maps
        arch = arch_for(model.config)
        self.num = len(get_module(model, arch.layers))
        self.norm = get_module(model, arch.final_norm)
        self.first = int(mask.any(0).nonzero()[0])  # the head runs from the first marked position on
        self.batches: list[Batch] = capture_inputs(model, windows, lo, batch_size)
        step = max(1, batch_size)
        self.masks = [mask[i:i + step, self.first:-1] for i in range(0, len(windows), step)]
        self.tokens = int(mask.sum())
        # the original residual stream entering every layer >= lo, per batch: a plan replays from its lowest layer
        self.entering: list[dict[int, torch.Tensor]] = []
        with torch.no_grad():
            for b in self.batches:
                h, seen = b.hidden, {}
                for j in range(lo, self.num):
                    seen[j] = h
                    h = run_layers(model, b, h, j, j + 1)
                self.entering.append(seen)
        self.evaluations = 0

    @torch.no_grad()
    def loss(self, kinds: dict[int, str]) -> float:
        """Mean NLL (nats) over the marked positions, with `kinds` applied."""
        self.evaluations += 1
        start = min(kinds, default=self.num - 1)  # the original: only the top layer to replay
        block = plan_block(kinds, self.window, self.sinks)
        wins = dict(zip(block["window_layers"], block["windows"], strict=True))
        total = 0.0
        with temporarily_pruned(self.model, block["layers"], block["alphas"],
                                {i: self.maps[i] for i in block["layers"] if i in self.maps}, windows=wins,
                                sinks=self.sinks):
            for b, seen, m in zip(self.batches, self.entering, self.masks, strict=True):
                h = run_layers(self.model, b, seen[start], start, self.num)
                nll = token_nll(self.model, self.norm(h)[:, self.first:], b.windows[:, self.first:])
                total += float(nll[m].double().sum())
        return total / self.tokens


def tail_mask(windows: torch.Tensor, tail_from: int) -> torch.Tensor:
    """(B, T) mask of the positions >= `tail_from` that predict a next token."""
    mask = torch.zeros(windows.shape, dtype=torch.bool)
    mask[:, tail_from:-1] = True
    return mask


@torch.no_grad()
def choose_kinds(
    model: nn.Module,
    calib: torch.Tensor,
    objective: torch.Tensor,
    target_saving: float,
    *,
    context: int,
    window: int,
    sinks: int = 0,
    kinds: Sequence[str] = KINDS,
    layers: Sequence[int] | None = None,
    tail_from: int | None = None,
    tries: int = 3,
    recall: tuple[torch.Tensor, torch.Tensor] | None = None,
    ridge: float | str = "auto",
    prior: str = "auto",
    batch_size: int = 1,
    progress: bool = False,
) -> KindPlan:
    """Pick layers and their kinds (window / refit / drop) saving at least `target_saving` of the KV cache at
    `context` tokens, greedily on the held-out objective (see the module docstring).

    Args:
        model: the original model (restored on return).
        calib: calibration windows the refit maps are fitted on.
        objective: held-out windows (B, T) the plan is judged on, T long enough for `window` to matter
            (2 x window at least is best), text the fit never saw.
        target_saving: fraction of the original KV cache at `context` to save (`saving_of_bypass` gives the
            one of k bypassed layers).
        context: tokens at which the KV saving is stated (the model's maximum is typical).
        window, sinks: the window layers' window and sinks.
        kinds: the kinds allowed.
        layers: the candidate layers (default all).
        tail_from: the objective counts positions >= this (default T // 2).
        tries: moves measured per step (the best by estimated loss per KV saved).
        recall: (windows, mask) of teacher-forced recall windows (`harp.engine.longctx.recall_probe`): the
            mean NLL of the answers they mark is added to the objective, so a plan is also judged on
            recalling what lies past a window layer's window.
    """
    t0 = time.perf_counter()
    refuse_pruned(model, "This model is already HARP-pruned; choose kinds on the original model.")
    cfg = model.config
    allowed = _candidates(cfg, layers, check_kinds(kinds), window, sinks, context, target_saving)
    pool = list(allowed)  # top layer first
    T = objective.shape[1]
    tail = T // 2 if tail_from is None else int(tail_from)
    if not 0 <= tail < T - 1:
        raise ValueError(f"`tail_from={tail}` must leave positions to score in windows of {T} tokens.")
    maps: dict[int, LinearMap] = {}
    if "refit" in kinds:
        maps = fit_layers(model, calib, pool, ridge=ridge, prior=prior, batch_size=max(1, batch_size),
                          progress=progress).maps
    parts = {"text": _Scorer(model, objective, tail_mask(objective, tail), pool[-1], batch_size, window, sinks, maps)}
    if recall is not None:
        parts["recall"] = _Scorer(model, recall[0], recall[1], pool[-1], batch_size, window, sinks, maps)

    def objective_of(plan: dict[int, str]) -> float:
        return sum(part.loss(plan) for part in parts.values())

    def saving_of(plan: dict[int, str]) -> float:
        return kv_saving(cfg, plan, window, sinks, context)

    base = objective_of({})
    singles: dict[tuple[int, str], float] = {}
    with Progress(sum(len(ks) for ks in allowed.values()), "kinds: scoring each layer alone",
                  enabled=progress) as bar:
        for i, ks in allowed.items():
            for k in ks:
                singles[(i, k)] = objective_of({i: k}) - base
                bar.advance()
    plan, loss, saving, steps = _greedy(allowed, singles, objective_of, saving_of, base, target_saving, tries,
                                        progress)
    objective_info: dict[str, Any] = {
        "windows": int(objective.shape[0]), "seq_len": int(T), "tail_from": tail, "tokens": parts["text"].tokens,
        "ppl": math.exp(loss), "base_ppl": math.exp(base)}
    if recall is not None:  # the two terms apart: the text's perplexity and the answers' NLL, before and after
        text_base, text_now = parts["text"].loss({}), parts["text"].loss(plan)
        objective_info.update(ppl=math.exp(text_now), base_ppl=math.exp(text_base),
                              recall_windows=int(recall[0].shape[0]), recall_seq_len=int(recall[0].shape[1]),
                              recall_tokens=parts["recall"].tokens, recall_base_nll=base - text_base,
                              recall_nll=loss - text_now)
    return KindPlan(
        kinds=plan, window=window, sinks=sinks, context=context, target_saving=target_saving, saving=saving,
        base_loss=base, loss=loss, maps={i: m for i, m in maps.items() if plan.get(i) == "refit"},
        singles=[{"layer": i, "kind": k, "loss": base + d, "saving": saving_of({i: k})}
                 for (i, k), d in singles.items()],
        steps=steps, objective=objective_info,
        evaluations=parts["text"].evaluations,  # plans scored (each on every part)
        seconds=time.perf_counter() - t0,
    )


def _candidates(cfg: Any, layers: Sequence[int] | None, kinds: Sequence[str], window: int, sinks: int,
                context: int, target_saving: float) -> dict[int, list[str]]:
    """The candidate layers (top first) and the kinds each may take, refused in one line when the budget is
    out of reach."""
    num = cfg.num_hidden_layers
    pool = sorted(layer_indices(list(layers) if layers is not None else list(range(num)), num), reverse=True)
    if not 0.0 < target_saving <= 1.0:
        raise ValueError(f"`target_saving={target_saving}`: a fraction of the KV cache in (0, 1].")
    allowed = {i: ks for i in pool if (ks := [k for k in kinds if k != "window" or _windowable(cfg, i, window, sinks)])}
    if not allowed:
        raise ValueError(f"No candidate layer can become a window layer of {window} tokens (they are local already "
                         "with a window no larger): allow `refit` or `drop`, or a smaller window.")
    most = {i: ("refit" if "refit" in ks or "drop" in ks else "window") for i, ks in allowed.items()}
    best = kv_saving(cfg, most, window, sinks, context)
    if best < target_saving - 1e-12:
        raise ValueError(f"The candidate layers save at most {100 * best:.1f} % of the KV cache at {context:,} "
                         f"tokens, less than the {100 * target_saving:.1f} % asked: allow more layers or kinds.")
    return allowed


def _greedy(allowed: dict[int, list[str]], singles: dict[tuple[int, str], float],
            objective_of: Callable[[dict[int, str]], float], saving_of: Callable[[dict[int, str]], float],
            base: float, target_saving: float, tries: int, progress: bool,
            ) -> tuple[dict[int, str], float, float, list[dict[str, Any]]]:
    """Step 2 of the module docstring: (plan, its objective, its saving, the steps with the moves tried)."""
    plan: dict[int, str] = {}
    cur_loss, cur_save, steps = base, 0.0, []
    with Progress(len(allowed), "kinds: greedy plan", enabled=progress) as bar:
        while cur_save < target_saving - 1e-12:
            moves = []
            for i, ks in allowed.items():
                have = plan.get(i, "full")
                for k in ks:
                    if _RANK[k] <= _RANK[have]:
                        continue
                    gain = saving_of({**plan, i: k}) - cur_save
                    if gain <= 0:
                        continue
                    est = singles[(i, k)] - (singles[(i, have)] if have != "full" else 0.0)
                    moves.append((max(est, 0.0) / gain, i, k, gain))
            if not moves:  # cannot happen: the budget was checked reachable
                raise RuntimeError("no move left before the KV budget was met")
            moves.sort()
            tried = []
            for _, i, k, gain in moves[:max(1, tries)]:
                new = objective_of({**plan, i: k})
                tried.append({"layer": i, "kind": k, "loss": new, "saving": cur_save + gain})
            pick = min(tried, key=lambda m: (max(m["loss"] - cur_loss, 0.0) / (m["saving"] - cur_save), m["loss"]))
            plan[pick["layer"]] = pick["kind"]
            cur_loss, cur_save = pick["loss"], pick["saving"]
            steps.append({**pick, "tried": tried})
            bar.advance()
    return plan, cur_loss, cur_save, steps
