"""Validation first: every `harp` command checks its arguments against the model's config (a folder's
config.json, or a GGUF's metadata header), the files it names and the output it will write, before any
weight is loaded or dequantised, and reports every problem found in one message.

Nothing here reads tensor data: a GGUF is checked by parsing its header (metadata and tensor table) and
comparing the size its tensors need with the file's size; a safetensors file by its JSON header and
its length. The same checks guard `harp.load` and the loaders, so a damaged file is one clear error
naming the file, whichever way it is reached.
"""

from __future__ import annotations

import json
import math
import operator
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Problems(ValueError):
    """One or more problems with a command's arguments or inputs, found before anything was loaded."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(self._text())

    def _text(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        items = "\n".join(f"  - {p}" for p in self.problems)
        return f"{len(self.problems)} problems (nothing was loaded):\n{items}"


class Collector:
    """Gathers problems; `raise_if_any()` raises them all at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.errors: list[Exception | None] = []

    def add(self, msg: str, error: Exception | None = None) -> None:
        if msg not in self.problems:
            self.problems.append(msg)
            self.errors.append(error)

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call `fn`; a ValueError / OSError it raises becomes a problem (returns None then)."""
        try:
            return fn(*args, **kwargs)
        except Problems as e:
            for p in e.problems:
                self.add(p)
        except (ValueError, OSError) as e:
            self.add(str(e), e)
        return None

    def raise_if_any(self) -> None:
        """One problem raised as the error it was (FileNotFoundError, ...); several as one Problems."""
        if len(self.problems) == 1 and self.errors[0] is not None:
            raise self.errors[0]
        if self.problems:
            raise Problems(self.problems)


# ------------------------------------------------------------------------------------------------
# GGUF: the metadata header and the tensor table, without reading tensor data
# ------------------------------------------------------------------------------------------------

_GGUF_MAGIC = b"GGUF"
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}  # GGUF architecture name -> transformers model_type, where they differ


class _Truncated(Exception):
    pass


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]  # scalars and strings; arrays as ("array", length)
    tensors: int
    data_bytes_needed: int  # where the last tensor ends (the file must be at least this long)
    file_bytes: int

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def config(self) -> dict[str, Any]:
        """The config.json fields harp checks, from the metadata (as transformers' GGUF loader maps them)."""
        arch = self.architecture or "?"
        m = self.metadata
        cfg: dict[str, Any] = {"model_type": _GGUF_MODEL_TYPES.get(arch, arch)}
        for key, name in (("block_count", "num_hidden_layers"), ("context_length", "max_position_embeddings"),
                          ("embedding_length", "hidden_size"), ("attention.head_count", "num_attention_heads"),
                          ("attention.head_count_kv", "num_key_value_heads")):
            if f"{arch}.{key}" in m:
                cfg[name] = int(m[f"{arch}.{key}"])
        return cfg


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse a GGUF file's header. Raises ValueError naming the file and what is wrong with it."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    redo = "download it again (or convert the model again)"
    with open(path, "rb", buffering=1 << 20) as f:
        magic = f.read(4)
        if magic != _GGUF_MAGIC:
            what = "empty" if not magic else f"starts with {magic!r}, not b'GGUF'"
            raise ValueError(f"{path} is not a GGUF file ({what}): pass a .gguf model file, a model folder or "
                             "a hub id.")

        def read(n: int) -> bytes:
            b = f.read(n)
            if len(b) != n:
                raise _Truncated
            return b

        def unpack(fmt: str) -> Any:
            return struct.unpack(fmt, read(struct.calcsize(fmt)))[0]

        def string() -> str:
            n = unpack("<Q")
            if n > size:
                raise _Truncated
            return read(n).decode("utf-8", errors="replace")

        def value(vtype: int) -> Any:
            if vtype in _SCALAR:
                return unpack(_SCALAR[vtype])
            if vtype == _STRING:
                return string()
            if vtype == _ARRAY:
                itype, n = unpack("<I"), unpack("<Q")
                if n > size:
                    raise _Truncated
                if itype in _SCALAR:
                    read(n * struct.calcsize(_SCALAR[itype]))
                else:
                    for _ in range(n):
                        value(itype)
                return ("array", n)
            raise ValueError(f"{path}: unknown GGUF value type {vtype} in the header: the file is damaged; {redo}.")

        try:
            version = unpack("<I")
            if version not in (2, 3):
                raise ValueError(f"{path}: GGUF version {version} is not one harp reads (2 or 3).")
            n_tensors, n_kv = unpack("<Q"), unpack("<Q")
            if n_tensors > size or n_kv > size:
                raise ValueError(f"{path}: the GGUF header is damaged (it claims {n_tensors} tensors); {redo}.")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = string()
                meta[key] = value(unpack("<I"))
            ends = []
            for _ in range(n_tensors):
                name = string()
                dims = [unpack("<Q") for _ in range(unpack("<I"))]
                ttype, offset = unpack("<I"), unpack("<Q")
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
                except (ValueError, KeyError):
                    raise ValueError(f"{path}: tensor {name!r} has unknown type {ttype}: the file is damaged or "
                                     "from a newer GGUF writer.") from None
                ends.append((offset + math.prod(dims) // block * type_size, name))
            header_end = f.tell()
        except _Truncated:
            raise ValueError(
                f"{path} is truncated: the file ends ({size:,} bytes) inside its GGUF header, before the tensor "
                f"table is complete (an interrupted download or copy?); {redo}."
            ) from None
    align = int(meta.get("general.alignment", 32)) or 32
    data_start = (header_end + align - 1) // align * align
    end, last = max(ends) if ends else (0, "")
    needed = data_start + end
    if size < needed:
        raise ValueError(
            f"{path} is truncated: {size:,} bytes, but its {n_tensors} tensors end at byte {needed:,} (tensor "
            f"{last!r} and others are cut off; an interrupted download or copy?); {redo}."
        )
    return GGUFHeader(path, version, meta, n_tensors, needed, size)


# ------------------------------------------------------------------------------------------------
# safetensors: the JSON header and the file length
# ------------------------------------------------------------------------------------------------


def check_safetensors(path: str | os.PathLike[str]) -> int:
    """Check that a .safetensors file is complete (header parses, every tensor's bytes are there).
    Returns the number of tensors. Raises ValueError naming the file."""
    path = Path(path)
    size = path.stat().st_size
    redo = "copy or save it again (harp prune / harp.save write it whole or not at all)"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated ({size} bytes): not a complete safetensors file; {redo}.")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise ValueError(f"{path} is truncated: {size:,} bytes, but its header alone claims {n:,}; {redo}.")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} is damaged: its safetensors header is not valid JSON; {redo}.") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is damaged: its safetensors header is not a JSON object; {redo}.")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    needed = 8 + n + max(ends, default=0)
    if size < needed:
        raise ValueError(
            f"{path} is truncated: {size:,} of {needed:,} bytes ({100 * size / needed:.0f} %; an interrupted "
            f"copy or save?); {redo}."
        )
    return len(ends)


def check_weight_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The weight files of a model folder, each checked complete. Raises ValueError."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index} is damaged: not a safetensors index (no weight_map).") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ValueError(f"{folder} is incomplete: {index.name} lists {', '.join(missing)}, which are missing.")
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            return sorted(folder.glob("*.bin"))  # PyTorch pickles: transformers checks those itself
        raise ValueError(f"{folder} has a config.json but no weights (*.safetensors): an incomplete copy or save?")
    for f in files:
        check_safetensors(f)
    return files


# ------------------------------------------------------------------------------------------------
# The `harp` block of a checkpoint's config.json
# ------------------------------------------------------------------------------------------------


def check_harp_block(block: Any, num_layers: int | None, where: str = "config.json") -> tuple[list[int], list[float]]:
    """Validate a `harp` block ({format_version, layers, alphas}); return (layers, alphas). Raises
    Problems listing everything wrong with it, each naming `where`."""
    from .modeling import FORMAT_VERSION

    out = Collector()
    fix = "the checkpoint is damaged or was edited by hand: prune the original model again"
    if not isinstance(block, dict):
        raise Problems([f"{where}: the 'harp' block is {type(block).__name__}, not an object; {fix}."])
    version = block.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        out.add(f"{where}: harp format_version {version!r} is not a positive integer; {fix}.")
    elif version > FORMAT_VERSION:
        out.add(f"{where}: HARP format version {version} is newer than this harp-prune reads (up to "
                f"{FORMAT_VERSION}): upgrade harp-prune (pip install -U harp-prune).")
    layers, alphas = block.get("layers"), block.get("alphas")
    good_layers: list[int] = []
    good_alphas: list[float] = []
    if not isinstance(layers, list):
        out.add(f"{where}: harp 'layers' is {layers!r}, not a list of layer indices; {fix}.")
    else:
        for i in layers:
            try:
                if isinstance(i, bool):
                    raise TypeError
                good_layers.append(operator.index(i))
            except TypeError:
                out.add(f"{where}: harp layer index {i!r} is not an integer; {fix}.")
        if num_layers is not None:
            bad = [i for i in good_layers if not 0 <= i < num_layers]
            if bad:
                out.add(f"{where}: harp layers {bad} are out of range: the model has layers 0..{num_layers - 1}; "
                        f"{fix}.")
        dup = sorted({i for i in good_layers if good_layers.count(i) > 1})
        if dup:
            out.add(f"{where}: harp layers repeat {dup}; {fix}.")
    if not isinstance(alphas, list):
        out.add(f"{where}: harp 'alphas' is {alphas!r}, not a list of numbers; {fix}.")
    else:
        for a in alphas:
            if isinstance(a, bool) or not isinstance(a, int | float):
                out.add(f"{where}: harp alpha {a!r} is not a number; {fix}.")
            elif not math.isfinite(a):
                out.add(f"{where}: harp alpha {a} is not finite; {fix}.")
            else:
                good_alphas.append(float(a))
    if isinstance(layers, list) and isinstance(alphas, list) and len(layers) != len(alphas):
        out.add(f"{where}: harp block has {len(layers)} layers but {len(alphas)} alphas (one per layer); {fix}.")
    out.raise_if_any()
    return good_layers, good_alphas


def read_json_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config.json as a dict, with a one-line error naming the file when it is not valid JSON."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): the file is damaged.") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file: the file is damaged.") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a JSON object: not a model config.")
    return d


