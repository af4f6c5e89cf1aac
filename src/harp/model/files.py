"""A model's files read without loading tensors: GGUF header, safetensors headers, config.json."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

_STRING, _ARRAY = 8, 9
_GGUF_MAGIC = b"GGUF"


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


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


_REDO = "download it again (or convert the model again)"


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse a GGUF file's header. Raises ValueError naming the file and what is wrong with it."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb", buffering=1 << 20) as f:
        _check_magic(path, f.read(4))
        r = _HeaderReader(f, path, size)
        try:
            version, n_tensors, n_kv = r.counts()
            meta = {r.string(): r.value(r.unpack("<I")) for _ in range(n_kv)}
            ends = [r.tensor_end() for _ in range(n_tensors)]
            header_end = f.tell()
        except _Truncated:
            raise ValueError(
                f"{path} is truncated: the file ends ({size:,} bytes) inside its GGUF header, before the tensor "
                f"table is complete (an interrupted download or copy?); {_REDO}."
            ) from None
    needed = _check_data_complete(path, size, meta, header_end, ends)
    return GGUFHeader(path, version, meta, n_tensors, needed, size)


def _check_magic(path: Path, magic: bytes) -> None:
    if magic != _GGUF_MAGIC:
        what = "empty" if not magic else f"starts with {magic!r}, not b'GGUF'"
        raise ValueError(f"{path} is not a GGUF file ({what}): pass a .gguf model file, a model folder or "
                         "a hub id.")


class _HeaderReader:
    """The header's fields, read in order from an open GGUF file; `_Truncated` where the file ends early."""

    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise _Truncated
        return b

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > self.size:
            raise _Truncated
        return self.read(n).decode("utf-8", errors="replace")

    def counts(self) -> tuple[int, int, int]:
        """(version, tensors, metadata keys), refused if the version is not 2 or 3 or the counts are absurd."""
        version = self.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {version} is not one harp reads (2 or 3).")
        n_tensors, n_kv = self.unpack("<Q"), self.unpack("<Q")
        if n_tensors > self.size or n_kv > self.size:
            raise ValueError(f"{self.path}: the GGUF header is damaged (it claims {n_tensors} tensors); {_REDO}.")
        return version, n_tensors, n_kv

    def value(self, vtype: int) -> Any:
        """A metadata value: scalars and strings as they are, an array (skipped) as ("array", length)."""
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.unpack("<I"), self.unpack("<Q")
            if n > self.size:
                raise _Truncated
            if itype in _SCALAR:
                self.read(n * struct.calcsize(_SCALAR[itype]))
            else:
                for _ in range(n):
                    self.value(itype)
            return ("array", n)
        raise ValueError(f"{self.path}: unknown GGUF value type {vtype} in the header: the file is damaged; {_REDO}.")

    def tensor_end(self) -> tuple[int, str]:
        """One tensor table entry: (where its data ends, relative to the data section, its name)."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        name = self.string()
        dims = [self.unpack("<Q") for _ in range(self.unpack("<I"))]
        ttype, offset = self.unpack("<I"), self.unpack("<Q")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise ValueError(f"{self.path}: tensor {name!r} has unknown type {ttype}: the file is damaged or "
                             "from a newer GGUF writer.") from None
        return offset + math.prod(dims) // block * type_size, name


def _check_data_complete(
    path: Path, size: int, meta: dict[str, Any], header_end: int, ends: list[tuple[int, str]]
) -> int:
    """Where the last tensor's data ends; ValueError if the file is shorter than that."""
    align = int(meta.get("general.alignment", 32)) or 32
    data_start = (header_end + align - 1) // align * align
    end, last = max(ends) if ends else (0, "")
    needed = data_start + end
    if size < needed:
        raise ValueError(
            f"{path} is truncated: {size:,} bytes, but its {len(ends)} tensors end at byte {needed:,} (tensor "
            f"{last!r} and others are cut off; an interrupted download or copy?); {_REDO}."
        )
    return needed


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
