"""Downstream evaluation: WikiText-2 perplexity (harp's own, consecutive windows) and
lm-evaluation-harness tasks, fully offline by default.

Task names (`tasks`, comma-separated):

- `wikitext`: perplexity on the evaluation text (default: bundled WikiText-2-raw test, non-overlapping
  1024-token windows, the first 16k tokens) — the same measurement `harp prune` reports.
- `lambada`, `piqa`, `gsm8k`, `nq_open`: harp's shipped lm-eval task YAMLs (`harp/tasks/`), reading
  local files from the data folder (`data_dir`, `$HARP_DATA_DIR` or `./data`).
  Each is the same prompt/metric as an lm-eval hub task (LOCAL_TASKS[...].hub).
- `passkey`, `niah`: long-context retrieval generated locally at each of `contexts` (`harp.engine.longctx`;
  docs/long-context.md), scored by exact match of greedy output; reported as `passkey@4096`, ...
- `hub:NAME`, or any other lm-eval task name (`lambada_openai`, `hellaswag`, `arc_easy`, ...): the
  standard lm-eval task, which downloads its data from the Hugging Face hub (online users).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harp.engine.longctx import (
    LONGCTX_TASKS,
    PositionLosses,
    RetrievalItem,
    RetrievalScore,
    max_positions,
    parse_contexts,
    position_losses,
    retrieval_items,
    retrieval_score,
)
from harp.engine.perplexity import perplexity
from harp.engine.text import BUNDLED, DEFAULT_EVAL, bos_token, evaluation_windows, load_text, tokenize
from harp.tasks import TASKS_DIR, harp_data

PERPLEXITY_TASK = "wikitext"
LONGCTX_CONTEXT = 4096  # `contexts` when not given (the model's maximum if that is smaller)
LONGCTX_ITEMS = 50  # items per long-context task and context when no `limit` is given


@dataclass(frozen=True)
class LocalTask:
    name: str  # harp's name for it
    lm_eval_name: str  # the task name in harp/tasks/*.yaml
    data: str  # key of harp.tasks.harp_data.DATA_FILES
    metric: str  # primary metric key in lm-eval's results ("metric,filter")
    title: str
    hub: str  # the lm-eval hub task with the same prompt and metric
    max_gen_toks: int | None = None  # the YAML's own generation cap (a `max_gen_toks` never raises it)

    @property
    def generation(self) -> bool:
        return self.name in ("gsm8k", "nq_open")


LOCAL_TASKS: dict[str, LocalTask] = {
    "lambada": LocalTask("lambada", "harp_lambada_openai", "lambada_openai", "acc,none", "LAMBADA acc",
                         "lambada_openai"),
    "piqa": LocalTask("piqa", "harp_piqa", "piqa", "acc,none", "PIQA acc", "piqa"),
    "gsm8k": LocalTask("gsm8k", "harp_gsm8k", "gsm8k", "exact_match,strict-match", "GSM8K EM", "gsm8k_cot"),
    "nq_open": LocalTask("nq_open", "harp_nq_open", "nq_open", "exact_match,remove_whitespace", "NQ-open EM",
                         "nq_open", max_gen_toks=32),
}
ALIASES = {"nq": "nq_open", "lambada_local": "lambada", "ppl": PERPLEXITY_TASK, "wikitext2": PERPLEXITY_TASK}
ALIASES.update({t.lm_eval_name: t.name for t in LOCAL_TASKS.values()})


@dataclass(frozen=True)
class TaskSpec:
    name: str  # as shown in tables: wikitext, lambada, ..., or the hub task name
    kind: str  # "perplexity" | "local" | "longctx" | "hub"
    lm_eval_name: str | None = None

    @property
    def title(self) -> str:
        if self.kind == "perplexity":
            return "WikiText-2 ppl"
        if self.kind == "longctx":
            return f"{self.name} acc"
        if self.kind == "local":
            return LOCAL_TASKS[self.name].title
        return self.name


def valid_task_help() -> str:
    return (f"{PERPLEXITY_TASK} (perplexity), {', '.join(LOCAL_TASKS)} (local data), "
            f"{', '.join(LONGCTX_TASKS)} (long-context retrieval, generated), "
            "or hub:NAME / any lm-eval task name (downloads from the hub)")


def resolve_tasks(spec: str | Sequence[str] | None) -> list[TaskSpec]:
    """Parse a task list ('wikitext,lambada,piqa' or a sequence). Duplicates are dropped."""
    if spec is None:
        names: list[str] = [PERPLEXITY_TASK]
    elif isinstance(spec, str):
        names = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = [str(s).strip() for s in spec if str(s).strip()]
    if not names:
        raise ValueError(f"No tasks given. Valid tasks: {valid_task_help()}.")
    out: list[TaskSpec] = []
    for raw in names:
        if raw.startswith("hub:"):
            name = raw[4:]
            if not name:
                raise ValueError("'hub:' needs a task name, e.g. hub:lambada_openai.")
            ts = TaskSpec(raw if name in LOCAL_TASKS or name in ALIASES else name, "hub", name)
        else:
            name = ALIASES.get(raw.lower(), raw.lower())
            if name == PERPLEXITY_TASK:
                ts = TaskSpec(PERPLEXITY_TASK, "perplexity")
            elif name in LOCAL_TASKS:
                ts = TaskSpec(name, "local", LOCAL_TASKS[name].lm_eval_name)
            elif name in LONGCTX_TASKS:
                ts = TaskSpec(name, "longctx")
            else:
                if not all(c.isalnum() or c in "_-." for c in raw):
                    raise ValueError(f"Bad task name {raw!r}. Valid tasks: {valid_task_help()}.")
                ts = TaskSpec(raw, "hub", raw)
        if ts not in out:
            out.append(ts)
    return out


def parse_limit(spec: str | int | dict[str, int] | None) -> dict[str, int | None]:
    """'100' (every task), 'gsm8k=20,nq_open=50' or '100,gsm8k=20' (a default plus per-task limits).

    Returns {'*': default, task: limit, ...}; None means no limit. Limits cap lm-eval tasks' items
    (the first N of the set, as `lm_eval --limit N`) and set how many items the long-context tasks
    generate per context (50 without one); they do not apply to `wikitext`."""
    if spec is None:
        return {"*": None}
    if isinstance(spec, dict):
        out: dict[str, int | None] = {"*": None}
        out.update({ALIASES.get(k, k): int(v) for k, v in spec.items()})
        return out
    if isinstance(spec, int):
        return {"*": _positive(spec)}
    out = {"*": None}
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        key, _, val = part.rpartition("=")
        try:
            n = int(val)
        except ValueError:
            raise ValueError(f"Bad `limit={spec!r}`: use N, or TASK=N pairs, e.g. '200,gsm8k=20'.") from None
        _positive(n)
        key = key.strip()
        out[ALIASES.get(key, key) if key else "*"] = n
    return out


def _positive(n: int) -> int:
    if n < 1:
        raise ValueError(f"`limit` must be at least 1 (got {n}).")
    return n


@dataclass
class TaskScore:
    task: str
    title: str
    metric: str  # primary metric ("ppl" or an lm-eval key like "acc,none")
    value: float
    higher_is_better: bool
    stderr: float | None = None
    samples: int = 0  # items (tasks) or tokens (perplexity) evaluated
    total: int = 0  # items in the full set
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalResult:
    scores: dict[str, TaskScore]
    data_dir: str | None = None
    data_files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: float = 0.0
    retrieval: dict[str, RetrievalScore] = field(default_factory=dict)  # 'passkey@4096' -> score
    loss_by_position: PositionLosses | None = None  # of the perplexity windows, when measured

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "scores": {k: v.to_dict() for k, v in self.scores.items()},
            "data_dir": self.data_dir,
            "data_files": self.data_files,
            "seconds": self.seconds,
        }
        if self.retrieval:
            d["tasks"] = {k: {"acc": r.acc, "n": r.n, "stderr": r.stderr, "correct": r.correct, "task": r.task,
                              "context": r.context, "by_depth": r.by_depth} for k, r in self.retrieval.items()}
        if self.loss_by_position is not None:
            d["loss_by_position"] = self.loss_by_position.to_dict()
        return d


def _quiet_lm_eval(level: int = logging.ERROR) -> None:
    for name in ("lm_eval", "lm-eval", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(level)


def perplexity_windows(tokenizer: Any, eval_text: str | None = None, eval_tokens: int | None = 16384,
                       seq_len: int = 1024) -> tuple[torch.Tensor, str]:
    """Evaluation windows (the standard protocol) and a description of the text."""
    text = load_text(eval_text, DEFAULT_EVAL)
    ids = tokenize(tokenizer, text)
    return evaluation_windows(ids, seq_len, eval_tokens, bos=bos_token(tokenizer)), text.description


def perplexity_label(eval_text: str | None) -> str:
    """What a perplexity row is measured on, short: 'WikiText-2' for the bundled default, else the file,
    folder or dataset name the user gave (a row labelled 'wikitext' for a novel would be wrong)."""

    src = DEFAULT_EVAL if eval_text is None else str(eval_text)
    if src == DEFAULT_EVAL:
        return "WikiText-2"
    if src in BUNDLED or src.startswith("hf:"):
        return src
    return Path(src).expanduser().name or src


def _task_manager(specs: list[TaskSpec], data_dir: str | None) -> Any:
    from lm_eval.tasks import TaskManager


    need_hub = any(s.kind == "hub" for s in specs)
    meta = {"harp_data_dir": data_dir} if data_dir else {}
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=need_hub, metadata=meta)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str] | None = None,
    limit: str | int | dict[str, int] | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    eval_text: str | None = None,
    eval_tokens: int | None = 16384,
    eval_seq_len: int = 1024,
    eval_windows: torch.Tensor | None = None,
    max_gen_toks: int | None = None,
    num_fewshot: int | None = None,
    bootstrap_iters: int = 1000,
    contexts: str | int | Sequence[int] | None = None,
    filler: str | os.PathLike[str] | None = None,
    seed: int = 0,
    items: Mapping[str, Sequence[RetrievalItem]] | None = None,
    loss_by_position: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Evaluate `model` on `tasks` (default: WikiText-2 perplexity only). See the module docstring
    for task names. `limit` caps the items of lm-eval tasks (see `parse_limit`).

    `eval_windows` (N, S) replaces `eval_text`/`eval_tokens` for the perplexity task (so a caller
    evaluating many models tokenises the text once). Returns an EvalResult; scores keyed by task name,
    long-context ones by task and context ('passkey@4096').

    Long context (`harp.engine.longctx`): `passkey` and `niah` are generated at each of `contexts`
    (default 4096 tokens, or the model's maximum if smaller) with `limit` items (default 50), `seed`,
    and `filler` as the haystack; `items` ('passkey@4096' -> a `retrieval_items` list) gives prompts made
    once for many models, used instead of generating them. `loss_by_position` adds the perplexity
    windows' mean loss per position bucket (default: when the windows are longer than 1024 tokens).
    """
    specs = resolve_tasks(tasks)
    limits = parse_limit(limit)
    _check_limits(specs, limits)
    say = log or (lambda m: None)
    t_all = time.perf_counter()
    result = EvalResult(scores={})
    lm_specs = [s for s in specs if s.kind not in ("perplexity", "longctx")]
    long_specs = [s for s in specs if s.kind == "longctx"]
    limit_ctx = max_positions(model.config)
    ctxs: list[int] = []
    if long_specs:
        default = min(LONGCTX_CONTEXT, limit_ctx or LONGCTX_CONTEXT)
        ctxs = parse_contexts(contexts) if contexts is not None else [default]
    resolved_dir = _local_task_data(lm_specs, data_dir, result, say)

    for s in specs:
        if s.kind == "perplexity":
            _perplexity_task(model, tokenizer, s.name, eval_text, eval_tokens, eval_seq_len, eval_windows,
                             batch_size, loss_by_position, result, say)
    for s in long_specs:
        n = limits.get(s.name, limits["*"]) or LONGCTX_ITEMS
        for c in ctxs:
            given = (items or {}).get(f"{s.name}@{c}")
            _retrieval_task(model, tokenizer, s.name, c, n, seed, filler, limit_ctx, given, result, say)
    if lm_specs:
        result.scores.update(_run_lm_eval(model, tokenizer, lm_specs, limits, resolved_dir, batch_size,
                                          max_gen_toks, num_fewshot, bootstrap_iters, say))
    # keep the order the tasks were asked for
    order: list[str] = []
    for s in specs:
        order += [f"{s.name}@{c}" for c in ctxs] if s.kind == "longctx" else [s.name]
    result.scores = {k: result.scores[k] for k in order}
    result.seconds = time.perf_counter() - t_all
    return result