def check_complete(folder: str | os.PathLike[str], cfg: dict[str, Any]) -> None:
    """A model folder about to be loaded is whole: its harp block (if any) is valid, its weight files are
    complete, and a HARP checkpoint has the recipe `harp.save` writes last. Raises Problems."""
    from .checkpoint import RECIPE_FILE

    folder = Path(folder)
    out = Collector()
    n = cfg.get("num_hidden_layers")
    if cfg.get("harp"):
        out.run(check_harp_block, cfg["harp"], n if isinstance(n, int) else None, str(folder / "config.json"))
        if not (folder / RECIPE_FILE).is_file():
            out.add(f"{folder} is an incomplete HARP checkpoint: {RECIPE_FILE}, which harp.save writes last, is "
                    "missing (an interrupted save or copy?). Save or copy it again.")
    out.run(check_weight_files, folder)
    out.raise_if_any()


# ------------------------------------------------------------------------------------------------
# A --model argument, inspected without loading it
# ------------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    source: str | None
    kind: str  # default | folder | gguf | hub
    path: Path | None
    config: dict[str, Any] | None  # None: not knowable offline (a hub id)
    harp: tuple[list[int], list[float]] | None = None

    @property
    def num_layers(self) -> int | None:
        n = (self.config or {}).get("num_hidden_layers")
        return int(n) if isinstance(n, int) and not isinstance(n, bool) else None

    @property
    def max_positions(self) -> int | None:
        n = (self.config or {}).get("max_position_embeddings")
        return int(n) if isinstance(n, int) and not isinstance(n, bool) else None

    @property
    def is_pruned(self) -> bool:
        return self.harp is not None

    def hf_config(self) -> Any:
        """A transformers config object (for the KV figures), or None if it cannot be built."""
        if not self.config or self.kind == "gguf":
            return None
        try:
            from .plan import config_from_dict

            return config_from_dict(self.config)
        except Exception:  # noqa: BLE001 - only used for reporting
            return None


