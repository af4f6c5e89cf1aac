"""The end-to-end job behind `harp prune`: load, calibrate, search, prune, measure, save."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harp.engine.longctx import recall_probe
from harp.engine.perplexity import perplexity
from harp.engine.streamed import ACTIVATIONS, StreamedModel, activation_store
from harp.engine.text import (
    DEFAULT_CALIB,
    DEFAULT_EVAL,
    calibration_spans,
    calibration_windows,
    check_disjoint_sources,
    check_text,
    tokenize,
    windows_outside,
)
from harp.jobs.preamble import Windows, claimed, host_info, load_windows, output_dir, set_threads, state_path
from harp.methods.fit import FitResult, check_fit_settings, fit_layers
from harp.methods.kinds import KindPlan, choose_kinds, saving_of_bypass
from harp.methods.scores import ATTENTION_DROP_SCORE, attention_drop_scores, pick
from harp.methods.search import (
    SearchResult,
    check_grid,
    check_search_state,
    parse_grid,
    search_alphas,
    streamed_search,
    top_layers,
)
from harp.methods.sinks import SINK_TOKENS, SinkFit, check_sink_fit, fit_sinks, sink_fit_windows
from harp.model.accounting import (
    count_parameters,
    kv_bytes_after_prefill,
    kv_savings,
    parameter_count,
    removed_parameters,
)
from harp.model.checkpoint import save
from harp.model.configs import config_from_dict
from harp.model.load import check_resident, load_on_device, resolve_device
from harp.model.prune import check_window_plan, prune, refuse_pruned, temporarily_pruned
from harp.model.source import DEFAULT_MODEL, ModelInfo, check_layer_choice, model_or_problem
from harp.modeling import LinearMap, decoder_layers, layer_indices
from harp.util.dtypes import torch_dtype
from harp.util.fsio import check_output, write_json_atomic
from harp.util.problems import Collector, check_positive, check_windows

SELECTIONS = ("top", "attention-drop", "auto")
LAYER_KINDS = ("bypass", "window", "auto")
SINKS_FIT = "fit"  # sinks="fit": fitted sinks instead of sink tokens (harp.fit_sinks)
DEFAULT_AUTO_WINDOW = 1024  # kind="auto" without `window`: capped at a quarter of the budget's context


@dataclass
class PruneSettings:
    model: str | None = None
    k: int | None = 8
    layers: Sequence[int] | None = None  # explicit layer indices (instead of the top k)
    # how k layers are chosen: "top" (HARP) | "attention-drop" (He et al.'s score, any depth) | "auto" (the
    # one of the two with the lower calibration perplexity once pruned)
    select: str = "top"
    # what a pruned layer gets: "lstsq" (the closed-form refit of its map) | "none" (HARP's searched alpha)
    fit: str = "lstsq"
    ridge: float | str = "auto"  # refit: relative ridge, or "auto" (cross-validated per layer)
    fit_prior: str = "auto"  # refit: shrink toward "zero" | "alpha" (the scaled W_O R) | "auto"
    alphas: Sequence[float] | None = None  # skip the search and use these (with a refit: scales of the maps)
    # the chosen layers keep their attention over their last `window` tokens (window layers) instead of being
    # bypassed: no search, no refit; their KV cache is capped at window - 1 tokens
    window: int | None = None
    # window layers also see (and cache) the first `sinks` tokens (attention sinks), or "fit": a fitted sink
    # stands in for SINK_TOKENS of them (a per-head logit and an output bias: nothing cached, vLLM serves it)
    sinks: int | str = 4
    # "auto": choose the layers and, per layer, window / refit / drop greedily on a held-out long-context loss,
    # under a KV budget: the saving of the top `k` bypassed layers, or `kv_saving`, at `context` tokens
    kind: str | None = None
    kv_saving: float | str | None = None  # with kind="auto": fraction (0.25) or percentage ("25%") to save
    context: int | None = None  # with kind="auto": the KV budget's context (default: the model's maximum)
    objective_windows: int = 2  # with kind="auto": held-out windows the kinds are judged on
    objective_seq_len: int | None = None  # their length (default: 2 x window, at least 1,024, at most `context`)
    # with kind="auto": windows of that length in the calibration text with numbered facts planted more than
    # `window` tokens before their questions; the answers' mean NLL joins the objective (0: text loss only)
    recall_windows: int = 0
    calib: str | None = None
    eval: str | None = None
    calib_windows: int = 8
    seq_len: int = 256
    eval_tokens: int = 8192
    eval_seq_len: int = 1024
    grid: str | Sequence[float] | None = None
    seed: int = 0
    batch_size: int = 4
    method: str = "cached"
    references: bool = True
    dtype: str = "float32"
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (accelerate device_map="auto" for the full model)
    streamed: bool = False  # search without the whole model resident (harp.streaming)
    activations: str = "device"  # streamed search: keep calibration activations on device | cpu | disk
    threads: int | None = None
    out: str | None = None
    overwrite: bool = False
    progress: bool = True


@dataclass
class PruneReport:
    settings: dict[str, Any]
    layers: list[int]
    alphas: list[float]
    ppl: dict[str, float]
    eval_tokens: int
    calib_tokens: int
    params_before: int
    params_after: int
    params_removed_predicted: int
    kv_bytes_before: int
    kv_bytes_after: int
    seconds: dict[str, float]
    out: str | None = None
    search: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    method: str = "harp"  # what the saved model is: "harp" (searched alphas), "harp-ls" (refit) or "window"
    window: int | None = None  # window layers: `layers` keep attention over their last `window` tokens
    sinks: int = 0  # ... and over the first `sinks`
    sink_fit: dict[str, Any] = field(default_factory=dict)  # sinks="fit": what the fitted sinks were fitted on
    kinds: dict[str, str] = field(default_factory=dict)  # kind="auto": layer -> "window" | "refit" | "drop"
    # KV bytes before/after at the contexts every command states (2,048 tokens and the model's maximum),
    # from the config: a sliding-window model's saving depends on the context
    kv_at_contexts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["params_removed"] = self.params_removed
        d["params_removed_pct"] = 100.0 * self.params_removed / self.params_before
        d["kv_reduction"] = 1.0 - self.kv_bytes_after / self.kv_bytes_before if self.kv_bytes_before else 0.0
        return d


def state_file_for(out: Path) -> Path:
    """The search's resume state next to the output folder."""
    return state_path(out, "harp-search.json")


