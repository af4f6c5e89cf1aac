"""`harp compare`: every method at equal KV-cache reduction on one model, one calibration set, one
evaluation protocol — a Markdown table, a JSON file and a PNG chart (drawn by `harp.report.compare`).

Rows per k: the original model, then each method's plan applied in memory (pruned, measured,
restored exactly). Columns: WikiText-2 perplexity, task scores (lm-eval), parameters removed,
KV-cache reduction (measured on a real cache after a prefill) and the method's search time.

Long context (`tasks` passkey / niah): a column per task and context ('passkey@4096': accuracy, its
standard error and n), on prompts generated once (seed `seed`) and given to every method. With
`eval_seq_len` above 1024 each row also gets the perplexity text's loss by position bucket
(`harp.engine.longctx.position_losses`), drawn per k as loss_by_position_k<k>.png, one curve per method.

A long comparison writes each finished row to a hidden state file next to `out`; rerun the same
command after an interruption and it continues with the rows still missing.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harp.engine.evaluate import PERPLEXITY_TASK, EvalResult, TaskSpec, evaluate, parse_limit, resolve_tasks
from harp.engine.longctx import parse_contexts
from harp.engine.text import (
    DEFAULT_CALIB,
    DEFAULT_EVAL,
    bos_token,
    check_disjoint_sources,
    check_text,
    tokenize,
)
from harp.jobs.compare_longctx import LongContext, check_long_context, report_info, row_extras, task_columns
from harp.jobs.preamble import (
    Windows,
    claimed,
    host_info,
    load_average,
    load_windows,
    output_dir,
    set_threads,
    state_path,
)
from harp.methods.autok import auto_k
from harp.methods.registry import METHODS, parse_methods
from harp.methods.search import check_grid
from harp.methods.selector import ORIGINAL, Plan, Selector, applied
from harp.methods.sinks import check_sink_fit
from harp.model.accounting import count_parameters, kv_bytes_after_prefill, kv_contexts, kv_savings
from harp.model.load import load_model
from harp.model.prune import check_k, refuse_pruned
from harp.model.source import DEFAULT_MODEL, ModelInfo, _check_k, model_or_problem
from harp.modeling import decoder_layers
from harp.report.compare import compare_markdown, plot_compare, plot_compare_positions
from harp.util.fsio import StateMismatch, atomic_dir, check_output, read_state, write_json_atomic
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
    context: str | int | Sequence[int] | None = None  # passkey / niah prompt lengths (default 4096 or the max)
    filler: str | None = None  # passkey / niah haystack (default: each task's own)
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
        if self.context is None:
            skip.add("context")  # a comparison without long-context tasks keeps its fingerprint and keys
        if self.filler is None:
            skip.add("filler")
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k not in skip}
        if self.context is not None:
            try:
                d["context"] = parse_contexts(self.context)  # '4k' and 4096 are the same comparison
            except ValueError:
                pass
        return d


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
    long_context: dict[str, Any] | None = None  # the retrieval prompts and position plots, when measured

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["long_context"] is None:
            del d["long_context"]  # the keys of a comparison without long-context columns stay as they were
        return d

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


def run_compare(settings: CompareSettings, log: Callable[[str], None] = print, *,
                evaluator: Evaluator = evaluate) -> CompareReport:
    """Select, prune (in memory), evaluate and tabulate every method for every k. Writes `out` if set.

    `evaluator` measures one row (`harp.engine.evaluate.evaluate` unless a test replaces it)."""
    s = settings
    t_start, load_avg = time.perf_counter(), load_average()
    check_compare(s)  # the model's config, k, grid, texts and output, before any weight is read
    set_threads(s.threads)
    out = output_dir(s.out, s.overwrite)
    with claimed(out, "harp compare"):  # a second run on this `out` refuses while this one runs
        return _compare(s, out, t_start, load_avg, log, evaluator)


def _compare(s: CompareSettings, out: Path | None, t_start: float, load_avg: float | None,
             log: Callable[[str], None], evaluator: Evaluator) -> CompareReport:
    """The stages, in order, once the settings are checked and the output is held."""
    what = _plan(s)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    model, tok = _load(s, what.ks, log)
    seconds["load"] = time.perf_counter() - t
    win = load_windows(tok, s.calib, s.eval, calib_windows=s.calib_windows, seq_len=s.seq_len, seed=s.seed,
                       eval_tokens=s.eval_tokens, eval_seq_len=s.eval_seq_len)
    seconds["data"] = win.seconds
    log(f"calibration: {win.calib_text.description}, {win.calib.shape[0]} x {win.calib.shape[1]} tokens "
        f"(seed {s.seed}); perplexity: {win.eval_text.description}, {win.eval.shape[0]} x {win.eval.shape[1]} tokens")

    table = _Table.resume(state_path(out, "compare-state.json") if out else None, _fingerprint(s, model), log)
    long = LongContext.make(s, what.specs, model, tok, log)
    rower = _RowMeasurer(s, model, tok, what.specs, win.eval, evaluator, log, long)
    if "0:original" not in table.rows:
        table.add("0:original", rower.measure(ORIGINAL, 0, table.extra))
    search_seconds, auto_info, pairs = 0.0, None, [(k, m) for k in what.ks for m in what.methods]
    if s.auto_k:
        auto_info, pairs, search_seconds = _auto_pairs(s, model, win.calib, what.methods, table, log)
    ks = sorted({k for k, _ in pairs}, reverse=True)
    fits_sinks = any(METHODS[m].sink_fit_window for m in what.methods)  # they cut longer windows of their own
    selector = Selector(model, win.calib, grid=s.grid, batch_size=s.batch_size, refine_passes=s.refine_passes,
                        progress=s.progress, log=log, seed=s.seed, bos=win.bos,
                        calib_ids=tokenize(tok, win.calib_text) if fits_sinks else None)
    search_seconds += _select_and_measure(selector, pairs, table, rower, log)
    seconds.update(search=search_seconds, eval=rower.seconds, total=time.perf_counter() - t_start)

    ordered = [table.rows["0:original"]] + [table.rows[f"{k}:{m}"] for k in ks for m in what.methods
                                            if (k, m) in pairs]
    report = CompareReport(
        settings={**s.fingerprint_fields(), "command": s.command, "threads": torch.get_num_threads(),
                  "calib_overlap": win.overlap, "grid": selector.grid},
        model=s.model or DEFAULT_MODEL, num_layers=len(decoder_layers(model)), params_before=rower.params_before,
        kv_bytes_before=rower.kv_before, tasks=task_columns(what.specs, long), rows=ordered,
        data=_data_info(s, win, table.extra, bos_token(tok)), seconds=seconds, auto_k=auto_info,
        host=host_info(machine=True, load_average=load_avg), long_context=report_info(long, ordered, ks),
    )
    if out is not None:
        _write(report, out, s.overwrite, table.state_file)
    return report


Evaluator = Callable[..., EvalResult]  # `harp.engine.evaluate.evaluate`'s signature: the seam tests replace


@dataclass
class _Plan:
    methods: list[str]
    specs: list[TaskSpec]
    ks: list[int]  # largest first; empty with `auto_k`


def _plan(s: CompareSettings) -> _Plan:
    """The methods, tasks and ks, checked."""
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
    return _Plan(methods, specs, ks)


def _load(s: CompareSettings, ks: list[int], log: Callable[[str], None]) -> tuple[nn.Module, Any]:
    model, tok = load_model(s.model, dtype=s.dtype)
    refuse_pruned(model, f"{s.model} is already HARP-pruned: compare methods on the original model.")
    num = len(decoder_layers(model))
    for k in ks:
        check_k(k, num, keep_one=True)  # whole-layer methods are among those compared
    log(f"model: {s.model or DEFAULT_MODEL} ({type(model).__name__}, {num} layers, "
        f"{count_parameters(model) / 1e6:.1f} M parameters)")
    return model, tok


class _Table:
    """The measured rows and the shared extras (auto-k results, the task data folder), saved to the
    resume state after every change."""

    def __init__(self, state_file: Path | None, fingerprint: str, rows: dict[str, dict[str, Any]],
                 extra: dict[str, Any]) -> None:
        self.state_file, self.fingerprint, self.rows, self.extra = state_file, fingerprint, rows, extra

    @classmethod
    def resume(cls, state_file: Path | None, fingerprint: str, log: Callable[[str], None]) -> _Table:
        try:
            st = read_state(state_file, STATE_VERSION, fingerprint)
        except StateMismatch:
            st = None
            log(f"ignoring {state_file}: it belongs to a different comparison")
        if st is None:
            return cls(state_file, fingerprint, {}, {})
        log(f"resuming: {len(st.get('rows', {}))} row(s) already measured ({state_file})")
        return cls(state_file, fingerprint, st.get("rows", {}), st.get("extra", {}))

    def add(self, key: str, row: dict[str, Any]) -> None:
        self.rows[key] = row
        self.save()

    def save(self) -> None:
        if self.state_file is not None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.state_file, {"version": STATE_VERSION, "fingerprint": self.fingerprint,
                                                "rows": self.rows, "extra": self.extra})


class _RowMeasurer:
    """Measures one row: the plan applied in memory, every task evaluated, the model restored."""

    def __init__(self, s: CompareSettings, model: nn.Module, tok: Any, specs: list[TaskSpec], ev: torch.Tensor,
                 evaluator: Evaluator, log: Callable[[str], None], long: LongContext | None = None) -> None:
        self.s, self.model, self.tok, self.specs, self.ev, self.evaluator, self.log = \
            s, model, tok, specs, ev, evaluator, log
        # passkey / niah: the same prompts for every row (only given when asked, so a plain comparison calls
        # the evaluator exactly as before)
        self.long_kwargs = {} if long is None else long.eval_kwargs(s)
        self.params_before = count_parameters(model)
        self.kv_before = kv_bytes_after_prefill(model)
        self.seconds = 0.0  # evaluation time so far

    def measure(self, plan: Plan, k: int, extra: dict[str, Any]) -> dict[str, Any]:
        s, model, t0 = self.s, self.model, time.perf_counter()
        self.log(f"evaluating {plan.method}" + (f" (k = {k}): {plan.describe()}" if k else ""))
        with applied(model, plan):
            res = self.evaluator(model, self.tok, [t.name for t in self.specs], s.limit, data_dir=s.data_dir,
                                 batch_size=s.eval_batch_size, eval_windows=self.ev, max_gen_toks=s.max_gen_toks,
                                 log=lambda m: self.log(f"  {m}"), **self.long_kwargs)
            params = count_parameters(model)
            kv = kv_bytes_after_prefill(model)
            # a window layer saves KV only past its window: state it at the model's maximum context
            window = {"window": plan.window, "sinks": plan.sinks, "kv_at_max": kv_savings(model.config, None, contexts=[
                kv_contexts(model.config)[-1]])[0]} if plan.kind == "window" else {}
        dt = time.perf_counter() - t0
        self.seconds += dt
        if "data_dir" not in extra and res.data_dir:
            extra["data_dir"] = res.data_dir
            extra["data_files"] = res.data_files
        before, kv_before = self.params_before, self.kv_before
        return {
            "k": k, "method": plan.method, "kind": plan.kind, "layers": plan.layers, "alphas": plan.alphas,
            "plan": plan.describe(), "calib_ppl": plan.calib_ppl, "search_seconds": plan.search_seconds,
            "scores": {n: {"title": sc.title, "metric": sc.metric, "value": sc.value, "stderr": sc.stderr,
                           "higher_is_better": sc.higher_is_better, "samples": sc.samples, "total": sc.total,
                           "seconds": sc.seconds}
                       for n, sc in res.scores.items()},
            "params": params, "params_removed": before - params,
            "params_removed_pct": 100.0 * (before - params) / before,
            "kv_bytes": kv, "kv_reduction": 1.0 - kv / kv_before if kv_before else 0.0,
            "eval_seconds": dt, "info": _compact_info(plan.info),
        } | window | row_extras(res)


def _auto_pairs(s: CompareSettings, model: nn.Module, calib: torch.Tensor, methods: list[str], table: _Table,
                log: Callable[[str], None]) -> tuple[dict[str, Any], list[tuple[int, str]], float]:
    """`auto_k`: the largest k within the perplexity budget (the refit methods get a k of their own: they
    prune more layers within the same budget). Returns the auto-k info, the (k, method) pairs, seconds."""
    assert s.max_ppl_increase is not None  # _plan checked it
    refit = [m for m in methods if METHODS[m].refit]
    seconds = 0.0
    for key, use_fit in (("auto_k", False), ("auto_k_fit", True)):
        if use_fit and not refit:
            continue
        if key not in table.extra:
            t = time.perf_counter()
            log(f"auto-k{' (refit)' if use_fit else ''}: the largest k whose calibration perplexity stays "
                f"within +{100 * s.max_ppl_increase:g} %")
            ar = auto_k(model, calib, s.max_ppl_increase, max_k=s.max_k, grid=s.grid, batch_size=s.batch_size,
                        progress=s.progress, fit=use_fit)
            table.extra[key] = ar.to_dict()
            table.save()
            seconds += time.perf_counter() - t
        info = table.extra[key]
        log(f"auto-k{' (refit)' if use_fit else ''} chose k = {info['k']} (calibration ppl "
            f"{info['base_ppl']:.3f}, budget {info['budget_ppl']:.3f})")
    auto_info = table.extra["auto_k"]
    if "auto_k_fit" in table.extra:
        auto_info = {**auto_info, "refit": table.extra["auto_k_fit"]}
    k_of = {m: int(table.extra["auto_k_fit" if m in refit else "auto_k"]["k"]) for m in methods}
    if min(k_of.values()) < 1:
        raise ValueError(
            f"No k fits the budget for {', '.join(m for m, k in k_of.items() if k < 1)}: pruning even the top "
            f"layer raises calibration perplexity above {auto_info['budget_ppl']:.3f} "
            f"(+{100 * s.max_ppl_increase:g} %). Allow a larger `max_ppl_increase`."
        )
    return auto_info, [(k_of[m], m) for m in methods], seconds


def _select_and_measure(selector: Selector, pairs: list[tuple[int, str]], table: _Table, rower: _RowMeasurer,
                        log: Callable[[str], None]) -> float:
    """Every row still missing, largest k first (greedy prefixes are reused). Returns the selection seconds."""
    seconds = 0.0
    for k, m in sorted(pairs, key=lambda p: -p[0]):
        key = f"{k}:{m}"
        if key in table.rows:
            continue
        t = time.perf_counter()
        log(f"selecting {m} (k = {k}) — {METHODS[m].summary}")
        plan = selector.select(m, k)
        seconds += time.perf_counter() - t
        table.add(key, rower.measure(plan, k, table.extra))
    return seconds


def _data_info(s: CompareSettings, win: Windows, extra: dict[str, Any], bos: int | None) -> dict[str, Any]:
    return {"calibration": win.calib_text.description, "calib_windows": int(win.calib.shape[0]), "bos_token": bos,
            "calib_seq_len": int(win.calib.shape[1]), "evaluation": win.eval_text.description,
            "eval_windows": int(win.eval.shape[0]), "eval_seq_len": int(win.eval.shape[1]), "limit": s.limit,
            "data_dir": extra.get("data_dir"), "data_files": extra.get("data_files", {})}


def _write(report: CompareReport, out: Path, overwrite: bool, state_file: Path | None) -> None:
    """compare.json / .md / .png, atomically; then the resume state goes."""
    with atomic_dir(out, overwrite) as tmp:
        write_json_atomic(tmp / "compare.json", report.to_dict())
        (tmp / "compare.md").write_text(report.to_markdown())
        plot_compare(report, tmp / "compare.png")
        if report.long_context and report.long_context.get("position_plots"):
            plot_compare_positions(report, tmp)
    report.out = str(out)
    if state_file is not None and state_file.exists():
        state_file.unlink()


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
    check_long_context(s, info.max_positions if info else None, out)
    _check_sink_fits(s, info, out)
    check_output(s.out, s.overwrite, [info.path if info else None], out)
    out.raise_if_any()
    return info


def _check_sink_fits(s: Any, info: ModelInfo | None, out: Collector) -> None:
    """Fitted-sink methods fit on calibration windows of 2 x their window (at least 1,024, within the model's
    context) past window + SINK_TOKENS: the context must leave room and the calibration text hold them."""
    try:
        methods = parse_methods(s.methods)
    except ValueError:
        return  # an unknown name is reported where the methods are parsed
    for m in methods:
        if w := METHODS[m].sink_fit_window:
            check_sink_fit(w, info.max_positions if info is not None else None, s.calib, out,
                           what=f"`methods`: {m}", fix="drop it (or compare a smaller window)")