def inspect_model(source: str | os.PathLike[str] | None, check_weights: bool = True) -> ModelInfo:
    """What a --model argument is, its config and HARP block, with its files checked complete.
    Raises Problems / ValueError / FileNotFoundError naming the file. Reads no tensor data."""
    from .models import _DEFAULT_ALIASES, DEFAULT_MODEL
    from .plan import PRESETS

    if source is None or str(source).lower() in _DEFAULT_ALIASES:
        return ModelInfo(DEFAULT_MODEL, "default", None, dict(PRESETS["smollm2-135m"]))
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix != ".gguf" and p.name != "config.json":
            raise ValueError(f"{p} is a file but not a .gguf: pass a model folder, a .gguf file or a hub id.")
        if p.name == "config.json":
            p = p.parent
        else:
            header = read_gguf_header(p)
            return ModelInfo(str(source), "gguf", p, header.config())
    if p.is_dir():
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"{p} is a folder without config.json: it is not a transformers model folder.")
        cfg = read_json_config(cfg_file)
        problems = Collector()
        n = cfg.get("num_hidden_layers")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            problems.add(f"{cfg_file}: num_hidden_layers is {n!r}, not a positive integer: not a decoder model config.")
            n = None
        harp = None
        if cfg.get("harp"):
            harp = problems.run(check_harp_block, cfg["harp"], n, str(cfg_file))
        if check_weights:
            problems.run(check_complete, p, cfg)
        problems.raise_if_any()
        return ModelInfo(str(source), "folder", p, cfg, harp)
    s = str(source)
    if s.startswith((".", "/", "~")) or s.endswith(".gguf") or s.count("/") != 1:
        raise FileNotFoundError(
            f"Model {s!r} not found: no such file or folder, and it is not a hub id (org/name). "
            f"Use --model {DEFAULT_MODEL} for the bundled default, a local folder, or a .gguf file."
        )
    return ModelInfo(s, "hub", None, None)


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------


