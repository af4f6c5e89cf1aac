"""One module per `harp` sub-command, each a plain function; `harp.cli.commands()` lists and registers them.

This package (with `harp.cli`) is the only place that names command-line flags. The library names its
Python parameters instead, in backticks: `seq_len=1`, `overwrite`, `max_ppl_increase`. `cli_text`
turns those into this command line's flags (--seq-len 1, --overwrite, --max-ppl-increase), and
`flag_errors`, which `harp.cli` wraps around every command, applies it to a library error's message
before the error becomes one `error:` line, and to the warnings the command prints.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Library parameter -> flag, where the flag is not the parameter with dashes ("seq_len" -> "--seq-len").
FLAGS = {
    "k": "--layers", "ks": "--layers", "layers": "--layer-ids", "fmt": "--format", "json_out": "--json",
    "contexts": "--context", "plot_out": "--plot",
}
# The parameters whose flag is the rule's. A backticked name in neither table is left as it is.
PARAMS = {
    "activations", "alphas", "auto_k", "batch_size", "calib", "calib_windows", "context", "data_dir", "device",
    "eval", "eval_seq_len", "eval_tokens", "filler", "fit", "grid", "kind", "kv_saving", "limit", "max_k",
    "max_ppl_increase", "method",
    "model", "out", "overwrite", "plot", "recall_windows", "select", "seq_len", "sinks", "streamed", "tasks", "text",
    "threads", "tokenizer_gguf", "window", "windows",
}

_PARAM = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")


def params_row(removed: int, pct: float) -> tuple[str, str]:
    """The summary row of the parameter change: removed, or added (fitted sinks add a few, a window removes none)."""
    if removed < 0:
        return "parameters added", f"{-removed:,} (+{-pct:.3f} %)"
    return "parameters removed", f"{removed:,} ({pct:.2f} %)"


def flag(name: str) -> str | None:
    """The flag of library parameter `name`, or None if the command line has none."""
    if name in FLAGS:
        return FLAGS[name]
    return "--" + name.replace("_", "-") if name in PARAMS else None


def cli_text(message: str) -> str:
    """A library message with its backticked parameters as flags: `seq_len=1` -> --seq-len 1,
    `overwrite=True` or `overwrite` -> --overwrite, `plot=False` -> --no-plot."""

    def one(m: re.Match[str]) -> str:
        f = flag(m.group(1))
        if f is None:
            return m.group(0)
        value = m.group(2)
        if value == "False":
            return "--no-" + f.removeprefix("--")
        return f if value is None or value == "True" else f"{f} {value}"

    return _PARAM.sub(one, message)


@contextmanager
def flag_errors() -> Iterator[None]:
    """Re-raise a library error (ValueError, OSError, ...) with its message in terms of flags, and print
    library warnings in the same terms."""
    show = warnings.showwarning

    def shown(message: Warning | str, category: type[Warning], filename: str, lineno: int,
              file: object = None, line: str | None = None) -> None:
        show(cli_text(str(message)), category, filename, lineno, file, line)  # type: ignore[arg-type]

    warnings.showwarning = shown
    try:
        yield
    except (ValueError, OSError) as e:
        if len(e.args) == 1 and isinstance(e.args[0], str):
            e.args = (cli_text(e.args[0]),)
        raise
    finally:
        warnings.showwarning = show
