"""Validation first: every `harp` command checks its arguments against the model's config (a folder's
config.json, or a GGUF's metadata header, read by `harp.sources`), the files it names and the output it
will write, before any weight is loaded or dequantised, and reports every problem found in one message.
`harp.run_prune` runs `check_prune` itself, so library users get the same checks.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sources import Collector, ModelInfo, Problems, inspect_model

__all__ = ["Collector", "ModelInfo", "Problems", "check_analyze", "check_compare", "check_eval", "check_export",
           "check_prune", "inspect_model"]


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------


def check_layer_choice(
    info: ModelInfo | None, k: int | None, layer_ids: Sequence[int] | None, alphas: Sequence[float] | None,
    out: Collector, k_name: str = "k",
) -> int | None:
    """k / `layers` / `alphas` against the model's layer count. Returns how many layers are pruned."""
    n = info.num_layers if info else None
    count: int | None = None
    if layer_ids:
        count = len(layer_ids)
        if n is not None:
            bad = [i for i in layer_ids if not 0 <= i < n]
            if bad:
                out.add(f"`layers={','.join(map(str, bad))}`: out of range, the model has layers 0..{n - 1}.")
        dup = sorted({i for i in layer_ids if list(layer_ids).count(i) > 1})
        if dup:
            out.add(f"`layers` repeats {dup}: layer indices must be distinct.")
    else:
        count = _check_k(8 if k is None else k, n, out, k_name)
    if alphas is not None:
        bad_a = [a for a in alphas if not math.isfinite(a)]
        if bad_a:
            out.add(f"`alphas={bad_a}`: alphas must be finite numbers (typically 0..1).")
        if count is not None and len(alphas) != count:
            out.add(f"`alphas` gives {len(alphas)} values for {count} layers (one per layer, top layer first).")
    return count


def _check_k(k: Any, n: int | None, out: Collector, name: str = "k", keep_one: bool = False) -> int | None:
    """`core.check_k` as a problem naming the parameter `name` (`harp.commands` shows its flag). With the
    layer count unknown (a hub id, checked again once its config is loaded) the same check without an upper
    bound: only whether k is a positive whole number."""
    from .core import check_k

    try:
        return check_k(k, sys.maxsize if n is None else n, keep_one=keep_one and n is not None, name=name)
    except ValueError as e:
        out.add(str(e) if n is not None else f"`{name}={k!r}`: must be between 1 and the model's number of layers.")
        return None


def check_positive(out: Collector, **values: int | None) -> None:
    for name, v in values.items():
        if v is not None and (isinstance(v, bool) or v < 1):
            out.add(f"`{name}={v}`: must be at least 1.")


def check_windows(out: Collector, windows: int | None, seq_len: int | None, what: str = "seq_len") -> None:
    if windows is not None and windows < 1:
        out.add(f"`calib_windows={windows}`: need at least one calibration window.")
    if seq_len is not None and seq_len < 2:
        out.add(f"`{what}={seq_len}`: a window needs at least 2 tokens.")


def check_grid(spec: Any, out: Collector) -> list[float] | None:
    from .search import parse_grid

    return out.run(parse_grid, spec)


# ------------------------------------------------------------------------------------------------
# Text sources
# ------------------------------------------------------------------------------------------------


@dataclass
class TextCheck:
    source: str
    identity: str | None = None  # bundled name, resolved path, or None (hf: / unreadable)
    nbytes: int | None = None
    files: list[Path] = field(default_factory=list)