Loader = Callable[..., tuple[nn.Module, Any]]  # `load_on_device`'s signature: the seam tests replace


def run_prune(settings: PruneSettings, log: Any = print, *, loader: Loader = load_on_device) -> PruneReport:
    """Search the alphas (unless given), prune, measure perplexity before/after, save if `out`.

    `loader` loads the whole model (`harp.model.load.load_on_device` unless a test replaces it)."""
    run = _prepare(settings, log)
    with claimed(run.out, "harp prune"):  # a second run on this `out` refuses while this one runs
        return _prune(run, loader)


def _prune(run: _Run, loader: Loader) -> PruneReport:
    """The stages, in order, once the settings are checked and the output is held."""
    backend = _open_model(run, loader)
    layers = _requested_layers(run, backend)
    win = _load_data(run, backend)
    choice = _choose_layers(run, backend, win, layers)
    # the streamed search runs before the whole model is resident; in memory, the original is measured first
    made = _produce(run, backend, win, choice) if backend.searches_first else None
    model = backend.full_model()
    before = _measure_original(run, model, choice.layers, win)
    made = made or _produce(run, backend, win, choice)
    measured = _prune_and_measure(run, model, choice.layers, made, win, before)
    report = _report(run, model, win, choice, made, measured)
    if run.out is not None:
        _save(run, run.out, model, backend.tokenizer, win, report)
    report.seconds["total"] = time.perf_counter() - run.t_start
    return report


# ------------------------------------------------------------------------------------------------
# The stages of run_prune, in order
# ------------------------------------------------------------------------------------------------


@contextmanager
def _timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    """Add the block's wall time to `seconds[key]`."""
    t = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t


@dataclass
class _Run:
    """The checked settings of one run and what every stage shares."""

    s: PruneSettings
    log: Callable[[str], None]
    out: Path | None
    grid: list[float]
    fit: str  # "lstsq" | "none"
    method: str  # what the saved model is: "harp-ls" | "harp"
    state: Path | None  # the search's resume state next to `out`
    t_start: float
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def sinks(self) -> int:
        """The sink tokens window layers keep (none with fitted sinks)."""
        return 0 if self.s.sinks == SINKS_FIT else int(self.s.sinks)


def _prepare(s: PruneSettings, log: Callable[[str], None]) -> _Run:
    t_start = time.perf_counter()
    check_prune(s)  # every argument against the config / GGUF header / files, all problems at once: nothing loaded
    set_threads(s.threads)
    out = output_dir(s.out, s.overwrite)
    fit = check_fit_settings(s.fit, s.ridge, s.fit_prior)
    method = "mixed" if s.kind == "auto" else "window" if s.window is not None else \
        "harp-ls" if fit == "lstsq" else "harp"
    return _Run(s, log, out, parse_grid(s.grid), fit, method, state_file_for(out) if out else None, t_start)


class _Backend:
    """The model the layers are searched and fitted on. Stages call `search`, `fit`, `resident` and
    `full_model` and never ask which backend they have; only the order differs (`searches_first`)."""

    searches_first = False  # the search / fit must run before `full_model` (the streamed one)
    config: Any
    tokenizer: Any
    description: str

    def __init__(self, run: _Run, loader: Loader) -> None:
        self.run, self.loader = run, loader

    def search(self, calib: torch.Tensor, layers: list[int], state_path: Path | None) -> SearchResult:
        with _timed(self.run.seconds, "search"):
            res = self._search(calib, layers, state_path)
            if res.resumed_layers:
                self.run.log(f"resumed a search: {res.resumed_layers} of {len(layers)} layers were already done")
        return res

    def fit(self, calib: torch.Tensor, layers: list[int]) -> FitResult:
        s = self.run.s
        with _timed(self.run.seconds, "fit"):
            return self._fit(calib, layers, {"ridge": s.ridge, "prior": s.fit_prior, "batch_size": s.batch_size,
                                             "progress": s.progress})

    def _search(self, calib: torch.Tensor, layers: list[int], state_path: Path | None) -> SearchResult:
        raise NotImplementedError

    def _fit(self, calib: torch.Tensor, layers: list[int], kw: dict[str, Any]) -> FitResult:
        raise NotImplementedError

    def resident(self) -> nn.Module:
        """The whole model, resident now (check_prune allows only this backend where it is needed)."""
        raise NotImplementedError

    def full_model(self) -> nn.Module:
        """The whole model for evaluation, pruning and saving."""
        raise NotImplementedError


