"""`harp eval`: checks before any weight loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harp.engine.text import DEFAULT_EVAL, check_text
from harp.model.source import ModelInfo, model_or_problem
from harp.util.fsio import check_output
from harp.util.problems import Collector


def check_eval(model: Any, eval_text: str | None, eval_tokens: int | None, eval_seq_len: int,
               json_out: Path | None, overwrite: bool) -> ModelInfo | None:

    out = Collector()
    info = model_or_problem(model, out)
    if eval_seq_len < 2:
        out.add(f"`eval_seq_len={eval_seq_len}`: a window needs at least 2 tokens.")
    elif eval_tokens is not None and eval_tokens < eval_seq_len:
        out.add(f"`eval_tokens={eval_tokens}` is less than one window of `eval_seq_len={eval_seq_len}`.")
    check_text(eval_text, DEFAULT_EVAL, "eval", 1, eval_seq_len, out, "eval_seq_len")
    check_output(json_out, overwrite, [info.path if info else None], out, name="json_out", is_file=True)
    out.raise_if_any()
    return info