def _check_limits(specs: list[TaskSpec], limits: dict[str, int | None]) -> None:
    unknown_limits = set(limits) - {"*"} - {s.name for s in specs}
    if unknown_limits:
        raise ValueError(f"`limit` names task(s) {sorted(unknown_limits)} that are not in `tasks` "
                         f"({', '.join(s.name for s in specs)}).")


def _local_task_data(
    lm_specs: list[TaskSpec], data_dir: str | os.PathLike[str] | None, result: EvalResult, say: Callable[[str], None]
) -> str | None:
    """The folder the local tasks read (None without one), with each data file's checksum in `result`;
    files that differ from the official ones are warned about."""
    if not any(s.kind == "local" for s in lm_specs):
        return None
    root, how = harp_data.resolve_data_dir(data_dir)
    resolved_dir = str(root)
    result.data_dir = resolved_dir
    for s in lm_specs:
        if s.kind == "local":
            files = harp_data.checksums(LOCAL_TASKS[s.name].data, resolved_dir)
            result.data_files[s.name] = files
            for f in files:
                if not f["official"]:
                    say(f"warning: {f['path']} differs from the official file (sha256 {f['sha256'][:12]}…)")
    say(f"task data: {resolved_dir} ({how})")
    return resolved_dir


def _perplexity_task(
    model: nn.Module,
    tokenizer: Any,
    name: str,
    eval_text: str | None,
    eval_tokens: int | None,
    eval_seq_len: int,
    eval_windows: torch.Tensor | None,
    batch_size: int,
    loss_by_position: bool | None,
    result: EvalResult,
    say: Callable[[str], None],
) -> None:
    """The perplexity task's score in `result` (and, with long windows or `loss_by_position`, the loss
    by position, which gives the perplexity too)."""
    t = time.perf_counter()
    if eval_windows is None:
        windows, desc = perplexity_windows(tokenizer, eval_text, eval_tokens, eval_seq_len)
    else:
        windows, desc = eval_windows, "given windows"
    if loss_by_position or (loss_by_position is None and windows.shape[1] > 1024):
        r = result.loss_by_position = position_losses(model, windows)
        say("loss by position (nats): " + ", ".join(f"{b['bucket']} {b['nll']:.3f}" for b in r.buckets))
    else:
        r = perplexity(model, windows, batch_size=max(1, min(batch_size, 4)))
    label = perplexity_label(eval_text) if eval_windows is None else "given windows"
    result.scores[name] = TaskScore(
        task=name, title=f"{label} ppl", metric="ppl", value=r.ppl, higher_is_better=False, samples=r.tokens,
        total=r.tokens, metrics={"ppl": r.ppl, "nll": r.nll}, seconds=time.perf_counter() - t,
        source=f"{desc}, {r.windows} x {r.seq_len} tokens",
    )
    say(f"perplexity on {desc}: {r.ppl:.3f} ({r.tokens:,} tokens, {time.perf_counter() - t:.0f} s)")


