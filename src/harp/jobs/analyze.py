"""`harp analyze`: checks before any weight loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harp.engine.text import DEFAULT_CALIB, check_text
from harp.model.source import ModelInfo, model_or_problem
from harp.util.fsio import check_output
from harp.util.problems import Collector, check_positive


def check_analyze(model: Any, text: str | None, windows: int, seq_len: int, out_path: Path,
                  overwrite: bool) -> ModelInfo | None:

    out = Collector()
    info = model_or_problem(model, out)
    check_positive(out, windows=windows)
    if seq_len < 2:
        out.add(f"`seq_len={seq_len}`: a window needs at least 2 tokens.")
    check_text(text, DEFAULT_CALIB, "text", windows, seq_len, out)
    check_output(out_path, overwrite, [info.path if info else None], out)
    out.raise_if_any()
    return info
