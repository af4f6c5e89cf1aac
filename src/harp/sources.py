"""What a model source is (the bundled default, a folder, a .gguf, a hub id) and whether its files are
whole, without reading tensor data: a GGUF is checked by parsing its header (metadata and tensor
table) and comparing the size its tensors need with the file's size; a safetensors file by its JSON
header and its length; a checkpoint's `harp` block field by field. The loaders (`harp.load`,
`models.load_model`) and the commands' preflight both use these checks, so a damaged file is one clear
error naming the file, whichever way it is reached.
"""

from __future__ import annotations

import json
import math
import operator
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
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
# A `model` argument, inspected without loading it
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
    """What a `model` argument is, its config and HARP block, with its files checked complete.
    Raises Problems / ValueError / FileNotFoundError naming the file. Reads no tensor data."""
    from .models import DEFAULT_MODEL, hub_id, is_default_model
    from .plan import PRESETS

    if is_default_model(source):
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
    return ModelInfo(hub_id(source), "hub", None, None)
