"""Export HARP (and unpruned) models to formats existing inference engines load without custom code.

- `export_deci`: a `DeciLMForCausalLM` / `nemotron-nas` checkpoint (safetensors + config.json with
  per-layer `block_configs` + tokenizer files). A HARP layer with alpha != 0 becomes a
  `replace_with_linear` attention layer with weight `alpha * W_O R W_V`; alpha = 0 becomes `no_op`.
- `export_gguf`: a GGUF of llama.cpp's `deci` architecture (f32, f16 or q8_0).

Both validate first and raise `ExportError` (a ValueError) naming what the format cannot hold and what
to do instead; nothing is written then. Outputs are written atomically and never replace an existing
output unless `overwrite=True`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harp.export.deci import (
    DeciModel,
    ExportError,
    check_exportable,
    deci_config,
    deci_kinds,
    to_deci,
    window_problems,
)
from harp.export.gguf_writer import DTYPES as GGUF_DTYPES
from harp.export.gguf_writer import check_gguf_out, write_gguf
from harp.model.load import load_model, resolve_model_source, saved_tokenizer
from harp.model.source import ModelInfo, model_or_problem, resolve
from harp.util.dtypes import DTYPES
from harp.util.fsio import atomic_dir, check_output, write_json_atomic
from harp.util.problems import Collector

__all__ = [
    "DECI_DTYPES",
    "FORMATS",
    "GGUF_DTYPES",
    "DeciModel",
    "ExportError",
    "check_exportable",
    "export",
    "export_deci",
    "export_gguf",
    "deci_kinds",
    "to_deci",
]

FORMATS = ("deci", "gguf")
DECI_DTYPES = {"f32": DTYPES["float32"], "f16": DTYPES["float16"], "bf16": DTYPES["bfloat16"]}  # the short names
_SHARD_BYTES = 5 * 2**30


def _save_safetensors(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    from safetensors.torch import save_file

    meta = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= _SHARD_BYTES:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata=meta
        )
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(folder / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export_deci(
    model: nn.Module,
    out: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    dtype: str | None = None,
    overwrite: bool = False,
    source_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write `model` (harp-pruned or not) as a DeciLM / nemotron-nas checkpoint folder `out`.

    Args:
        model: a transformers causal LM of a LLaMA-shaped family (llama, mistral, qwen2), pruned with
            `harp.prune` / loaded with `harp.load`, or unpruned.
        out: output folder (must not exist or be empty unless `overwrite`).
        tokenizer: saved next to the weights if given.
        dtype: "f32", "f16" or "bf16"; default keeps the model's dtype.
        source_dir: the model's folder, to copy `generation_config.json` from.
    """

    if dtype is not None and dtype not in DECI_DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r} for `fmt=deci`; use one of {', '.join(DECI_DTYPES)}.")
    d = to_deci(model, ffn_multiple_of_256=True)  # validates; raises before anything is written
    target = DECI_DTYPES[dtype] if dtype else next(iter(d.tensors.values())).dtype
    tensors = {k: v.to(target) for k, v in d.tensors.items()}
    config = deci_config(d, target)
    with atomic_dir(out, overwrite) as tmp:
        _save_safetensors(tensors, tmp)
        write_json_atomic(tmp / "config.json", config)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if source_dir is not None and (Path(source_dir) / "generation_config.json").is_file():
            shutil.copyfile(Path(source_dir) / "generation_config.json", tmp / "generation_config.json")
    return Path(out).expanduser().resolve()


def export_gguf(
    model: nn.Module,
    out: str | os.PathLike[str],
    *,
    dtype: str = "f16",
    tokenizer: Any = None,
    tokenizer_gguf: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    name: str | None = None,
) -> Path:
    """Write `model` (harp-pruned or not) as a GGUF of llama.cpp's `deci` architecture.

    Tokenizer metadata is copied from `tokenizer_gguf` (any GGUF of the same base model) if given, else
    built from the HF `tokenizer` (byte-level BPE tokenizers); with neither, the GGUF has no vocabulary
    (llama.cpp then evaluates token ids only).
    """
    d = to_deci(model, ffn_multiple_of_256=False)  # GGUF stores FFN widths exactly
    return write_gguf(
        d,
        out,
        dtype=dtype,
        tokenizer=tokenizer,
        tokenizer_gguf=tokenizer_gguf,
        name=name,
        overwrite=overwrite,
    )


