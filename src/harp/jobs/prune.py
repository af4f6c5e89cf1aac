"""The end-to-end job behind `harp prune`: load, calibrate, search, prune, measure, save."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harp._version import __version__
from harp.engine.perplexity import perplexity
from harp.engine.streamed import ACTIVATIONS, StreamedModel, activation_store
from harp.engine.text import (
    DEFAULT_CALIB,
    DEFAULT_EVAL,
    bos_token,
    calibration_windows,
    check_disjoint,
    check_disjoint_sources,
    check_text,
    evaluation_windows,
    load_text,
    tokenize,
)
from harp.methods.fit import FitResult, check_fit_settings, fit_layers
from harp.methods.scores import attention_drop_scores, pick
from harp.methods.search import (
    SearchResult,
    check_grid,
    check_search_state,
    parse_grid,
    search_alphas,
    streamed_search,
    top_layers,
)
from harp.model.accounting import (
    count_parameters,
    kv_bytes_after_prefill,
    kv_savings,
    parameter_count,
    removed_parameters,
)
from harp.model.checkpoint import save
from harp.model.load import check_resident, load_on_device, resolve_device
from harp.model.prune import prune, temporarily_pruned
from harp.model.source import DEFAULT_MODEL, ModelInfo, check_layer_choice, model_or_problem
from harp.modeling import LinearMap, decoder_layers, layer_indices
from harp.util.dtypes import torch_dtype
from harp.util.fsio import check_output, check_output_dir, write_json_atomic
from harp.util.problems import Collector, check_positive, check_windows

SELECTIONS = ("top", "attention-drop", "auto")


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
    method: str = "harp"  # what the saved model is: "harp" (searched alphas) or "harp-ls" (refit)
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
    return out.parent / f".{out.name}.harp-search.json"


def run_prune(settings: PruneSettings, log: Any = print) -> PruneReport:
    """Search the alphas (unless given), prune, measure perplexity before/after, save if `out`."""
    t_start = time.perf_counter()
    s = settings
    check_prune(s)  # every argument against the config / GGUF header / files, all problems at once: nothing loaded
    if s.threads:
        torch.set_num_threads(s.threads)
    out = check_output_dir(s.out, s.overwrite) if s.out else None
    grid = parse_grid(s.grid)
    fit = check_fit_settings(s.fit, s.ridge, s.fit_prior)

    t = time.perf_counter()
    model: nn.Module | None = None
    streamer = None
    if s.streamed and s.alphas is None:
        # the search comes first and never has the whole model resident; the model is loaded afterwards
        # for evaluation, pruning and saving
        from transformers import AutoTokenizer


        streamer = StreamedModel(s.model, dtype=s.dtype, device=s.device)
        config = streamer.model.config
        tok = AutoTokenizer.from_pretrained(str(streamer.folder))
        model_desc = f"{type(streamer.model).__name__}, {config.num_hidden_layers} layers, " \
            f"{parameter_count(config) / 1e6:.1f} M parameters, streamed from {streamer.folder}"
    else:
        model, tok = load_on_device(s.model, dtype=s.dtype, device=s.device)
        config = model.config
        model_desc = f"{type(model).__name__}, {len(decoder_layers(model))} layers, " \
            f"{count_parameters(model) / 1e6:.1f} M parameters"
    if getattr(config, "harp", None):
        raise ValueError(f"{s.model} is already a HARP-pruned checkpoint; prune the original model.")
    num = config.num_hidden_layers
    if s.layers:
        layers = sorted(layer_indices(s.layers, num), reverse=True)
    else:
        layers = top_layers(num, s.k if s.k is not None else 8)
    if s.alphas is not None and len(s.alphas) != len(layers):
        raise ValueError(f"`alphas` gives {len(s.alphas)} values for {len(layers)} layers (top layer first).")
    seconds = {"load": time.perf_counter() - t}
    what = f"pruning layers {sorted(layers)}" if s.select == "top" else \
        f"pruning {len(layers)} layers chosen by `select={s.select}`"
    log(f"model: {s.model or DEFAULT_MODEL} ({model_desc}), {what}")

    t = time.perf_counter()
    calib_text = load_text(s.calib, DEFAULT_CALIB)
    eval_text = load_text(s.eval, DEFAULT_EVAL)
    bos = bos_token(tok)
    calib = calibration_windows(tokenize(tok, calib_text), s.calib_windows, s.seq_len, s.seed, bos=bos)
    ev = evaluation_windows(tokenize(tok, eval_text), s.eval_seq_len, s.eval_tokens, bos=bos)
    overlap = check_disjoint(calib_text, eval_text, calib, ev)
    seconds["data"] = time.perf_counter() - t
    log(f"calibration: {calib_text.description}, {calib.shape[0]} x {calib.shape[1]} tokens (seed {s.seed}); "
        f"evaluation: {eval_text.description}, {ev.shape[0]} x {ev.shape[1]} tokens")

    method = "harp-ls" if fit == "lstsq" else "harp"
    state = state_file_for(out) if out else None
    seconds["search"] = seconds["fit"] = 0.0
    k = len(layers)

    def search_on(target: Any, lays: list[int], state_path: Path | None) -> SearchResult:
        t = time.perf_counter()
        if streamer is not None:

            res = streamed_search(None, calib, lays, grid=grid, batch_size=s.batch_size, state_path=state_path,
                                  progress=s.progress, activations=s.activations, model=target)
        else:
            res = search_alphas(target, calib, lays, grid=grid, method=s.method, batch_size=s.batch_size,
                                state_path=state_path, progress=s.progress)
        if res.resumed_layers:
            log(f"resumed a search: {res.resumed_layers} of {len(lays)} layers were already done")
        seconds["search"] += time.perf_counter() - t
        return res

    def fit_on(lays: list[int]) -> FitResult:
        t = time.perf_counter()
        kw: dict[str, Any] = {"ridge": s.ridge, "prior": s.fit_prior, "batch_size": s.batch_size,
                              "progress": s.progress}
        if streamer is not None:

            sm = streamer
            with activation_store(s.activations, sm.device) as keep:
                res = fit_layers(sm.model, calib, lays, prepare=lambda lo, bar: sm.capture(calib, lo, s.batch_size,
                                                                                          bar, keep), **kw)
        else:
            assert model is not None
            res = fit_layers(model, calib, lays, **kw)
        seconds["fit"] += time.perf_counter() - t
        return res

    # --- which layers --------------------------------------------------------------------------------
    selection: dict[str, Any] = {"rule": s.select}
    fitted: FitResult | None = None  # the refit of the chosen layers, when the selection already made it
    searched: SearchResult | None = None  # HARP's search on the chosen layers, likewise
    if s.select in ("attention-drop", "auto"):
        assert model is not None  # check_prune refuses `select` with `streamed`
        t = time.perf_counter()
        scores = attention_drop_scores(model, calib, s.batch_size)
        any_depth = sorted(pick(scores, k, highest=True), reverse=True)
        selection.update(score="mean cos(X, X + Attn(LN(X))) per layer (He et al. 2024)", scores=scores)
        if s.select == "attention-drop":
            layers = any_depth
            log(f"selected by the Attention Drop score (any depth): layers {sorted(layers)}")
        else:  # auto: prune both ways, keep the lower perplexity on held-out calibration windows
            # windows of the calibration text the fit / search never saw: the fitting windows themselves
            # favour whichever candidate overfits them most
            n_held = max(2, s.calib_windows // 2)
            try:
                held = calibration_windows(tokenize(tok, calib_text), n_held, s.seq_len, s.seed, bos=bos,
                                           skip=s.calib_windows)
                held_desc = f"{n_held} held-out calibration windows"
            except ValueError:
                held, held_desc = calib, "the calibration windows (the text is too short for held-out ones)"
            cands: dict[str, dict[str, Any]] = {}
            made: dict[str, Any] = {}
            for rule, lays in (("top", layers), ("attention-drop", any_depth)):
                if rule == "attention-drop" and lays == layers:
                    continue
                if fit == "lstsq":
                    made[rule] = fit_on(lays)
                    plan_alphas, plan_maps = [1.0] * k, made[rule].maps
                else:
                    made[rule] = search_on(model, lays, None)
                    plan_alphas, plan_maps = made[rule].alphas, None
                with temporarily_pruned(model, lays, plan_alphas, plan_maps):
                    cal = perplexity(model, held, batch_size=s.batch_size).ppl
                cands[rule] = {"layers": sorted(lays), "calib_ppl": cal}
            picked = min(cands, key=lambda r: cands[r]["calib_ppl"])
            layers = sorted(cands[picked]["layers"], reverse=True)
            fitted, searched = (made[picked], None) if fit == "lstsq" else (None, made[picked])
            selection.update(candidates=cands, picked=picked, judged_on=held_desc)
            log(f"`select=auto`, perplexity on {held_desc}: " + ", ".join(
                f"{r} {c['calib_ppl']:.2f} (layers {c['layers']})" for r, c in cands.items()) + f"; picked {picked}")
        seconds["select"] = time.perf_counter() - t

    # --- what the pruned layers get: fitted maps or searched alphas; and the other as a reference ---------
    alphas: list[float] = [float(a) for a in s.alphas] if s.alphas is not None else [1.0] * k
    search_info: dict[str, Any] = {"method": "given", "alphas": alphas} if s.alphas is not None else {}
    references: dict[str, tuple[list[float], dict[int, LinearMap] | None]] = {}

    def produce(target: Any) -> dict[int, LinearMap] | None:
        nonlocal alphas, search_info, fitted, searched
        want_search = s.alphas is None and (fit == "none" or s.references)
        if want_search:
            searched = searched or search_on(target, layers, state)
            search_info = searched.to_dict()
        if fit == "lstsq" or s.references:
            fitted = fitted or fit_on(layers)
        if fit == "lstsq":
            if searched is not None:
                references["harp"] = (searched.alphas, None)
            return fitted.maps  # type: ignore[union-attr]
        if s.alphas is None:
            alphas = list(searched.alphas)  # type: ignore[union-attr]
        if fitted is not None:
            references["harp-ls"] = ([1.0] * k, fitted.maps)
        return None

    maps: dict[int, LinearMap] | None = None
    if streamer is not None:
        maps = produce(streamer)
        streamer = None  # drop the partially loaded model before loading the whole one
        t = time.perf_counter()
        model, _ = load_on_device(s.model, dtype=s.dtype, device=s.device, with_tokenizer=False)
        seconds["load"] += time.perf_counter() - t
    assert model is not None
    check_resident(model, layers)

    ppl: dict[str, float] = {}
    t = time.perf_counter()
    ppl["original"] = perplexity(model, ev, batch_size=s.batch_size, progress="eval: original").ppl
    seconds["eval"] = time.perf_counter() - t
    params_before = count_parameters(model)
    kv_before = kv_bytes_after_prefill(model)

    if not s.streamed:
        maps = produce(model)

    t = time.perf_counter()
    if s.references:
        references["alpha=1"] = ([1.0] * k, None)
        references["alpha=0"] = ([0.0] * k, None)
        for name, (ref_alphas, ref_maps) in references.items():
            with temporarily_pruned(model, layers, ref_alphas, ref_maps):
                ppl[name] = perplexity(model, ev, batch_size=s.batch_size, progress=f"eval: {name}").ppl
    prune(model, layers, alphas, maps)
    ppl[method] = perplexity(model, ev, batch_size=s.batch_size, progress=f"eval: {method}").ppl
    seconds["eval"] += time.perf_counter() - t
    params_after = count_parameters(model)
    kv_after = kv_bytes_after_prefill(model)
    fit_info: dict[str, Any] = {"method": fit}
    if fitted is not None:
        fit_info.update(fitted.to_dict(), method=fit, ridge_setting=s.ridge, prior_setting=s.fit_prior,
                        used=fit == "lstsq")

    report = PruneReport(
        settings={k: (list(v) if isinstance(v, tuple) else v) for k, v in s.__dict__.items()},
        layers=list(layers),
        alphas=list(alphas),
        ppl=ppl,
        eval_tokens=int(ev.shape[0] * (ev.shape[1] - 1)),
        calib_tokens=int(calib.shape[0] * (calib.shape[1] - 1)),
        params_before=params_before,
        params_after=params_after,
        params_removed_predicted=removed_parameters(model.config, layers, alphas),
        kv_bytes_before=kv_before,
        kv_bytes_after=kv_after,
        seconds=seconds,
        search=search_info,
        selection=selection,
        fit=fit_info,
        method=method,
        kv_at_contexts=kv_savings(model.config, None, dtype=s.dtype),
    )
    report.settings["grid"] = grid
    report.settings["calib_overlap"] = overlap
    if out is not None:
        t = time.perf_counter()
        log_entries = search_info.get("log", [])
        recipe = {
            "method": method,
            "fit": fit_info,
            "source_model": s.model or DEFAULT_MODEL,
            "selection": selection,
            "search": {k: v for k, v in search_info.items() if k != "log"},
            "calibration": {"source": calib_text.name, "description": calib_text.description,
                            "sha256": calib_text.sha256, "windows": calib.shape[0], "seq_len": calib.shape[1],
                            "seed": s.seed, "bos_token": bos},
            "evaluation": {"source": eval_text.name, "sha256": eval_text.sha256, "windows": ev.shape[0],
                           "seq_len": ev.shape[1], "bos_token": bos},
            "perplexity": ppl,
            "host": {"python": platform.python_version(), "torch": torch.__version__, "harp": __version__},
        }
        report.seconds["save"] = 0.0
        report.seconds["total"] = time.perf_counter() - t_start
        summary = report.to_dict()
        save(
            model, out, tokenizer=tok, recipe=recipe, overwrite=s.overwrite,
            extra_files={
                "search_log.json": lambda p: write_json_atomic(p, log_entries),
                "harp_summary.json": lambda p: write_json_atomic(p, summary),
            },
        )
        report.out = str(out)
        report.seconds["save"] = time.perf_counter() - t
        if state is not None and state.exists():
            os.remove(state)
    report.seconds["total"] = time.perf_counter() - t_start
    return report


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
    if outp is not None and info is not None and info.num_layers and count and s.select == "top" and s.alphas is None:

        order = sorted(set(s.layers), reverse=True) if s.layers else top_layers(info.num_layers, count)
        check_search_state(state_file_for(outp), order, grid, out)
    out.raise_if_any()
    return info