def _retrieval_task(
    model: nn.Module,
    tokenizer: Any,
    name: str,
    context: int,
    n: int,
    seed: int,
    filler: str | os.PathLike[str] | None,
    limit_ctx: int | None,
    given: Sequence[RetrievalItem] | None,
    result: EvalResult,
    say: Callable[[str], None],
) -> None:
    """One long-context task at one context in `result`: on the `given` prompts, else on `n` generated ones."""
    prompts = given if given is not None else retrieval_items(name, tokenizer, context, n, seed, filler=filler,
                                                              max_context=limit_ctx)
    r2 = retrieval_score(model, tokenizer, prompts)
    result.retrieval[r2.name] = r2
    result.scores[r2.name] = TaskScore(
        task=r2.name, title=f"{name} acc @ {context} tokens", metric="acc", value=r2.acc, higher_is_better=True,
        stderr=r2.stderr, samples=r2.n, total=r2.n, metrics={"acc": r2.acc}, seconds=r2.seconds,
        source=f"given items ({name}, {context} tokens)" if given is not None
        else f"generated ({name}, {context} tokens, seed {seed})",
    )
    say(f"{r2.name}: acc {r2.acc:.3f} ± {r2.stderr:.3f} ({r2.correct} of {r2.n}, {r2.seconds:.0f} s)")


