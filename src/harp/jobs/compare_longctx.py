"""`harp compare`'s long-context columns: passkey / niah at each context (prompts generated once, so
every method answers the same ones) and the perplexity text's loss by position; their checks before
any weight loads, the report's columns and each row's extra keys. `harp.jobs.compare` runs them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from harp.engine.evaluate import LONGCTX_CONTEXT, LONGCTX_ITEMS, EvalResult, TaskSpec, parse_limit, resolve_tasks
from harp.engine.longctx import (
    RetrievalItem,
    check_context,
    load_filler,
    max_positions,
    parse_contexts,
    retrieval_items,
)
from harp.report.longctx import smooth_curve
from harp.util.problems import Collector

LONG_WINDOW = 1024  # perplexity windows longer than this are measured with their loss by position


@dataclass
class LongContext:
    """passkey / niah prompts, generated once for the comparison's tokenizer (and so the same for every
    method), keyed like their columns ('passkey@4096'); `n` items per task and context."""

    tasks: list[str]
    contexts: list[int]
    items: dict[str, list[RetrievalItem]]
    n: dict[str, int]

    @classmethod
    def make(cls, s: Any, specs: list[TaskSpec], model: nn.Module, tok: Any,
             log: Callable[[str], None]) -> LongContext | None:
        """From the settings' `context`, `filler`, `limit` and `seed`; None without long-context tasks."""
        tasks = [t.name for t in specs if t.kind == "longctx"]
        if not tasks:
            return None
        limit = max_positions(model.config)
        contexts = parse_contexts(s.context) if s.context is not None else [min(LONGCTX_CONTEXT,
                                                                                limit or LONGCTX_CONTEXT)]
        limits = parse_limit(s.limit)
        n = {t: limits.get(t, limits["*"]) or LONGCTX_ITEMS for t in tasks}
        items = {f"{t}@{c}": retrieval_items(t, tok, c, n[t], s.seed, filler=s.filler, max_context=limit)
                 for t in tasks for c in contexts}
        log(f"long context: {', '.join(tasks)} at {', '.join(map(str, contexts))} tokens, "
            f"{', '.join(f'{n[t]} {t}' for t in tasks)} items per context (seed {s.seed}), the same for every method")
        return cls(tasks, contexts, items, n)

    def eval_kwargs(self, s: Any) -> dict[str, Any]:
        """What `evaluate` needs to score these prompts."""
        return {"contexts": self.contexts, "filler": s.filler, "seed": s.seed, "items": self.items}

    def digest(self, key: str) -> str:
        """sha256 of one column's prompts (token ids and answers): the same whatever the method."""
        h = hashlib.sha256()
        for it in self.items[key]:
            h.update(json.dumps([it.ids, it.answer]).encode())
        return h.hexdigest()


def task_columns(specs: list[TaskSpec], long: LongContext | None) -> list[dict[str, Any]]:
    """The report's task columns: a long-context task becomes one column per context."""
    cols: list[dict[str, Any]] = []
    for t in specs:
        if t.kind != "longctx":
            cols.append({"name": t.name, "title": t.title, "kind": t.kind})
        elif long is not None:
            cols += [{"name": f"{t.name}@{c}", "title": f"{t.name}@{c}", "kind": t.kind, "task": t.name,
                      "context": c} for c in long.contexts]
    return cols


def row_extras(res: EvalResult) -> dict[str, Any]:
    """A row's long-context keys, only those measured: `retrieval` per column (correct, accuracy by depth)
    and `loss_by_position` (buckets, and the curve averaged over log-spaced spans as `curve_points`)."""
    out: dict[str, Any] = {}
    if res.retrieval:
        out["retrieval"] = {k: r.to_dict() for k, r in res.retrieval.items()}
    if res.loss_by_position is not None:
        lbp = res.loss_by_position
        xs, ys = smooth_curve(lbp.curve)
        out["loss_by_position"] = {**lbp.to_dict(), "curve_points": {"position": xs, "nll": ys}}
    return out


def report_info(long: LongContext | None, rows: list[dict[str, Any]], ks: list[int]) -> dict[str, Any] | None:
    """The report's `long_context`: the prompts (n and digest per column) and the position plots' names;
    None when neither was measured."""
    positions = any("loss_by_position" in r for r in rows)
    if long is None and not positions:
        return None
    info: dict[str, Any] = {}
    if long is not None:
        info.update(tasks=long.tasks, contexts=long.contexts, n=long.n,
                    items={k: {"n": len(v), "sha256": long.digest(k)} for k, v in long.items.items()})
    if positions:
        info["position_plots"] = [f"loss_by_position_k{k}.png" for k in sorted(ks)]
    return info


def check_long_context(s: Any, limit: int | None, out: Collector) -> None:
    """passkey / niah: each of `context` within the model's maximum `limit`, the `filler` readable;
    `context` and `filler` only with those tasks; a perplexity window long enough for the loss by
    position (`eval_seq_len` above 1024) within the maximum too."""
    long_tasks = [t for t in out.run(resolve_tasks, s.tasks) or [] if t.kind == "longctx"] if s.tasks else []
    context, filler = getattr(s, "context", None), getattr(s, "filler", None)
    if long_tasks:
        for c in (out.run(parse_contexts, context) or []) if context is not None else []:
            out.run(check_context, c, limit)
        if filler is not None:
            out.run(load_filler, filler)
    else:
        for name, v in (("context", context), ("filler", filler)):
            if v is not None:
                out.add(f"`{name}` applies only to the long-context tasks: add passkey or niah to `tasks`.")
    if s.eval_seq_len is not None and s.eval_seq_len > LONG_WINDOW:
        out.run(check_context, s.eval_seq_len, limit, "eval_seq_len")
