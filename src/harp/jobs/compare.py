"""`harp compare`: every method at equal KV-cache reduction on one model, one calibration set, one
evaluation protocol — a Markdown table, a JSON file and a PNG chart (drawn by `harp.report.compare`).

Rows per k: the original model, then each method's plan applied in memory (pruned, measured,
restored exactly). Columns: WikiText-2 perplexity, task scores (lm-eval), parameters removed,
KV-cache reduction (measured on a real cache after a prefill) and the method's search time.

A long comparison writes each finished row to a hidden state file next to `out`; rerun the same
command after an interruption and it continues with the rows still missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from harp._version import __version__
from harp.engine.evaluate import PERPLEXITY_TASK, TaskSpec, evaluate, parse_limit, perplexity_windows, resolve_tasks
from harp.engine.text import (
    DEFAULT_CALIB,
    DEFAULT_EVAL,
    bos_token,
    calibration_windows,
    check_disjoint,
    check_disjoint_sources,
    check_text,
    load_text,
    tokenize,
)
from harp.methods.autok import auto_k
from harp.methods.registry import METHODS, parse_methods
from harp.methods.search import check_grid
from harp.methods.selector import ORIGINAL, Plan, Selector, applied
from harp.model.accounting import count_parameters, kv_bytes_after_prefill
from harp.model.load import load_model
from harp.model.prune import check_k
from harp.model.source import DEFAULT_MODEL, ModelInfo, _check_k, model_or_problem
from harp.modeling import decoder_layers
from harp.report.compare import compare_markdown, plot_compare
from harp.util.fsio import StateMismatch, atomic_dir, check_output, check_output_dir, read_state, write_json_atomic
from harp.util.problems import Collector, check_windows

STATE_VERSION = 1


@dataclass
class CompareSettings:
    model: str | None = None
    ks: Sequence[int] = (8,)
    methods: str | Sequence[str] | None = None  # None = all
    tasks: str | Sequence[str] | None = None  # lm-eval tasks; WikiText-2 perplexity is always measured
    limit: str | int | None = None
    data_dir: str | None = None
    calib: str | None = None
    calib_windows: int = 16
    seq_len: int = 512
    seed: int = 0
    eval: str | None = None
    eval_tokens: int = 16384
    eval_seq_len: int = 1024
    grid: str | Sequence[float] | None = None
    batch_size: int = 4
    eval_batch_size: int = 8
    max_gen_toks: int | None = None
    refine_passes: int = 6
    auto_k: bool = False
    max_ppl_increase: float | None = None  # fraction: 0.1 = calibration perplexity may rise 10 %
    max_k: int | None = None
    dtype: str = "float32"
    threads: int | None = None
    out: str | None = None
    overwrite: bool = False
    progress: bool = True
    command: str | None = None  # the command line, recorded in the report

    def fingerprint_fields(self) -> dict[str, Any]:
        skip = {"out", "overwrite", "progress", "threads", "command"}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k not in skip}


@dataclass
class CompareReport:
    settings: dict[str, Any]
    model: str
    num_layers: int
    params_before: int
    kv_bytes_before: int
    tasks: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    data: dict[str, Any]
    seconds: dict[str, float]
    auto_k: dict[str, Any] | None = None
    host: dict[str, Any] = field(default_factory=dict)
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def row(self, k: int, method: str) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["k"] == k and r["method"] == method), None)

    @property
    def ks(self) -> list[int]:
        return sorted({r["k"] for r in self.rows if r["k"] > 0})

    def to_markdown(self) -> str:
        return compare_markdown(self)


# ------------------------------------------------------------------------------------------------
# Measuring one row
# ------------------------------------------------------------------------------------------------


def _compact_info(info: dict[str, Any]) -> dict[str, Any]:
    """Plan info without bulky logs (scores per layer are kept: they are the evidence)."""
    return {k: v for k, v in info.items() if k not in ("log",)}


def _fingerprint(settings: CompareSettings, model: nn.Module) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(settings.fingerprint_fields(), sort_keys=True, default=str).encode())
    cfg = model.config.to_dict()
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    return h.hexdigest()


def run_compare(settings: CompareSettings, log: Callable[[str], None] = print) -> CompareReport:
    """Select, prune (in memory), evaluate and tabulate every method for every k. Writes `out` if set."""
    s = settings
    t_start = time.perf_counter()
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if s.threads:
        torch.set_num_threads(s.threads)
    out = check_output_dir(s.out, s.overwrite) if s.out else None
    methods = parse_methods(s.methods)
    lm_tasks = resolve_tasks(s.tasks) if s.tasks else []
    specs: list[TaskSpec] = [resolve_tasks(PERPLEXITY_TASK)[0]] + [t for t in lm_tasks if t.kind != "perplexity"]
    parse_limit(s.limit)
    ks = sorted({int(k) for k in s.ks}, reverse=True)
    if s.auto_k:
        if s.max_ppl_increase is None:
            raise ValueError("`auto_k` needs `max_ppl_increase` P (percent the calibration perplexity may rise).")
    elif not ks:
        raise ValueError("Give `ks` K (or several, e.g. 4,8), or `auto_k` `max_ppl_increase` P.")
    if s.eval_tokens < s.eval_seq_len:
        raise ValueError(f"`eval_tokens={s.eval_tokens}` is less than one window of `eval_seq_len={s.eval_seq_len}`.")

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    model, tok = load_model(s.model, dtype=s.dtype)
    if getattr(model.config, "harp", None):
        raise ValueError(f"{s.model} is already HARP-pruned: compare methods on the original model.")
    num = len(decoder_layers(model))
    for k in ks:
        check_k(k, num, keep_one=True)  # whole-layer methods are among those compared
    seconds["load"] = time.perf_counter() - t
    name = s.model or DEFAULT_MODEL
    log(f"model: {name} ({type(model).__name__}, {num} layers, {count_parameters(model) / 1e6:.1f} M parameters)")

    t = time.perf_counter()
    calib_text = load_text(s.calib, DEFAULT_CALIB)
    eval_text = load_text(s.eval, DEFAULT_EVAL)
    calib = calibration_windows(tokenize(tok, calib_text), s.calib_windows, s.seq_len, s.seed, bos=bos_token(tok))
    ev, ev_desc = perplexity_windows(tok, s.eval, s.eval_tokens, s.eval_seq_len)
    overlap = check_disjoint(calib_text, eval_text, calib, ev)
    seconds["data"] = time.perf_counter() - t
    log(f"calibration: {calib_text.description}, {calib.shape[0]} x {calib.shape[1]} tokens (seed {s.seed}); "
        f"perplexity: {ev_desc}, {ev.shape[0]} x {ev.shape[1]} tokens")

    state_file = out.parent / f".{out.name}.compare-state.json" if out else None
    fp = _fingerprint(s, model)
    rows: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {}
    try:
        st = read_state(state_file, STATE_VERSION, fp)
    except StateMismatch:
        st = None
        log(f"ignoring {state_file}: it belongs to a different comparison")
    if st is not None:
        rows = st.get("rows", {})
        extra = st.get("extra", {})
        log(f"resuming: {len(rows)} row(s) already measured ({state_file})")

    def save_state() -> None:
        if state_file is not None:
            state_file.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(state_file, {"version": STATE_VERSION, "fingerprint": fp, "rows": rows, "extra": extra})

    params_before = count_parameters(model)
    kv_before = kv_bytes_after_prefill(model)
    eval_seconds = 0.0

    def measure(key: str, plan: Plan, k: int) -> None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        log(f"evaluating {plan.method}" + (f" (k = {k}): {plan.describe()}" if k else ""))
        with applied(model, plan):
            res = evaluate(model, tok, [t.name for t in specs], s.limit, data_dir=s.data_dir,
                           batch_size=s.eval_batch_size, eval_windows=ev, max_gen_toks=s.max_gen_toks,
                           log=lambda m: log(f"  {m}"))
            params = count_parameters(model)
            kv = kv_bytes_after_prefill(model)
        dt = time.perf_counter() - t0
        eval_seconds += dt
        if "data_dir" not in extra and res.data_dir:
            extra["data_dir"] = res.data_dir
            extra["data_files"] = res.data_files
        rows[key] = {
            "k": k, "method": plan.method, "kind": plan.kind, "layers": plan.layers, "alphas": plan.alphas,
            "plan": plan.describe(), "calib_ppl": plan.calib_ppl, "search_seconds": plan.search_seconds,
            "scores": {n: {"title": sc.title, "metric": sc.metric, "value": sc.value, "stderr": sc.stderr,
                           "higher_is_better": sc.higher_is_better, "samples": sc.samples, "total": sc.total,
                           "seconds": sc.seconds}
                       for n, sc in res.scores.items()},
            "params": params, "params_removed": params_before - params,
            "params_removed_pct": 100.0 * (params_before - params) / params_before,
            "kv_bytes": kv, "kv_reduction": 1.0 - kv / kv_before if kv_before else 0.0,
            "eval_seconds": dt, "info": _compact_info(plan.info),
        }
        save_state()

    if "0:original" not in rows:
        measure("0:original", ORIGINAL, 0)

    auto_info: dict[str, Any] | None = None
    search_seconds_total = 0.0
    pairs = [(k, m) for k in ks for m in methods]
    if s.auto_k:
        # the refit methods prune more layers within the same budget, so they get a k of their own
        refit = [m for m in methods if METHODS[m].refit]
        for key, use_fit in (("auto_k", False), ("auto_k_fit", True)):
            if use_fit and not refit:
                continue
            if key not in extra:
                t = time.perf_counter()
                log(f"auto-k{' (refit)' if use_fit else ''}: the largest k whose calibration perplexity stays "
                    f"within +{100 * s.max_ppl_increase:g} %")
                ar = auto_k(model, calib, s.max_ppl_increase, max_k=s.max_k, grid=s.grid, batch_size=s.batch_size,
                            progress=s.progress, fit=use_fit)
                extra[key] = ar.to_dict()
                save_state()
                search_seconds_total += time.perf_counter() - t
            info = extra[key]
            log(f"auto-k{' (refit)' if use_fit else ''} chose k = {info['k']} (calibration ppl "
                f"{info['base_ppl']:.3f}, budget {info['budget_ppl']:.3f})")
        auto_info = extra["auto_k"]
        if "auto_k_fit" in extra:
            auto_info = {**auto_info, "refit": extra["auto_k_fit"]}
        k_of = {m: int(extra["auto_k_fit" if m in refit else "auto_k"]["k"]) for m in methods}
        if min(k_of.values()) < 1:
            raise ValueError(
                f"No k fits the budget for {', '.join(m for m, k in k_of.items() if k < 1)}: pruning even the top "
                f"layer raises calibration perplexity above {auto_info['budget_ppl']:.3f} "
                f"(+{100 * s.max_ppl_increase:g} %). Allow a larger `max_ppl_increase`."
            )
        ks = sorted(set(k_of.values()), reverse=True)
        pairs = [(k_of[m], m) for m in methods]

    selector = Selector(model, calib, grid=s.grid, batch_size=s.batch_size, refine_passes=s.refine_passes,
                        progress=s.progress, log=log)
    for k, m in sorted(pairs, key=lambda p: -p[0]):  # largest k first: greedy prefixes are reused
        key = f"{k}:{m}"
        if key in rows:
            continue
        t = time.perf_counter()
        log(f"selecting {m} (k = {k}) — {METHODS[m].summary}")
        plan = selector.select(m, k)
        search_seconds_total += time.perf_counter() - t
        measure(key, plan, k)
    seconds["search"] = search_seconds_total
    seconds["eval"] = eval_seconds
    seconds["total"] = time.perf_counter() - t_start

    ordered = [rows["0:original"]] + [rows[f"{k}:{m}"] for k in ks for m in methods if (k, m) in pairs]
    report = CompareReport(
        settings={**s.fingerprint_fields(), "command": s.command, "threads": torch.get_num_threads(),
                  "calib_overlap": overlap, "grid": selector.grid},
        model=name, num_layers=num, params_before=params_before, kv_bytes_before=kv_before,
        tasks=[{"name": t.name, "title": t.title, "kind": t.kind} for t in specs],
        rows=ordered,
        data={"calibration": calib_text.description, "calib_windows": int(calib.shape[0]), "bos_token": bos_token(tok),
              "calib_seq_len": int(calib.shape[1]), "evaluation": ev_desc, "eval_windows": int(ev.shape[0]),
              "eval_seq_len": int(ev.shape[1]), "limit": s.limit, "data_dir": extra.get("data_dir"),
              "data_files": extra.get("data_files", {})},
        seconds=seconds, auto_k=auto_info,
        host={"python": platform.python_version(), "torch": torch.__version__, "harp": __version__,
              "cpus": os.cpu_count(), "load_average_at_start": load_avg},
    )
    if out is not None:
        with atomic_dir(out, s.overwrite) as tmp:
            write_json_atomic(tmp / "compare.json", report.to_dict())
            (tmp / "compare.md").write_text(report.to_markdown())
            plot_compare(report, tmp / "compare.png")
        report.out = str(out)
        if state_file is not None and state_file.exists():
            state_file.unlink()
    return report


def check_compare(s: Any) -> ModelInfo | None:

    out = Collector()
    info = model_or_problem(s.model, out, "compare on the original model.")
    n = info.num_layers if info else None
    for k in s.ks or []:
        _check_k(k, n, out, "ks", keep_one=True)  # as run_compare: whole-layer methods are compared
    check_grid(s.grid, out)
    check_windows(out, s.calib_windows, s.seq_len)
    if s.eval_tokens is not None and s.eval_tokens < s.eval_seq_len:
        out.add(f"`eval_tokens={s.eval_tokens}` is less than one window of `eval_seq_len={s.eval_seq_len}`.")
    c = check_text(s.calib, DEFAULT_CALIB, "calib", s.calib_windows, s.seq_len, out)
    e = check_text(s.eval, DEFAULT_EVAL, "eval", 1, s.eval_seq_len, out, "eval_seq_len")
    check_disjoint_sources(c, e, out)
    check_output(s.out, s.overwrite, [info.path if info else None], out)
    out.raise_if_any()
    return info
