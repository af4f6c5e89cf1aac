"""`harp eval`: checks before any weight loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harp.engine.evaluate import LONGCTX_CONTEXT, resolve_tasks
from harp.engine.longctx import check_context, load_filler, parse_contexts
from harp.engine.text import DEFAULT_EVAL, check_text
from harp.model.source import ModelInfo, model_or_problem
from harp.util.fsio import check_output
from harp.util.problems import Collector


def check_eval(model: Any, eval_text: str | None, eval_tokens: int | None, eval_seq_len: int,
               json_out: Path | None, overwrite: bool, *, tasks: Any = None, contexts: Any = None,
               filler: str | None = None, plot_out: Path | None = None) -> ModelInfo | None:
    """Every argument of `harp eval` against the model's config, texts and outputs; reports all problems
    at once. Long-context tasks: each of `contexts` within the model's maximum, the `filler` readable."""
    out = Collector()
    info = model_or_problem(model, out)
    specs = out.run(resolve_tasks, tasks) if tasks is not None else None
    if specs and any(s.kind == "longctx" for s in specs):
        limit = info.max_positions if info else None
        ctxs = out.run(parse_contexts, contexts) if contexts is not None else [min(LONGCTX_CONTEXT, limit or 1 << 30)]
        for c in ctxs or []:
            out.run(check_context, c, limit)
        if filler is not None:
            out.run(load_filler, filler)
    if eval_seq_len < 2:
        out.add(f"`eval_seq_len={eval_seq_len}`: a window needs at least 2 tokens.")
    elif eval_tokens is not None and eval_tokens < eval_seq_len:
        out.add(f"`eval_tokens={eval_tokens}` is less than one window of `eval_seq_len={eval_seq_len}`.")
    check_text(eval_text, DEFAULT_EVAL, "eval", 1, eval_seq_len, out, "eval_seq_len")
    check_output(json_out, overwrite, [info.path if info else None], out, name="json_out", is_file=True)
    check_output(plot_out, overwrite, [info.path if info else None], out, name="plot_out", is_file=True)
    out.raise_if_any()
    return info