def export(
    source: str | os.PathLike[str] | None,
    fmt: str,
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    tokenizer_gguf: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> tuple[Path, dict[str, list[int]]]:
    """Load `source` (HARP checkpoint, model folder, .gguf, or None for the bundled default) and export it.

    Returns the output path and the written layer indices by kind ("attention", "linear", "no_op").
    """

    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.")
    if fmt == "gguf" and dtype is not None and dtype not in GGUF_DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r} for `fmt=gguf`; use one of {', '.join(GGUF_DTYPES)}.")
    if fmt == "deci" and dtype is not None and dtype not in DECI_DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r} for `fmt=deci`; use one of {', '.join(DECI_DTYPES)}.")
    if fmt == "gguf" and tokenizer_gguf is not None and not Path(tokenizer_gguf).is_file():
        raise FileNotFoundError(f"`tokenizer_gguf={tokenizer_gguf}` not found.")
    problems = Collector()  # fail before loading the model if the output cannot be written
    _check_out(fmt, out, overwrite, [], problems)
    problems.raise_if_any()
    ms = resolve(source)
    src_path = Path(resolve_model_source(ms))  # the default's converted folder, the folder or .gguf, a hub id
    # Load in the precision that is written (the whole model is resident while exporting): f32 unless
    # the output is 16-bit anyway; q8_0 is quantised from f32.
    load_dtype = DECI_DTYPES.get(dtype or "", torch.float32)  # a GGUF quantisation (q8_0) loads in float32
    model, tok = load_model(ms, dtype=load_dtype, with_tokenizer=ms.is_gguf)
    if not ms.is_gguf:
        tok = saved_tokenizer(ms)
    check_exportable(model, ffn_multiple_of_256=fmt == "deci")
    name = str(source) if ms.kind == "hub" else src_path.stem
    if fmt == "deci":
        path = export_deci(
            model,
            out,
            tokenizer=tok,
            dtype=dtype,
            overwrite=overwrite,
            source_dir=src_path if ms.kind in ("default", "folder") else None,
        )
    else:
        if tokenizer_gguf is None and ms.is_gguf:
            tokenizer_gguf = src_path  # the model's own GGUF has exactly its tokenizer
        if tok is None and tokenizer_gguf is None:
            raise ExportError(
                f"{source} has no tokenizer files, so the GGUF would have no vocabulary. Pass "
                "`tokenizer_gguf=FILE` (any GGUF of the same base model)."
            )
        path = export_gguf(
            model,
            out,
            dtype=dtype or "f16",
            tokenizer=tok,
            tokenizer_gguf=tokenizer_gguf,
            overwrite=overwrite,
            name=name,
        )
    kinds = deci_kinds(model.config)
    return path, {kind: [i for i, k in enumerate(kinds) if k == kind] for kind in ("attention", "linear", "no_op")}


def _check_out(
    fmt: str, out_path: str | os.PathLike[str], overwrite: bool, inputs: list[Path | None], problems: Collector
) -> None:
    """Collect why the output of `fmt` cannot be written (a GGUF file or a DeciLM folder)."""
    if fmt == "gguf":
        check_gguf_out(out_path, overwrite, inputs, problems)
    else:
        check_output(out_path, overwrite, inputs, problems)


def check_export(source: Any, fmt: str, out_path: Path, overwrite: bool) -> ModelInfo | None:
    out = Collector()
    info = model_or_problem(source, out)
    if info is not None and info.config:  # before any weight loads
        for p in window_problems(info.config):
            out.add(f"Cannot export {info.label} to `fmt={fmt}`: {p}")
    _check_out(fmt, out_path, overwrite, [info.path if info else None], out)
    out.raise_if_any()
    return info