def check_layer_choice(
    info: ModelInfo | None, k: int | None, layer_ids: Sequence[int] | None, alphas: Sequence[float] | None,
    out: Collector, k_flag: str = "--layers",
) -> int | None:
    """k / --layer-ids / --alphas against the model's layer count. Returns how many layers are pruned."""
    n = info.num_layers if info else None
    count: int | None = None
    if layer_ids:
        count = len(layer_ids)
        if n is not None:
            bad = [i for i in layer_ids if not 0 <= i < n]
            if bad:
                out.add(f"--layer-ids {','.join(map(str, bad))}: out of range, the model has layers 0..{n - 1}.")
        dup = sorted({i for i in layer_ids if list(layer_ids).count(i) > 1})
        if dup:
            out.add(f"--layer-ids repeats {dup}: layer indices must be distinct.")
    else:
        count = _check_k(8 if k is None else k, n, out, k_flag)
    if alphas is not None:
        bad_a = [a for a in alphas if not math.isfinite(a)]
        if bad_a:
            out.add(f"--alphas {bad_a}: alphas must be finite numbers (typically 0..1).")
        if count is not None and len(alphas) != count:
            out.add(f"--alphas gives {len(alphas)} values for {count} layers (one per layer, top layer first).")
    return count


def _check_k(k: Any, n: int | None, out: Collector, flag: str, keep_one: bool = False) -> int | None:
    """`core.check_k` as a problem naming the flag; with the layer count unknown (a hub id, checked
    again once its config is loaded) only whether k is a positive whole number."""
    from .core import check_k

    try:
        if n is not None:
            return check_k(k, n, keep_one=keep_one)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k = {k!r} layers must be between 1 and the model's number of layers.")
        return k
    except ValueError as e:
        out.add(f"{flag} {k}: {e}")
        return None


def check_positive(out: Collector, **values: int | None) -> None:
    for name, v in values.items():
        if v is not None and (isinstance(v, bool) or v < 1):
            out.add(f"--{name.replace('_', '-')} {v}: must be at least 1.")


def check_windows(out: Collector, windows: int | None, seq_len: int | None, what: str = "--seq-len") -> None:
    if windows is not None and windows < 1:
        out.add(f"--calib-windows {windows}: need at least one calibration window.")
    if seq_len is not None and seq_len < 2:
        out.add(f"{what} {seq_len}: a window needs at least 2 tokens.")


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


