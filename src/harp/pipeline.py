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

from ._version import __version__
from .checkpoint import check_output_dir, save, write_json_atomic
from .core import prune, temporarily_pruned
from .flops import parameter_count
from .methods.scores import attention_drop_scores, pick
from .modeling import decoder_layers, layer_indices
from .models import DEFAULT_MODEL
from .perplexity import perplexity
from .search import parse_grid, search_alphas, top_layers
from .stats import count_parameters, kv_bytes_after_prefill, removed_parameters
from .streaming import ACTIVATIONS, check_resident, load_on_device, resolve_device
from .text import (
    DEFAULT_CALIB,
    DEFAULT_EVAL,
    bos_token,
    calibration_windows,
    check_disjoint,
    evaluation_windows,
    load_text,
    tokenize,
)

SELECTIONS = ("top", "attention-drop")


@dataclass
class PruneSettings:
    model: str | None = None
    k: int | None = 8
    layers: Sequence[int] | None = None  # explicit layer indices (instead of the top k)
    select: str = "top"  # how k layers are chosen: "top" (HARP) | "attention-drop" (He et al.'s score, any depth)
    alphas: Sequence[float] | None = None  # skip the search and use these
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
    if s.threads:
        torch.set_num_threads(s.threads)
    out = check_output_dir(s.out, s.overwrite) if s.out else None
    grid = parse_grid(s.grid)
    if s.eval_tokens < s.eval_seq_len:
        raise ValueError(f"--eval-tokens {s.eval_tokens} is less than one window of --eval-seq-len {s.eval_seq_len}.")

    t = time.perf_counter()
    model: nn.Module | None = None
    streamer = None
    if s.activations not in ACTIVATIONS:
        raise ValueError(f"Unknown activations place {s.activations!r}: use one of {', '.join(ACTIVATIONS)}.")
    if s.activations != "device" and not s.streamed:
        raise ValueError("--activations applies to the streamed search; add --streamed (or drop --activations).")
    if s.device != "auto":
        resolve_device(s.device)  # a clear error now, not after the data is prepared
    if s.streamed and s.method != "cached":
        raise ValueError("--streamed runs the cached search; --method naive needs the whole model resident.")
    if s.streamed and s.alphas is None:
        # the search comes first and never has the whole model resident; the model is loaded afterwards
        # for evaluation, pruning and saving
        from transformers import AutoTokenizer

        from .streaming import StreamedModel

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
    if s.select not in SELECTIONS:
        raise ValueError(f"Unknown --select {s.select!r}: use one of {', '.join(SELECTIONS)}.")
    if s.select != "top":
        if s.layers:
            raise ValueError("--select chooses the layers; it cannot be combined with --layer-ids.")
        if s.alphas is not None:
            raise ValueError("--alphas needs known layers: use it with --layer-ids or the top K, not --select.")
        if s.streamed:
            raise ValueError(f"--select {s.select} scores every layer and needs the whole model resident; "
                             "drop --streamed.")
    if s.layers:
        layers = sorted(layer_indices(s.layers, num), reverse=True)
    else:
        layers = top_layers(num, s.k if s.k is not None else 8)
    if s.alphas is not None and len(s.alphas) != len(layers):
        raise ValueError(f"--alphas gives {len(s.alphas)} values for {len(layers)} layers (top layer first).")
    seconds = {"load": time.perf_counter() - t}
    what = f"pruning layers {sorted(layers)}" if s.select == "top" else \
        f"pruning {len(layers)} layers chosen by --select {s.select}"
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

    selection: dict[str, Any] = {"rule": s.select}
    if s.select == "attention-drop":
        assert model is not None  # --streamed was refused above
        t = time.perf_counter()
        scores = attention_drop_scores(model, calib, s.batch_size)
        layers = sorted(pick(scores, len(layers), highest=True), reverse=True)
        seconds["select"] = time.perf_counter() - t
        selection.update(score="mean cos(X, X + Attn(LN(X))) per layer (He et al. 2024)", scores=scores)
        log(f"selected by the Attention Drop score (any depth): layers {sorted(layers)}")

    search_info: dict[str, Any] = {}
    state = state_file_for(out) if out else None
    seconds["search"] = 0.0
    alphas: list[float] = []

    def search(target: Any) -> None:
        nonlocal alphas, search_info
        t = time.perf_counter()
        if streamer is not None:
            from .streaming import streamed_search

            res = streamed_search(None, calib, layers, grid=grid, batch_size=s.batch_size, state_path=state,
                                  progress=s.progress, activations=s.activations, model=target)
        else:
            res = search_alphas(
                target, calib, layers, grid=grid, method=s.method, batch_size=s.batch_size,
                state_path=state, progress=s.progress,
            )
        alphas = res.alphas
        search_info = res.to_dict()
        if res.resumed_layers:
            log(f"resumed a search: {res.resumed_layers} of {len(layers)} layers were already done")
        seconds["search"] += time.perf_counter() - t

    if s.alphas is not None:
        alphas = [float(a) for a in s.alphas]
        search_info = {"method": "given", "alphas": alphas}
    elif streamer is not None:
        search(streamer)
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

    if s.alphas is None and not s.streamed:
        search(model)

    t = time.perf_counter()
    if s.references:
        for name, a in (("alpha=1", 1.0), ("alpha=0", 0.0)):
            with temporarily_pruned(model, layers, [a] * len(layers)):
                ppl[name] = perplexity(model, ev, batch_size=s.batch_size, progress=f"eval: {name}").ppl
    prune(model, layers, alphas)
    ppl["harp"] = perplexity(model, ev, batch_size=s.batch_size, progress="eval: harp").ppl
    seconds["eval"] += time.perf_counter() - t
    params_after = count_parameters(model)
    kv_after = kv_bytes_after_prefill(model)

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
    )
    report.settings["grid"] = grid
    report.settings["calib_overlap"] = overlap
    if out is not None:
        t = time.perf_counter()
        log_entries = search_info.get("log", [])
        recipe = {
            "method": "harp",
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
