"""`harp analyze`: per-layer evidence for which layers to prune (Sim(H), attention diagonality, the
Attention Drop and Block Influence scores), written as analyze.json / .md / .png."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harp.engine.text import DEFAULT_CALIB, bos_token, calibration_windows, check_text, load_text, tokenize
from harp.jobs.preamble import set_threads
from harp.methods.analyze import AnalyzeResult, analyze
from harp.model.load import load_model
from harp.model.source import ModelInfo, model_or_problem
from harp.report.analyze import analyze_markdown, plot_analyze
from harp.util.fsio import atomic_dir, check_output, write_json_atomic
from harp.util.problems import Collector, check_positive


@dataclass
class AnalyzeSettings:
    model: str | None = None
    text: str | None = None  # default: the bundled 'wikitext2-valid'
    windows: int = 8
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 2
    highlight_top: int | None = None  # shade the top K layers in the plot
    out: str | Path | None = None  # default: runs/analyze-<model name>
    overwrite: bool = False
    threads: int | None = None


def model_name(model: str | None) -> str:
    """A short name for a model argument: the folder or .gguf file's name, the default model's name."""
    if model is None:
        return "smollm2-135m"
    p = Path(model)
    return (p.stem if p.suffix == ".gguf" else p.name) or "model"


def default_out(model: str | None) -> Path:
    return Path("runs") / f"analyze-{model_name(model)}"


def run_analyze(s: AnalyzeSettings, log: Callable[[str], None] = print) -> tuple[AnalyzeResult, Path]:
    """Analyse the model on calibration windows and write analyze.json / .md / .png to `out`.
    Returns the result and the folder written."""
    set_threads(s.threads)
    name = model_name(s.model)
    out = Path(s.out) if s.out is not None else default_out(s.model)
    check_analyze(s.model, s.text, s.windows, s.seq_len, out, s.overwrite)  # every argument, before the model loads
    model, tok = load_model(s.model, attn_implementation="eager")
    src = load_text(s.text, DEFAULT_CALIB)
    w = calibration_windows(tokenize(tok, src), s.windows, s.seq_len, s.seed, bos=bos_token(tok))
    log(f"analysing {name} on {w.shape[0]} x {w.shape[1]} tokens of {src.description}")
    res = analyze(model, w, batch_size=s.batch_size, name=name, text=src.description)
    with atomic_dir(out, s.overwrite) as tmp:
        write_json_atomic(tmp / "analyze.json", res.to_dict())
        (tmp / "analyze.md").write_text(analyze_markdown(res))
        plot_analyze(res, tmp / "analyze.png", highlight_top=s.highlight_top)
    return res, out


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
