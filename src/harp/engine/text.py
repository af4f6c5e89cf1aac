"""Text sources for calibration and evaluation, and how they are cut into token windows.

Sources: the bundled WikiText-2 validation (default calibration) and WikiText-2-raw test (default
evaluation) files, any plain-text file or folder, and `hf:NAME[:CONFIG[:SPLIT[:FIELD]]]` datasets
when online.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from harp.util.problems import Collector

BUNDLED = {
    "wikitext2-valid": ("wikitext2_valid.tokens.gz", "WikiText-2 v1 validation (bundled, CC BY-SA 3.0)"),
    "wikitext2-raw-test": ("wikitext2_raw_test.raw.gz", "WikiText-2-raw v1 test (bundled, CC BY-SA 3.0)"),
    "tinyshakespeare": ("tinyshakespeare.txt.gz", "Tiny Shakespeare (bundled, public domain)"),
}
DEFAULT_CALIB = "wikitext2-valid"
DEFAULT_EVAL = "wikitext2-raw-test"
TEXT_SUFFIXES = {".txt", ".raw", ".tokens", ".md", ".text"}


@dataclass(frozen=True)
class Text:
    name: str
    description: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def load_text(source: str | Path | None, default: str = DEFAULT_CALIB) -> Text:
    """Read a text source: a bundled name, a file, a folder of text files, or `hf:` dataset id."""
    src = default if source is None else str(source)
    if src in BUNDLED:
        fname, desc = BUNDLED[src]
        data = resources.files("harp").joinpath("data", fname).read_bytes()
        return Text(src, desc, gzip.decompress(data).decode("utf-8"))
    if src.startswith("hf:"):
        return _load_hf(src)
    p = Path(src).expanduser()
    if p.is_file():
        text = _read_file(p)
        desc = f"file {p}"
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"Folder {p} has no text files ({', '.join(sorted(TEXT_SUFFIXES))}).")
        text = "\n\n".join(_read_file(f) for f in files)
        desc = f"folder {p} ({len(files)} files)"
    else:
        raise FileNotFoundError(
            f"Text source {src!r} not found. Give a text file, a folder of .txt files, one of the bundled "
            f"sets ({', '.join(BUNDLED)}), or hf:DATASET[:CONFIG[:SPLIT[:FIELD]]] when online."
        )
    if not text.strip():
        raise ValueError(f"Text source {src!r} is empty.")
    return Text(src, desc, text)


def _read_file(p: Path) -> str:
    raw = p.read_bytes()
    if p.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{p} is not UTF-8 text.") from None


def _load_hf(src: str) -> Text:
    parts = src[3:].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    field = parts[3] if len(parts) > 3 and parts[3] else "text"
    try:
        import datasets
    except ImportError:
        raise ValueError("hf: text sources need the `datasets` package (pip install datasets).") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, ...
        raise ValueError(f"Could not load dataset {name!r} ({config}, {split}): {e}") from None
    if field not in ds.column_names:
        raise ValueError(f"Dataset {name} has no column {field!r}; columns: {ds.column_names}.")
    return Text(src, f"datasets {name} {config or ''} {split}".strip(), "\n\n".join(ds[field]))


def tokenize(tokenizer: Any, text: Text | str) -> torch.Tensor:
    """Token ids of the whole text as one 1-D LongTensor (no special tokens added)."""
    s = text.text if isinstance(text, Text) else text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sequence longer than model max length": we cut windows ourselves
        ids = tokenizer(s, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_token(tokenizer: Any) -> int | None:
    """The BOS id a tokenizer puts in front of every text it encodes (Llama 3, Mistral, Gemma), or None
    when it adds none (SmolLM2, Qwen). Read from the tokenizer's own behaviour, not its config flags."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tokenizer("a", add_special_tokens=True, return_attention_mask=False)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return int(bos) if ids and ids[0] == bos and (not plain or plain[0] != bos) else None