def _run_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    specs: list[TaskSpec],
    limits: dict[str, int | None],
    data_dir: str | None,
    batch_size: int,
    max_gen_toks: int | None,
    num_fewshot: int | None,
    bootstrap_iters: int,
    say: Callable[[str], None],
) -> dict[str, TaskScore]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ValueError(
            "Downstream tasks need lm-evaluation-harness: pip install 'harp-prune[eval]' (lm-eval==0.4.13)."
        ) from None
    _quiet_lm_eval()
    import lm_eval.evaluator as _ev

    tm = _task_manager(specs, data_dir)
    for s in specs:
        if s.kind == "hub" and s.lm_eval_name not in tm.all_tasks:
            raise ValueError(f"Unknown task {s.name!r}. Valid tasks: {valid_task_help()}.")
    was_training = model.training
    model.eval()
    # the model sees task prompts the way its tokenizer encodes them: BOS first where it adds one
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              add_bos_token=bos_token(tokenizer) is not None)
    out: dict[str, TaskScore] = {}
    # lm-eval attaches an environment report (it runs `pip list` and git in subprocesses, seconds per
    # call, and git complains outside a repository) to every result; harp records its own provenance.
    saved = (_ev.add_env_info, _ev.get_git_commit_hash)
    _ev.add_env_info = lambda results: None
    _ev.get_git_commit_hash = lambda: None
    try:
        for s in specs:
            n = limits.get(s.name, limits["*"])
            t = time.perf_counter()
            kwargs: dict[str, Any] = {}
            if max_gen_toks is not None:
                cap = int(max_gen_toks)
                own = LOCAL_TASKS[s.name].max_gen_toks if s.kind == "local" else None
                kwargs["gen_kwargs"] = {"max_gen_toks": min(cap, own) if own else cap}
            if num_fewshot is not None:
                kwargs["num_fewshot"] = num_fewshot
            try:
                res = lm_eval.simple_evaluate(
                    model=lm, tasks=[s.lm_eval_name], limit=n, task_manager=tm, log_samples=False,
                    bootstrap_iters=bootstrap_iters, verbosity="ERROR", **kwargs,
                )
            except FileNotFoundError:
                raise
            except Exception as e:  # a hub task offline, a broken YAML, ...
                hint = ""
                if s.kind == "hub" and os.environ.get("HF_DATASETS_OFFLINE") == "1":
                    hint = (" HF_DATASETS_OFFLINE=1 is set: hub tasks need internet. Offline, use the local "
                            f"tasks ({', '.join(LOCAL_TASKS)}).")
                raise ValueError(f"Task {s.name!r} failed: {type(e).__name__}: {e}.{hint}") from e
            out[s.name] = _score(s, res, time.perf_counter() - t)
            sc = out[s.name]
            say(f"{s.name}: {sc.metric} {sc.value:.4f} ({sc.samples} of {sc.total} items, {sc.seconds:.0f} s)")
    finally:
        _ev.add_env_info, _ev.get_git_commit_hash = saved
        if was_training:
            model.train()
    return out