class _InMemory(_Backend):
    def __init__(self, run: _Run, loader: Loader) -> None:
        super().__init__(run, loader)
        s = run.s
        self.model, self.tokenizer = loader(s.model, dtype=s.dtype, device=s.device)
        self.config = self.model.config
        self.description = f"{type(self.model).__name__}, {len(decoder_layers(self.model))} layers, " \
            f"{count_parameters(self.model) / 1e6:.1f} M parameters"

    def _search(self, calib: torch.Tensor, layers: list[int], state_path: Path | None) -> SearchResult:
        s = self.run.s
        return search_alphas(self.model, calib, layers, grid=self.run.grid, method=s.method,
                             batch_size=s.batch_size, state_path=state_path, progress=s.progress)

    def _fit(self, calib: torch.Tensor, layers: list[int], kw: dict[str, Any]) -> FitResult:
        return fit_layers(self.model, calib, layers, **kw)

    def resident(self) -> nn.Module:
        return self.model

    def full_model(self) -> nn.Module:
        return self.model


class _Streamed(_Backend):
    """The search and the fit stream the layers (StreamedModel); the whole model is loaded afterwards."""

    searches_first = True

    def __init__(self, run: _Run, loader: Loader) -> None:
        from transformers import AutoTokenizer

        super().__init__(run, loader)
        s = run.s
        self.streamer: StreamedModel | None = StreamedModel(s.model, dtype=s.dtype, device=s.device)
        self.config = self.streamer.model.config
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.streamer.folder))
        self.description = f"{type(self.streamer.model).__name__}, {self.config.num_hidden_layers} layers, " \
            f"{parameter_count(self.config) / 1e6:.1f} M parameters, streamed from {self.streamer.folder}"

    def _search(self, calib: torch.Tensor, layers: list[int], state_path: Path | None) -> SearchResult:
        s = self.run.s
        return streamed_search(None, calib, layers, grid=self.run.grid, batch_size=s.batch_size,
                               state_path=state_path, progress=s.progress, activations=s.activations,
                               model=self.streamer)

    def _fit(self, calib: torch.Tensor, layers: list[int], kw: dict[str, Any]) -> FitResult:
        sm, bs = self.streamer, self.run.s.batch_size
        assert sm is not None, "the streamed model was already dropped for the whole one"
        with activation_store(self.run.s.activations, sm.device) as keep:
            return fit_layers(sm.model, calib, layers,
                              prepare=lambda lo, bar: sm.capture(calib, lo, bs, bar, keep), **kw)

    def resident(self) -> nn.Module:
        raise AssertionError("check_prune refuses `select` with `streamed`")

    def full_model(self) -> nn.Module:
        s = self.run.s
        self.streamer = None  # drop the partially loaded model before loading the whole one
        with _timed(self.run.seconds, "load"):
            model, _ = self.loader(s.model, dtype=s.dtype, device=s.device, with_tokenizer=False)
        return model


def _open_model(run: _Run, loader: Loader) -> _Backend:
    s = run.s
    with _timed(run.seconds, "load"):
        # a given `alphas` has no search to stream: the streamed backend is for searching and fitting
        backend = (_Streamed if s.streamed and s.alphas is None else _InMemory)(run, loader)
    refuse_pruned(backend.config, f"{s.model} is already a HARP-pruned checkpoint; prune the original model.")
    return backend


def _requested_layers(run: _Run, backend: _Backend) -> list[int]:
    """The top k or the given layers, top first (`select` may replace them later)."""
    s, num = run.s, backend.config.num_hidden_layers
    if s.layers:
        layers = sorted(layer_indices(s.layers, num), reverse=True)
    else:
        layers = top_layers(num, s.k if s.k is not None else 8)
    if s.alphas is not None and len(s.alphas) != len(layers):
        raise ValueError(f"`alphas` gives {len(s.alphas)} values for {len(layers)} layers (top layer first).")
    what = f"pruning layers {sorted(layers)}" if s.select == "top" else \
        f"pruning {len(layers)} layers chosen by `select={s.select}`"
    if s.kind == "auto":
        what = "choosing the layers and their kinds (window, refit, drop) under a KV budget"
    elif s.window is not None:
        what = what.replace("pruning", f"window layers ({s.window} tokens):", 1)
        top = getattr(backend.config, "max_position_embeddings", None)
        if isinstance(top, int) and s.window >= top:
            run.log(f"warning: `window={s.window}` is not below the model's maximum context ({top} tokens): the "
                    "window layers save no KV cache or attention at any context it supports.")
    run.log(f"model: {s.model or DEFAULT_MODEL} ({backend.description}), {what}")
    return layers


def _load_data(run: _Run, backend: _Backend) -> Windows:
    s = run.s
    win = load_windows(backend.tokenizer, s.calib, s.eval, calib_windows=s.calib_windows, seq_len=s.seq_len,
                       seed=s.seed, eval_tokens=s.eval_tokens, eval_seq_len=s.eval_seq_len)
    run.seconds["data"] = win.seconds
    run.seconds["search"] = run.seconds["fit"] = 0.0
    run.log(f"calibration: {win.calib_text.description}, {win.calib.shape[0]} x {win.calib.shape[1]} tokens "
            f"(seed {s.seed}); evaluation: {win.eval_text.description}, {win.eval.shape[0]} x {win.eval.shape[1]} "
            "tokens")
    return win