def check_text(source: str | None, default: str, name: str, windows: int | None, seq_len: int | None,
               out: Collector, seq_name: str = "seq_len") -> TextCheck:
    """A text source exists, and has enough bytes for `windows` x `seq_len` tokens (a token covers at least
    one byte of UTF-8 text, so fewer bytes than tokens is too short for certain). Does not tokenize."""
    from .text import BUNDLED, TEXT_SUFFIXES

    src = default if source is None else str(source)
    if src in BUNDLED or src.startswith("hf:"):
        return TextCheck(src, src)
    p = Path(src).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            out.add(f"`{name}={p}`: the folder has no text files ({', '.join(sorted(TEXT_SUFFIXES))}).")
            return TextCheck(src)
    else:
        msg = (f"`{name}={src}`: text source not found: no such file or folder (give a text file, a folder of .txt "
               f"files, one of the bundled sets {', '.join(BUNDLED)}, or hf:DATASET when online).")
        out.add(msg, FileNotFoundError(msg))
        return TextCheck(src)
    unreadable = [f for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        msg = f"`{name}={unreadable[0]}`: not readable (permissions)."
        out.add(msg, PermissionError(msg))
        return TextCheck(src)
    nbytes = sum(f.stat().st_size for f in files)
    compressed = any(f.suffix == ".gz" for f in files)
    if nbytes == 0 or (nbytes < 1 << 20 and not compressed and not b"".join(f.read_bytes() for f in files).strip()):
        out.add(f"`{name}={p}`: the text is empty.")
    elif seq_len and seq_len > 1 and not compressed:
        need = (windows or 1) * seq_len
        if nbytes < seq_len:
            out.add(f"`{name}={p}`: {nbytes:,} bytes of text, fewer than one window of {seq_len:,} tokens (a token "
                    f"is at least one byte): give more text or a smaller `{seq_name}`.")
        elif nbytes < need:
            out.add(f"`{name}={p}`: {nbytes:,} bytes of text, fewer than the {need:,} tokens {windows} windows of "
                    f"{seq_len:,} need (a token is at least one byte): give more text, fewer windows or shorter ones.")
    return TextCheck(src, str(p.resolve()), nbytes, files)


def _text_digest(t: TextCheck) -> str | None:
    import hashlib

    if not t.files:
        return t.identity
    h = hashlib.sha256()
    for f in t.files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def check_disjoint_sources(calib: TextCheck, ev: TextCheck, out: Collector) -> None:
    """Calibration and evaluation must not be the same text (same source, or files with the same bytes)."""
    if calib.identity is None or ev.identity is None:
        return
    same = calib.identity == ev.identity
    if not same and calib.files and ev.files and calib.nbytes == ev.nbytes:
        same = _text_digest(calib) == _text_digest(ev)
    if same:
        out.add(f"`calib={calib.source}` and `eval={ev.source}` are the same text: the perplexity would be "
                "measured on the text the alphas were fitted to. Pass different `calib` and `eval` sources.")


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output(
    out_path: str | os.PathLike[str] | None, overwrite: bool, inputs: Iterable[Path | None], out: Collector,
    name: str = "out", is_file: bool = False,
) -> Path | None:
    """An output folder (or file) `name` can be written: not an existing non-empty folder without `overwrite`,
    its nearest existing parent writable, and not the input, inside it, or containing it."""
    if out_path is None:
        return None
    p = Path(out_path).expanduser().resolve()
    if is_file:
        if p.is_dir():
            out.add(f"`{name}={p}` is a folder; give a file path.")
        elif p.exists() and not overwrite:
            msg = f"`{name}={p}` exists: choose another path, or pass `overwrite=True` to replace it."
            out.add(msg, FileExistsError(msg))
    else:
        if p.exists() and not p.is_dir():
            out.add(f"`{name}={p}` exists and is not a folder: choose another `{name}`.")
        elif p.is_dir() and any(p.iterdir()) and not overwrite:
            msg = (f"`{name}={p}`: output directory already exists and is not empty: choose another path, or pass "
                   "`overwrite=True` to replace it.")
            out.add(msg, FileExistsError(msg))
    probe = p.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        out.add(f"`{name}={p}`: {probe} is a file, so no folder can be made there.")
    elif not os.access(probe, os.W_OK | os.X_OK):
        msg = f"`{name}={p}`: Cannot write to {probe} (permissions): choose an output you can write to."
        out.add(msg, PermissionError(msg))
    for src in inputs:
        if src is None:
            continue
        s = Path(src).expanduser().resolve()
        if _inside(p, s) or _inside(s, p):
            where = "is the input" if p == s else ("is inside the input" if _inside(p, s) else "contains the input")
            out.add(f"`{name}={p}` {where} {s}: writing it would damage the model being read. Choose an output "
                    "outside the input.")
    return p


# ------------------------------------------------------------------------------------------------
# Per-command checks
# ------------------------------------------------------------------------------------------------


def model_or_problem(source: Any, out: Collector, refuse_pruned: str | None = None) -> ModelInfo | None:
    info = out.run(inspect_model, source)
    if info is not None and refuse_pruned and info.is_pruned:
        out.add(f"{info.path} is already a HARP-pruned checkpoint (layers {sorted(info.harp[0])}); {refuse_pruned}")
    return info


def check_search_state(state: Path, order: list[int] | None, grid: list[float] | None, out: Collector) -> None:
    """A resumable search's state file next to `out`: readable, of this harp, and for these layers/grid."""
    from .search import STATE_VERSION

    if not state.exists():
        return
    way_out = f"delete {state} to start the search over"
    try:
        d = json.loads(state.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        out.add(f"{state} (the saved progress of an interrupted search) is damaged: not valid JSON; {way_out}.")
        return
    if not isinstance(d, dict) or d.get("version") != STATE_VERSION or not isinstance(d.get("done"), list):
        version = d.get("version") if isinstance(d, dict) else "?"
        out.add(f"{state} is not a search state this harp wrote (version {version}, this harp writes "
                f"{STATE_VERSION}); {way_out}.")
        return
    if order is not None and d.get("order") is not None and list(d["order"]) != list(order):
        out.add(f"{state} holds the progress of a different search (layers {d['order']}, this run searches {order}); "
                f"{way_out}, or rerun with the original arguments to resume it.")
    elif grid is not None and d.get("grid") is not None and [float(x) for x in d["grid"]] != list(grid):
        out.add(f"{state} holds the progress of a search over another grid ({d['grid']}); {way_out}, or rerun with "
                "the original `grid` to resume it.")


def check_prune(s: Any) -> ModelInfo | None:
    """Everything `harp prune` / `harp.run_prune` can know before loading weights. Raises Problems."""
    from .models import torch_dtype
    from .pipeline import SELECTIONS, state_file_for

    out = Collector()
    info = model_or_problem(s.model, out, "prune the original model.")
    if s.select not in SELECTIONS:
        out.add(f"Unknown `select={s.select!r}`: use one of {', '.join(SELECTIONS)}.")
    elif s.select != "top":
        if s.layers:
            out.add("`select` chooses the layers; it cannot be combined with `layers`.")
        if s.alphas is not None:
            out.add("`alphas` needs known layers: use it with `layers` or the top K, not `select`.")
        if s.streamed:
            out.add(f"`select={s.select}` scores every layer and needs the whole model resident; drop `streamed`.")
    from .streaming import ACTIVATIONS, resolve_device

    if s.activations not in ACTIVATIONS:
        out.add(f"Unknown activations place {s.activations!r}: use one of {', '.join(ACTIVATIONS)}.")
    elif s.activations != "device" and not s.streamed:
        out.add("`activations` applies to the streamed search; add `streamed` (or drop `activations`).")
    if s.device != "auto":
        out.run(resolve_device, s.device)
    if s.streamed and s.method != "cached":
        out.add("`streamed` runs the cached search; `method=naive` needs the whole model resident.")
    count = check_layer_choice(info, s.k, s.layers, s.alphas, out)
    grid = check_grid(s.grid, out)
    check_windows(out, s.calib_windows, s.seq_len)
    if s.eval_seq_len < 2:
        out.add(f"`eval_seq_len={s.eval_seq_len}`: a window needs at least 2 tokens.")
    elif s.eval_tokens < s.eval_seq_len:
        out.add(f"`eval_tokens={s.eval_tokens}` is less than one window of `eval_seq_len={s.eval_seq_len}`.")
    check_positive(out, batch_size=s.batch_size)
    if s.method not in ("cached", "naive"):
        out.add(f"`method={s.method!r}`: use 'cached' or 'naive'.")
    from .fit import check_fit_settings

    out.run(check_fit_settings, getattr(s, "fit", "none"), getattr(s, "ridge", "auto"), getattr(s, "fit_prior", "auto"))
    out.run(torch_dtype, s.dtype)
    if s.threads is not None and s.threads < 1:
        out.add(f"`threads={s.threads}`: must be at least 1.")
    from .text import DEFAULT_CALIB, DEFAULT_EVAL

    c = check_text(s.calib, DEFAULT_CALIB, "calib", s.calib_windows, s.seq_len, out)
    e = check_text(s.eval, DEFAULT_EVAL, "eval", 1, s.eval_seq_len, out, "eval_seq_len")
    check_disjoint_sources(c, e, out)
    outp = check_output(s.out, s.overwrite, [info.path if info else None], out)
    if outp is not None and info is not None and info.num_layers and count and s.select == "top" and s.alphas is None:
        from .search import top_layers

        order = sorted(set(s.layers), reverse=True) if s.layers else top_layers(info.num_layers, count)
        check_search_state(state_file_for(outp), order, grid, out)
    out.raise_if_any()
    return info


def check_eval(model: Any, eval_text: str | None, eval_tokens: int | None, eval_seq_len: int,
               json_out: Path | None, overwrite: bool) -> ModelInfo | None:
    from .text import DEFAULT_EVAL

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


def check_export(source: Any, fmt: str, out_path: Path, overwrite: bool) -> ModelInfo | None:
    out = Collector()
    info = model_or_problem(source, out)
    if fmt == "gguf":
        if Path(out_path).suffix != ".gguf":
            out.add(f"`out={out_path}` should be a file name ending in .gguf for `fmt=gguf`.")
        check_output(out_path, overwrite, [info.path if info else None], out, is_file=True)
    else:
        check_output(out_path, overwrite, [info.path if info else None], out)
    out.raise_if_any()
    return info


def check_analyze(model: Any, text: str | None, windows: int, seq_len: int, out_path: Path,
                  overwrite: bool) -> ModelInfo | None:
    from .text import DEFAULT_CALIB

    out = Collector()
    info = model_or_problem(model, out)
    check_positive(out, windows=windows)
    if seq_len < 2:
        out.add(f"`seq_len={seq_len}`: a window needs at least 2 tokens.")
    check_text(text, DEFAULT_CALIB, "text", windows, seq_len, out)
    check_output(out_path, overwrite, [info.path if info else None], out)
    out.raise_if_any()
    return info


def check_compare(s: Any) -> ModelInfo | None:
    from .text import DEFAULT_CALIB, DEFAULT_EVAL

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