def _need(ids: torch.Tensor, n: int, seq_len: int, what: str, bos: int | None) -> tuple[int, int]:
    """(windows available, text tokens per window)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (got {seq_len}).")
    if n < 1:
        raise ValueError(f"Need at least one {what} window (got {n}).")
    per = seq_len - (bos is not None)
    available = ids.numel() // per
    if available < 1:
        raise ValueError(
            f"The {what} text has {ids.numel()} tokens, fewer than one window of {seq_len}: "
            "give more text or a smaller `seq_len`."
        )
    return available, per


def _with_bos(rows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos, dtype=rows.dtype), rows], dim=1)


def calibration_windows(
    ids: torch.Tensor, n: int, seq_len: int, seed: int = 0, *, bos: int | None = None, skip: int = 0
) -> torch.Tensor:
    """`n` distinct non-overlapping windows of `seq_len` tokens, chosen by a seeded permutation.

    With `bos` (see `bos_token`), every window starts with that token followed by `seq_len - 1` text
    tokens, as the model sees a real prompt; the BOS position itself is never a prediction target.
    `skip` passes over the first windows of the permutation: `skip=n` with the same seed gives windows
    disjoint from the default ones (held-out calibration text, e.g. to choose between pruned models)."""
    spans = calibration_spans(ids, n, seq_len, seed, bos=bos, skip=skip)
    return _with_bos(torch.stack([ids[a:b] for a, b in spans]), bos)


def calibration_spans(
    ids: torch.Tensor, n: int, seq_len: int, seed: int = 0, *, bos: int | None = None, skip: int = 0
) -> list[tuple[int, int]]:
    """The text token spans [start, end) `calibration_windows` takes with the same arguments, in order."""
    available, per = _need(ids, n, seq_len, "calibration", bos)
    if n + skip > available:
        raise ValueError(
            f"The calibration text has {ids.numel()} tokens: only {available} windows of {seq_len}, "
            f"but {n + skip} were asked for. Use fewer windows, a shorter `seq_len`, or more text."
        )
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(available, generator=g)[skip : skip + n].sort().values
    return [(i * per, (i + 1) * per) for i in pick.tolist()]


def windows_outside(
    ids: torch.Tensor, n: int, seq_len: int, taken: list[tuple[int, int]], *, bos: int | None = None,
    what: str = "held-out",
) -> torch.Tensor:
    """`n` windows of `seq_len` tokens that overlap none of the `taken` spans (e.g. the calibration windows),
    the last ones of the text first: text a fit never saw, long enough for long-context losses."""
    _, per = _need(ids, n, seq_len, what, bos)
    starts: list[int] = []
    end = ids.numel()
    for a, b in sorted(taken, reverse=True) + [(-1, -1)]:
        while len(starts) < n and end - per >= max(b, 0):  # room for a window between this span and `end`
            starts.append(end - per)
            end -= per
        end = min(end, a)
    if len(starts) < n:
        raise ValueError(
            f"The calibration text has {ids.numel()} tokens: room for only {len(starts)} {what} windows of "
            f"{seq_len} tokens beside the calibration windows, but {n} were asked for. Give a longer text, "
            "fewer or shorter windows."
        )
    return _with_bos(torch.stack([ids[s : s + per] for s in sorted(starts)]), bos)


def evaluation_windows(
    ids: torch.Tensor, seq_len: int, max_tokens: int | None = None, *, bos: int | None = None
) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start (the standard perplexity protocol),
    limited to the first `max_tokens` tokens of the windows (BOS included) if given. With `bos`, each
    window is that token followed by the next `seq_len - 1` text tokens."""
    if max_tokens is not None:
        if max_tokens < seq_len:
            ids = ids[: max(max_tokens, 0)]
        else:
            ids = ids[: (max_tokens // seq_len) * (seq_len - (bos is not None))]
    available, per = _need(ids, 1, seq_len, "evaluation", bos)
    return _with_bos(ids[: available * per].view(available, per), bos)


def overlap_fraction(calib: torch.Tensor, evaluation: torch.Tensor, n: int = 32) -> float:
    """Fraction of the evaluation windows' n-grams that also occur in the calibration windows."""
    def grams(w: torch.Tensor, step: int) -> set[int]:
        out: set[int] = set()
        for row in w.tolist():
            for i in range(0, max(len(row) - n + 1, 0), step):
                out.add(hash(tuple(row[i : i + n])))
        return out

    cal = grams(calib, 1)
    ev = grams(evaluation, n)
    return len(ev & cal) / max(len(ev), 1)


def check_disjoint(calib_text: Text, eval_text: Text, calib: torch.Tensor, evaluation: torch.Tensor) -> float:
    """Refuse identical calibration and evaluation text; warn on partial overlap. Returns the overlap."""
    if calib_text.sha256 == eval_text.sha256:
        raise ValueError(
            "Calibration and evaluation text are the same: the perplexity would be measured on the text the "
            "alphas were fitted to. Pass different `calib` and `eval` sources."
        )
    frac = overlap_fraction(calib, evaluation)
    if frac > 0.01:
        warnings.warn(
            f"{frac:.1%} of the evaluation text's 32-token spans also occur in the calibration windows: "
            "the evaluation is not independent of calibration.",
            stacklevel=2,
        )
    return frac


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