@dataclass
class _Choice:
    """Which layers are pruned (top first), why, and the refit / search the choice already made."""

    layers: list[int]
    selection: dict[str, Any]
    fitted: FitResult | None = None
    searched: SearchResult | None = None
    kinds: KindPlan | None = None  # kind="auto": what each chosen layer became
    budget_layers: list[int] = field(default_factory=list)  # kind="auto" with `k`: the top k its budget is of


_ATTENTION_DROP_SCORE = f"{ATTENTION_DROP_SCORE} per layer (He et al. 2024)"


def _choose_layers(run: _Run, backend: _Backend, win: Windows, layers: list[int]) -> _Choice:
    s = run.s
    if s.kind == "auto":
        return _choose_kinds(run, backend, win, layers)
    if s.select == "top":
        return _Choice(layers, {"rule": s.select})
    with _timed(run.seconds, "select"):
        model = backend.resident()
        scores = attention_drop_scores(model, win.calib, s.batch_size)
        any_depth = sorted(pick(scores, len(layers), highest=True), reverse=True)
        selection = {"rule": s.select, "score": _ATTENTION_DROP_SCORE, "scores": scores}
        if s.select == "attention-drop":
            run.log(f"selected by the Attention Drop score (any depth): layers {sorted(any_depth)}")
            return _Choice(any_depth, selection)
        return _auto_choice(run, backend, win, {"top": layers, "attention-drop": any_depth}, selection)