def _score(s: TaskSpec, res: dict[str, Any], seconds: float) -> TaskScore:
    name = s.lm_eval_name
    r = res["results"][name]
    metrics = {k: float(v) for k, v in r.items() if "," in k and isinstance(v, (int, float))
               and "_stderr" not in k}
    stderrs = {k.replace("_stderr", ""): v for k, v in r.items() if "_stderr," in k}
    hib = res.get("higher_is_better", {}).get(name, {})
    if s.kind == "local":
        key = LOCAL_TASKS[s.name].metric
    else:  # first of the usual headline metrics the task reports
        prefs = ("acc,", "exact_match,", "acc_norm,", "f1,", "mc2,", "word_perplexity,")
        key = next((k for p in prefs for k in metrics if k.startswith(p)), next(iter(metrics), ""))
    if key not in metrics:
        raise ValueError(f"Task {s.name!r} reported no metric {key!r}; it reported {sorted(metrics)}.")
    se = stderrs.get(key)
    try:
        se = float(se) if se is not None and se != "N/A" and math.isfinite(float(se)) else None
    except (TypeError, ValueError):
        se = None
    n = res.get("n-samples", {}).get(name, {})
    return TaskScore(
        task=s.name, title=s.title if s.kind == "local" else f"{s.name} {key.split(',')[0]}",
        metric=key, value=metrics[key], higher_is_better=bool(hib.get(key.split(",")[0], True)), stderr=se,
        samples=int(n.get("effective", 0)), total=int(n.get("original", 0)), metrics=metrics, seconds=seconds,
        source="local" if s.kind == "local" else "hub",
    )