def check_text(source: str | None, default: str, flag: str, windows: int | None, seq_len: int | None,
               out: Collector, seq_flag: str = "--seq-len") -> TextCheck:
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
            out.add(f"{flag} {p}: the folder has no text files ({', '.join(sorted(TEXT_SUFFIXES))}).")
            return TextCheck(src)
    else:
        msg = (f"{flag} {src}: text source not found: no such file or folder (give a text file, a folder of .txt "
               f"files, one of the bundled sets {', '.join(BUNDLED)}, or hf:DATASET when online).")
        out.add(msg, FileNotFoundError(msg))
        return TextCheck(src)
    unreadable = [f for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        msg = f"{flag} {unreadable[0]}: not readable (permissions)."
        out.add(msg, PermissionError(msg))
        return TextCheck(src)
    nbytes = sum(f.stat().st_size for f in files)
    compressed = any(f.suffix == ".gz" for f in files)
    if nbytes == 0 or (nbytes < 1 << 20 and not compressed and not b"".join(f.read_bytes() for f in files).strip()):
        out.add(f"{flag} {p}: the text is empty.")
    elif seq_len and seq_len > 1 and not compressed:
        need = (windows or 1) * seq_len
        if nbytes < seq_len:
            out.add(f"{flag} {p}: {nbytes:,} bytes of text, fewer than one window of {seq_len:,} tokens (a token "
                    f"is at least one byte): give more text or a smaller {seq_flag}.")
        elif nbytes < need:
            out.add(f"{flag} {p}: {nbytes:,} bytes of text, fewer than the {need:,} tokens {windows} windows of "
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
        out.add(f"--calib {calib.source} and --eval {ev.source} are the same text: the perplexity would be "
                "measured on the text the alphas were fitted to. Pass different --calib and --eval sources.")


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output(
    out_path: str | os.PathLike[str] | None, overwrite: bool, inputs: Iterable[Path | None], out: Collector,
    flag: str = "--out", is_file: bool = False,
) -> Path | None:
    """An output folder (or file) can be written: not an existing non-empty folder without --overwrite,
    its nearest existing parent writable, and not the input, inside it, or containing it."""
    if out_path is None:
        return None
    p = Path(out_path).expanduser().resolve()
    if is_file:
        if p.is_dir():
            out.add(f"{flag} {p} is a folder; give a file path.")
        elif p.exists() and not overwrite:
            msg = f"{flag} {p} exists: choose another path, or pass --overwrite to replace it."
            out.add(msg, FileExistsError(msg))
    else:
        if p.exists() and not p.is_dir():
            out.add(f"{flag} {p} exists and is not a folder: choose another --out.")
        elif p.is_dir() and any(p.iterdir()) and not overwrite:
            msg = (f"{flag} {p}: output directory already exists and is not empty: choose another path, or pass "
                   "--overwrite to replace it.")
            out.add(msg, FileExistsError(msg))
    probe = p.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        out.add(f"{flag} {p}: {probe} is a file, so no folder can be made there.")
    elif not os.access(probe, os.W_OK | os.X_OK):
        msg = f"{flag} {p}: Cannot write to {probe} (permissions): choose an output you can write to."
        out.add(msg, PermissionError(msg))
    for src in inputs:
        if src is None:
            continue
        s = Path(src).expanduser().resolve()
        if _inside(p, s) or _inside(s, p):
            where = "is the input" if p == s else ("is inside the input" if _inside(p, s) else "contains the input")
            out.add(f"{flag} {p} {where} {s}: writing it would damage the model being read. Choose an output "
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
    """A resumable search's state file next to --out: readable, of this harp, and for these layers/grid."""
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
                "the original --grid to resume it.")


def check_prune(s: Any) -> ModelInfo | None:
    """Everything `harp prune` / `harp.run_prune` can know before loading weights. Raises Problems."""
    from .models import torch_dtype
    from .pipeline import SELECTIONS, state_file_for

    out = Collector()
    info = model_or_problem(s.model, out, "prune the original model.")
    if s.select not in SELECTIONS:
        out.add(f"Unknown --select {s.select!r}: use one of {', '.join(SELECTIONS)}.")
    elif s.select != "top":
        if s.layers:
            out.add("--select chooses the layers; it cannot be combined with --layer-ids.")
        if s.alphas is not None:
            out.add("--alphas needs known layers: use it with --layer-ids or the top K, not --select.")
    count = check_layer_choice(info, s.k, s.layers, s.alphas, out)
    grid = check_grid(s.grid, out)
    check_windows(out, s.calib_windows, s.seq_len)
    if s.eval_seq_len < 2:
        out.add(f"--eval-seq-len {s.eval_seq_len}: a window needs at least 2 tokens.")
    elif s.eval_tokens < s.eval_seq_len:
        out.add(f"--eval-tokens {s.eval_tokens} is less than one window of --eval-seq-len {s.eval_seq_len}.")
    check_positive(out, batch_size=s.batch_size)
    if s.method not in ("cached", "naive"):
        out.add(f"--method {s.method!r}: use 'cached' or 'naive'.")
    from .fit import check_fit_settings

    out.run(check_fit_settings, getattr(s, "fit", "none"), getattr(s, "ridge", "auto"), getattr(s, "fit_prior", "auto"))
    out.run(torch_dtype, s.dtype)
    if s.threads is not None and s.threads < 1:
        out.add(f"--threads {s.threads}: must be at least 1.")
    from .text import DEFAULT_CALIB, DEFAULT_EVAL

    c = check_text(s.calib, DEFAULT_CALIB, "--calib", s.calib_windows, s.seq_len, out)
    e = check_text(s.eval, DEFAULT_EVAL, "--eval", 1, s.eval_seq_len, out, "--eval-seq-len")
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
        out.add(f"--eval-seq-len {eval_seq_len}: a window needs at least 2 tokens.")
    elif eval_tokens is not None and eval_tokens < eval_seq_len:
        out.add(f"--eval-tokens {eval_tokens} is less than one window of --eval-seq-len {eval_seq_len}.")
    check_text(eval_text, DEFAULT_EVAL, "--eval", 1, eval_seq_len, out, "--eval-seq-len")
    check_output(json_out, overwrite, [info.path if info else None], out, flag="--json", is_file=True)
    out.raise_if_any()
    return info


def check_export(source: Any, fmt: str, out_path: Path, overwrite: bool) -> ModelInfo | None:
    out = Collector()
    info = model_or_problem(source, out)
    if fmt == "gguf":
        if Path(out_path).suffix != ".gguf":
            out.add(f"--out {out_path} should be a file name ending in .gguf for --format gguf.")
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
        out.add(f"--seq-len {seq_len}: a window needs at least 2 tokens.")
    check_text(text, DEFAULT_CALIB, "--text", windows, seq_len, out)
    check_output(out_path, overwrite, [info.path if info else None], out)
    out.raise_if_any()
    return info


def check_compare(s: Any) -> ModelInfo | None:
    from .text import DEFAULT_CALIB, DEFAULT_EVAL

    out = Collector()
    info = model_or_problem(s.model, out, "compare on the original model.")
    n = info.num_layers if info else None
    for k in s.ks or []:
        _check_k(k, n, out, "--layers", keep_one=True)  # as run_compare: whole-layer methods are compared
    check_grid(s.grid, out)
    check_windows(out, s.calib_windows, s.seq_len)
    if s.eval_tokens is not None and s.eval_tokens < s.eval_seq_len:
        out.add(f"--eval-tokens {s.eval_tokens} is less than one window of --eval-seq-len {s.eval_seq_len}.")
    c = check_text(s.calib, DEFAULT_CALIB, "--calib", s.calib_windows, s.seq_len, out)
    e = check_text(s.eval, DEFAULT_EVAL, "--eval", 1, s.eval_seq_len, out, "--eval-seq-len")
    check_disjoint_sources(c, e, out)
    check_output(s.out, s.overwrite, [info.path if info else None], out)
    out.raise_if_any()
    return info


# ------------------------------------------------------------------------------------------------
# Ctrl-C during a search
# ------------------------------------------------------------------------------------------------


@contextmanager
def resumable(out: str | os.PathLike[str] | None, err: Any = None) -> Iterator[None]:
    """Turn Ctrl-C (KeyboardInterrupt) into one line saying how to resume, exit code 130, no traceback.
    The search state file written after every layer is left in place."""
    import sys

    try:
        yield
    except KeyboardInterrupt:
        line = "interrupted."
        if out is not None:
            from .pipeline import state_file_for

            state = state_file_for(Path(out).expanduser().resolve())
            if state.is_file():
                try:
                    done = len(json.loads(state.read_text()).get("done", []))
                except (ValueError, OSError, AttributeError):
                    done = "some"
                line = (f"interrupted: the search progress ({done} layer(s) done) is kept in {state}; rerun the "
                        "same command to resume (or delete that file to start over).")
            else:
                line = "interrupted before the first searched layer was done: nothing to resume; rerun to start."
        print(f"error: {line}", file=err or sys.stderr, flush=True)
        raise SystemExit(130) from None