def _held_out(run: _Run, tok: Any, win: Windows) -> tuple[torch.Tensor, str]:
    """Windows of the calibration text the fit / search never saw: the fitting windows themselves favour
    whichever candidate overfits them most. The fitting windows when the text is too short."""
    s = run.s
    n_held = max(2, s.calib_windows // 2)
    try:
        held = calibration_windows(tokenize(tok, win.calib_text), n_held, s.seq_len, s.seed, bos=win.bos,
                                   skip=s.calib_windows)
        return held, f"{n_held} held-out calibration windows"
    except ValueError:
        return win.calib, "the calibration windows (the text is too short for held-out ones)"


def _auto_choice(run: _Run, backend: _Backend, win: Windows, candidates: dict[str, list[int]],
                 selection: dict[str, Any]) -> _Choice:
    """`select=auto`: prune both ways, keep the lower perplexity on held-out calibration windows."""
    held, held_desc = _held_out(run, backend.tokenizer, win)
    cands: dict[str, dict[str, Any]] = {}
    made: dict[str, Any] = {}
    for rule, lays in candidates.items():
        if rule != "top" and lays == candidates["top"]:
            continue
        made[rule], cal = _candidate(run, backend, win, lays, held)
        cands[rule] = {"layers": sorted(lays), "calib_ppl": cal}
    picked = min(cands, key=lambda r: cands[r]["calib_ppl"])
    selection.update(candidates=cands, picked=picked, judged_on=held_desc)
    run.log(f"`select=auto`, perplexity on {held_desc}: " + ", ".join(
        f"{r} {c['calib_ppl']:.2f} (layers {c['layers']})" for r, c in cands.items()) + f"; picked {picked}")
    layers = sorted(cands[picked]["layers"], reverse=True)
    if run.s.window is not None:
        return _Choice(layers, selection)
    if run.fit == "lstsq":
        return _Choice(layers, selection, fitted=made[picked])
    return _Choice(layers, selection, searched=made[picked])


def _candidate(run: _Run, backend: _Backend, win: Windows, layers: list[int],
               held: torch.Tensor) -> tuple[FitResult | SearchResult | None, float]:
    """One `select=auto` candidate: refit (or search) `layers`, or make them window layers, and its
    perplexity on `held`."""
    res: FitResult | SearchResult
    if run.s.window is not None:
        with temporarily_pruned(backend.resident(), [], [], windows=_windows(run, layers), sinks=run.sinks):
            return None, perplexity(backend.resident(), held, batch_size=run.s.batch_size).ppl
    if run.fit == "lstsq":
        res = backend.fit(win.calib, layers)
        alphas, maps = [1.0] * len(layers), res.maps
    else:
        res = backend.search(win.calib, layers, None)
        alphas, maps = res.alphas, None
    model = backend.resident()
    with temporarily_pruned(model, layers, alphas, maps):
        return res, perplexity(model, held, batch_size=run.s.batch_size).ppl


def _choose_kinds(run: _Run, backend: _Backend, win: Windows, top: list[int]) -> _Choice:
    """`kind=auto`: the layers and their kinds under the KV budget, judged on long held-out windows."""
    s, model = run.s, backend.resident()
    context, window, target, seq = auto_kind_settings(s, model.config)
    budget = f"{100 * target:.1f} % of the KV cache at {context:,} tokens" + \
        ("" if s.kv_saving is not None else f" (what the top {len(top)} bypassed layers save)")
    ids = tokenize(backend.tokenizer, win.calib_text)
    taken = calibration_spans(ids, s.calib_windows, s.seq_len, s.seed, bos=win.bos)
    objective = windows_outside(ids, s.objective_windows, seq, taken, bos=win.bos, what="objective")
    recall = None
    if s.recall_windows:
        try:
            recall = recall_probe(backend.tokenizer, win.calib_text, seq, window, n=s.recall_windows, seed=s.seed)
        except ValueError as e:
            raise ValueError(f"`recall_windows={s.recall_windows}`: {e} Here the windows are {seq} tokens "
                             f"(2 x `window`, at least 1,024, at most the {context:,}-token `context`): give a smaller "
                             "`window`.") from None
    # fitted sinks stand in for SINK_TOKENS real ones (and come within about 1 % of their 8k loss, where no
    # sinks cost some 20 %): the choice judges window layers with those real sinks, then the chosen ones are
    # fitted. Their KV budget is then counted with the real sinks too: the fitted layers hold fewer tokens.
    judged_sinks = SINK_TOKENS if s.sinks == SINKS_FIT else run.sinks
    sinks = f"fitted sinks; judged with {SINK_TOKENS} sink tokens" if s.sinks == SINKS_FIT else f"{s.sinks} sinks"
    run.log(f"`kind=auto`: saving {budget}; window layers of {window} tokens (+{sinks}); judged on "
            f"{objective.shape[0]} x {seq} held-out calibration tokens, positions from {seq // 2}"
            + (f", and on recalling {4 * s.recall_windows} numbered facts more than {window} tokens back "
               f"({s.recall_windows} x {seq} tokens)" if recall is not None else ""))
    with _timed(run.seconds, "select"):
        plan = choose_kinds(model, win.calib, objective, target, context=context, window=window, sinks=judged_sinks,
                            recall=recall, ridge=s.ridge, prior=s.fit_prior, batch_size=1, progress=s.progress)
    run.log(f"`kind=auto` chose {len(plan.kinds)} layers: {plan.describe()}; saves {100 * plan.saving:.1f} % at "
            f"{context:,} tokens; objective perplexity {plan.objective['base_ppl']:.2f} -> {plan.objective['ppl']:.2f} "
            f"({plan.evaluations} evaluations, {plan.seconds:.0f} s)")
    selection = {"rule": "kind=auto", "budget": budget, **plan.to_dict()}
    return _Choice(sorted(plan.kinds, reverse=True), selection, kinds=plan,
                   budget_layers=[] if s.kv_saving is not None else top)


def auto_kind_settings(s: Any, config: Any) -> tuple[int, int, float, int]:
    """(context, window, target saving, objective window length) of `kind=auto` settings on this model."""
    top = getattr(config, "max_position_embeddings", None) or 2048
    context = int(s.context or top)
    window = int(s.window) if s.window is not None else min(DEFAULT_AUTO_WINDOW, max(1, context // 4))
    if s.kv_saving is not None:
        target = parse_fraction(s.kv_saving)
    else:
        target = saving_of_bypass(config, len(s.layers) if s.layers else (s.k or 8), context)
    seq = int(s.objective_seq_len or min(context, top, max(1024, 2 * window)))
    return context, window, target, seq


def parse_fraction(spec: float | str) -> float:
    """0.25, '0.25', '25%' -> 0.25 (a KV saving)."""
    text = str(spec).strip()
    try:
        v = float(text.rstrip("%")) / (100.0 if text.endswith("%") else 1.0)
    except ValueError:
        raise ValueError(f"`kv_saving={spec!r}`: give a fraction (0.25) or a percentage (25%).") from None
    if not 0.0 < v <= 1.0:
        raise ValueError(f"`kv_saving={spec!r}`: the saving must be above 0 and at most 100 %.")
    return v


@dataclass
class _Made:
    """What the pruned layers get (alphas, and the refit maps with `fit=lstsq`), and the references."""

    alphas: list[float]
    maps: dict[int, LinearMap] | None
    search_info: dict[str, Any]
    fitted: FitResult | None
    references: dict[str, tuple[list[int], list[float], dict[int, LinearMap] | None]]  # name -> layers, alphas, maps
    bypassed: list[int]  # the layers `alphas` and `maps` are for (top first)
    windows: dict[int, int] | None = None  # window layers
    sinks: SinkFit | None = None  # their fitted sinks (sinks="fit")


def _windows(run: _Run, layers: list[int]) -> dict[int, int]:
    assert run.s.window is not None
    return {i: run.s.window for i in layers}


def _produce(run: _Run, backend: _Backend, win: Windows, choice: _Choice) -> _Made:
    """Fitted maps or searched alphas for the chosen layers; and the other as a reference row. Window layers
    need neither: the refit of the same layers is their reference row."""
    s, k, layers = run.s, len(choice.layers), choice.layers
    if choice.kinds is not None:
        return _made_of_kinds(run, backend, win, choice.kinds, choice.budget_layers)
    if s.window is not None:
        fitted = backend.fit(win.calib, layers) if s.references else None
        refs = {"harp-ls": (layers, [1.0] * k, fitted.maps)} if fitted is not None else {}
        windows = _windows(run, layers)
        return _Made([], None, {"method": "window", "window": s.window, "sinks": s.sinks}, fitted, refs, [],
                     windows, _fit_sinks(run, backend, win, windows))
    searched, fitted = choice.searched, choice.fitted
    alphas: list[float] = [float(a) for a in s.alphas] if s.alphas is not None else [1.0] * k
    search_info: dict[str, Any] = {"method": "given", "alphas": alphas} if s.alphas is not None else {}
    if s.alphas is None and (run.fit == "none" or s.references):
        searched = searched or backend.search(win.calib, layers, run.state)
        search_info = searched.to_dict()
    if run.fit == "lstsq" or s.references:
        fitted = fitted or backend.fit(win.calib, layers)
    if run.fit == "lstsq":
        assert fitted is not None
        refs = {"harp": (layers, searched.alphas, None)} if searched is not None else {}
        return _Made(alphas, fitted.maps, search_info, fitted, refs, layers)
    if s.alphas is None:
        assert searched is not None
        alphas = list(searched.alphas)
    refs = {"harp-ls": (layers, [1.0] * k, fitted.maps)} if fitted is not None else {}
    return _Made(alphas, None, search_info, fitted, refs, layers)


def _made_of_kinds(run: _Run, backend: _Backend, win: Windows, plan: KindPlan, budget_layers: list[int]) -> _Made:
    """`kind=auto`'s plan as the layers to bypass (refit or drop) and to window; the reference row is the refit
    of the top k layers its budget was stated as (same KV saving)."""
    bypassed, alphas, maps = plan.bypassed
    refs: dict[str, tuple[list[int], list[float], dict[int, LinearMap] | None]] = {}
    fitted = None
    if run.s.references and budget_layers:
        fitted = backend.fit(win.calib, budget_layers)
        refs["harp-ls"] = (budget_layers, [1.0] * len(budget_layers), fitted.maps)
    info = {"method": "kind=auto", "window": plan.window, "sinks": run.s.sinks,
            "kinds": {str(i): k for i, k in sorted(plan.kinds.items(), reverse=True)}}
    return _Made(alphas, maps, info, fitted, refs, bypassed, plan.window_layers,
                 _fit_sinks(run, backend, win, plan.window_layers or {}))


def _fit_sinks(run: _Run, backend: _Backend, win: Windows, windows: dict[int, int]) -> SinkFit | None:
    """`sinks="fit"`: the window layers' fitted sinks, on SINK_FIT_WINDOWS calibration windows of their own
    length (seeded, from the calibration text)."""
    if run.s.sinks != SINKS_FIT or not windows:
        return None
    model = backend.resident()
    ids = sink_fit_windows(tokenize(backend.tokenizer, win.calib_text), max(windows.values()),
                           getattr(model.config, "max_position_embeddings", None), run.s.seed, bos=win.bos)
    seq = ids.shape[1]
    with _timed(run.seconds, "sink fit"):
        fit = fit_sinks(model, ids, windows, sinks=SINK_TOKENS, progress=run.s.progress)
    run.log(f"fitted sinks of window layers {', '.join(str(i) for i in sorted(windows, reverse=True))} "
            f"(standing in for {SINK_TOKENS} sink tokens) on {ids.shape[0]} x {seq} calibration tokens; mean "
            f"share of attention {sum(fit.share.values()) / len(fit.share):.2f}")
    return fit


@dataclass
class _Measured:
    ppl: dict[str, float]
    params_before: int
    kv_before: int
    params_after: int = 0
    kv_after: int = 0


def _measure_original(run: _Run, model: nn.Module, layers: list[int], win: Windows) -> _Measured:
    check_resident(model, layers)
    with _timed(run.seconds, "eval"):
        ppl = {"original": perplexity(model, win.eval, batch_size=run.s.batch_size, progress="eval: original").ppl}
    return _Measured(ppl, count_parameters(model), kv_bytes_after_prefill(model))


def _prune_and_measure(run: _Run, model: nn.Module, layers: list[int], made: _Made, win: Windows,
                       before: _Measured) -> _Measured:
    """The reference rows (pruned in memory, restored), then the model pruned for good and measured."""
    s, k, ppl = run.s, len(layers), dict(before.ppl)
    with _timed(run.seconds, "eval"):
        if s.references:
            same = {} if s.kind == "auto" else {"alpha=1": (layers, [1.0] * k, None),
                                                 "alpha=0": (layers, [0.0] * k, None)}
            for name, (ref_layers, ref_alphas, ref_maps) in {**made.references, **same}.items():
                with temporarily_pruned(model, ref_layers, ref_alphas, ref_maps):
                    ppl[name] = perplexity(model, win.eval, batch_size=s.batch_size, progress=f"eval: {name}").ppl
        prune(model, made.bypassed, made.alphas, made.maps, windows=made.windows, sinks=run.sinks,
              fitted_sinks=made.sinks.fitted if made.sinks is not None else None)
        ppl[run.method] = perplexity(model, win.eval, batch_size=s.batch_size, progress=f"eval: {run.method}").ppl
    return _Measured(ppl, before.params_before, before.kv_before, count_parameters(model),
                     kv_bytes_after_prefill(model))


def _report(run: _Run, model: nn.Module, win: Windows, choice: _Choice, made: _Made, m: _Measured) -> PruneReport:
    s = run.s
    fit_info: dict[str, Any] = {"method": run.fit}
    if made.fitted is not None:
        fit_info.update(made.fitted.to_dict(), method=run.fit, ridge_setting=s.ridge, prior_setting=s.fit_prior,
                        used=run.method == "harp-ls")
    report = PruneReport(
        settings={k: (list(v) if isinstance(v, tuple) else v) for k, v in s.__dict__.items()},
        layers=list(choice.layers), alphas=list(made.alphas), ppl=m.ppl,
        window=choice.kinds.window if choice.kinds is not None else s.window, sinks=run.sinks,
        sink_fit=made.sinks.to_dict() if made.sinks is not None else {},
        kinds={str(i): k for i, k in sorted(choice.kinds.kinds.items(), reverse=True)} if choice.kinds else {},
        eval_tokens=int(win.eval.shape[0] * (win.eval.shape[1] - 1)),
        calib_tokens=int(win.calib.shape[0] * (win.calib.shape[1] - 1)),
        params_before=m.params_before, params_after=m.params_after,
        params_removed_predicted=removed_parameters(model.config, made.bypassed, made.alphas),
        kv_bytes_before=m.kv_before, kv_bytes_after=m.kv_after, seconds=run.seconds, search=made.search_info,
        selection=choice.selection, fit=fit_info, method=run.method,
        kv_at_contexts=kv_savings(model.config, None, dtype=s.dtype),
    )
    report.settings["grid"] = run.grid
    report.settings["calib_overlap"] = win.overlap
    return report


def _save(run: _Run, out: Path, model: nn.Module, tok: Any, win: Windows, report: PruneReport) -> None:
    """The checkpoint with its recipe, search log and summary; then the search's resume state goes."""
    s, t = run.s, time.perf_counter()
    log_entries = report.search.get("log", [])
    recipe = {
        "method": run.method,
        **({"window": report.window, "sinks": s.sinks} if report.window is not None else {}),
        **({"sink_fit": report.sink_fit} if report.sink_fit else {}),
        **({"kinds": report.kinds} if report.kinds else {}),
        "fit": report.fit, "source_model": s.model or DEFAULT_MODEL,
        "selection": report.selection, "search": {k: v for k, v in report.search.items() if k != "log"},
        "calibration": {"source": win.calib_text.name, "description": win.calib_text.description,
                        "sha256": win.calib_text.sha256, "windows": win.calib.shape[0],
                        "seq_len": win.calib.shape[1], "seed": s.seed, "bos_token": win.bos},
        "evaluation": {"source": win.eval_text.name, "sha256": win.eval_text.sha256, "windows": win.eval.shape[0],
                       "seq_len": win.eval.shape[1], "bos_token": win.bos},
        "perplexity": report.ppl, "host": host_info(),
    }
    report.seconds["save"] = 0.0
    report.seconds["total"] = time.perf_counter() - run.t_start
    summary = report.to_dict()
    save(model, out, tokenizer=tok, recipe=recipe, overwrite=s.overwrite,
         extra_files={"search_log.json": lambda p: write_json_atomic(p, log_entries),
                      "harp_summary.json": lambda p: write_json_atomic(p, summary)})
    report.out = str(out)
    report.seconds["save"] = time.perf_counter() - t
    if run.state is not None and run.state.exists():
        os.remove(run.state)


def check_prune(s: Any) -> ModelInfo | None:
    """Everything `harp prune` / `harp.run_prune` can know before loading weights. Raises Problems."""

    out = Collector()
    info = model_or_problem(s.model, out, "prune the original model.")
    if s.select not in SELECTIONS:
        out.add(f"Unknown `select={s.select!r}`: use one of {', '.join(SELECTIONS)}.")
    elif s.select != "top":
        if s.layers:
            out.add("`select` chooses the layers; it cannot be combined with `layers`.")
        if s.alphas is not None:
            out.add("`alphas` needs known layers: use it with `layers` or the top K, not `select`.")
        if s.streamed:
            out.add(f"`select={s.select}` scores every layer and needs the whole model resident; drop `streamed`.")

    if s.activations not in ACTIVATIONS:
        out.add(f"Unknown activations place {s.activations!r}: use one of {', '.join(ACTIVATIONS)}.")
    elif s.activations != "device" and not s.streamed:
        out.add("`activations` applies to the streamed search; add `streamed` (or drop `activations`).")
    if s.device != "auto":
        out.run(resolve_device, s.device)
    if s.streamed and s.method != "cached":
        out.add("`streamed` runs the cached search; `method=naive` needs the whole model resident.")
    count = check_layer_choice(info, s.k, s.layers, s.alphas, out)
    kind = getattr(s, "kind", None)
    if kind is not None or any(getattr(s, f, None) is not None for f in ("kv_saving", "context", "objective_seq_len")) \
            or getattr(s, "recall_windows", 0):
        _check_kind(s, info, out)
    elif getattr(s, "window", None) is not None:
        _check_window(s, info, count, out)
    elif getattr(s, "sinks", 4) not in (0, PruneSettings.sinks):
        out.add(f"`sinks={s.sinks}` applies to window layers: add `window` (or drop `sinks`).")
    grid = check_grid(s.grid, out)
    check_windows(out, s.calib_windows, s.seq_len)
    if s.eval_seq_len < 2:
        out.add(f"`eval_seq_len={s.eval_seq_len}`: a window needs at least 2 tokens.")
    elif s.eval_tokens < s.eval_seq_len:
        out.add(f"`eval_tokens={s.eval_tokens}` is less than one window of `eval_seq_len={s.eval_seq_len}`.")
    check_positive(out, batch_size=s.batch_size)
    if s.method not in ("cached", "naive"):
        out.add(f"`method={s.method!r}`: use 'cached' or 'naive'.")

    out.run(check_fit_settings, getattr(s, "fit", "none"), getattr(s, "ridge", "auto"), getattr(s, "fit_prior", "auto"))
    out.run(torch_dtype, s.dtype)
    if s.threads is not None and s.threads < 1:
        out.add(f"`threads={s.threads}`: must be at least 1.")

    c = check_text(s.calib, DEFAULT_CALIB, "calib", s.calib_windows, s.seq_len, out)
    e = check_text(s.eval, DEFAULT_EVAL, "eval", 1, s.eval_seq_len, out, "eval_seq_len")
    check_disjoint_sources(c, e, out)
    outp = check_output(s.out, s.overwrite, [info.path if info else None], out)
    searches = s.alphas is None and getattr(s, "window", None) is None and getattr(s, "kind", None) != "auto"
    if outp is not None and info is not None and info.num_layers and count and s.select == "top" and searches:

        order = sorted(set(s.layers), reverse=True) if s.layers else top_layers(info.num_layers, count)
        check_search_state(state_file_for(outp), order, grid, out)
    out.raise_if_any()
    return info


def _check_kind(s: Any, info: ModelInfo | None, out: Collector) -> None:
    """`kind` and the settings only `kind=auto` takes."""
    kind = s.kind
    if kind not in (None, *LAYER_KINDS):
        out.add(f"Unknown `kind={kind!r}`: use one of {', '.join(LAYER_KINDS)}.")
        return
    if kind != "auto":
        for f in ("kv_saving", "context", "objective_seq_len", "recall_windows"):
            if getattr(s, f, None) not in (None, 0):
                out.add(f"`{f}` applies to `kind=auto` (the layers and kinds chosen under a KV budget): add it or drop "
                        f"`{f}`.")
        if kind == "window" and s.window is None:
            out.add("`kind=window` needs the window size: add `window`.")
        if kind == "bypass" and s.window is not None:
            out.add("`kind=bypass` bypasses the chosen layers; `window` keeps their attention: give one of them.")
        if kind != "bypass" and s.window is not None:
            _check_window(s, info, check_layer_choice(info, s.k, s.layers, s.alphas, Collector()), out)
        return
    if s.layers:
        out.add("`kind=auto` chooses the layers: state the KV budget with `k` (the saving of the top k bypassed "
                "layers) or `kv_saving`, not `layers`.")
    if s.select != "top":
        out.add(f"`kind=auto` chooses the layers at any depth itself; drop `select={s.select}`.")
    for bad, why in ((s.alphas is not None, "`alphas`"), (s.fit == "none", "`fit=none`"),
                     (s.streamed, "`streamed`")):
        if bad:
            out.add(f"`kind=auto` picks refit maps, drops and window layers on held-out loss; {why} does not apply.")
    if s.kv_saving is not None:
        out.run(parse_fraction, s.kv_saving)
    if s.window is not None and (isinstance(s.window, bool) or not isinstance(s.window, int) or s.window < 1):
        out.add(f"`window={s.window!r}`: a window is a whole number of tokens, at least 1 (the token itself).")
    _check_sinks(s, info, s.window if s.window is not None else DEFAULT_AUTO_WINDOW, out)
    check_positive(out, objective_windows=s.objective_windows)
    if isinstance(s.recall_windows, bool) or not isinstance(s.recall_windows, int) or s.recall_windows < 0:
        out.add(f"`recall_windows={s.recall_windows!r}`: a whole number of windows, 0 (off) or more.")
    top = info.max_positions if info is not None else None
    for f in ("context", "objective_seq_len"):
        v = getattr(s, f)
        if v is not None and (not isinstance(v, int) or v < 2):
            out.add(f"`{f}={v!r}`: a number of tokens, at least 2.")
        elif v is not None and top and v > top:
            out.add(f"`{f}={v}` is longer than the model's maximum context ({top} tokens).")


def _check_window(s: Any, info: ModelInfo | None, count: int | None, out: Collector) -> None:
    """`window` with the other settings, and on the chosen layers of this model (a layer that is already local
    with a window no larger saves nothing)."""
    w = s.window
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        out.add(f"`window={w!r}`: a window is a whole number of tokens, at least 1 (the token itself).")
        return
    if not _check_sinks(s, info, w, out):
        return
    if s.alphas is not None:
        out.add("`alphas` rescale bypassed layers; `window` keeps the chosen layers' attention: give one of them.")
    if s.fit == "none":
        out.add("`fit=none` (HARP: bypass with a searched alpha) and `window` (keep attention over the last "
                f"{w} tokens) are two kinds of pruned layer: drop one of them.")
    if s.streamed:
        out.add("`window` needs no search, so there is nothing to stream: drop `streamed`.")
    if info is not None and info.config and info.num_layers and count and s.select == "top":
        layers = list(s.layers) if s.layers else top_layers(info.num_layers, count)
        if all(0 <= i < info.num_layers for i in layers):
            cfg = out.run(config_from_dict, info.config)
            if cfg is not None:
                # fitted sinks are fitted with real sink tokens: the same layers must be able to keep them
                sinks = SINK_TOKENS if s.sinks == SINKS_FIT else s.sinks
                out.run(check_window_plan, cfg, {i: w for i in layers}, (), sinks)


def _check_sinks(s: Any, info: ModelInfo | None, window: int, out: Collector) -> bool:
    """`sinks`: a whole number >= 0, or "fit" (then the calibration text must hold the windows the sinks are
    fitted on, longer than `window` + SINK_TOKENS within the model's context). False if `sinks` is unusable."""
    if s.sinks == SINKS_FIT:
        return check_sink_fit(window, info.max_positions if info is not None else None, s.calib, out,
                              what="`sinks=fit`", fix="use a smaller `window`")
    if isinstance(s.sinks, bool) or not isinstance(s.sinks, int) or s.sinks < 0:
        out.add(f"`sinks={s.sinks!r}`: the number of first tokens window layers also see is a whole number >= 0, "
                "or 'fit' (a fitted sink instead of sink tokens).")
        return False
    return True
