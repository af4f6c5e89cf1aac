"""`harp export`: write a HARP checkpoint (or an unpruned model) in a format serving engines load."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def _ranges(ix: list[int]) -> str:
    if not ix:
        return "none"
    parts, start, prev = [], ix[0], ix[0]
    for i in ix[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def export_cmd(
    source: str = typer.Argument(
        ...,
        help="HARP checkpoint folder (from `harp prune`), a plain model folder, a .gguf, or 'smollm2-135m' "
        "for the bundled default (unpruned models export the same way, to compare like with like).",
    ),
    fmt: str = typer.Option(
        ..., "--format", "-f", help="deci (DeciLM/nemotron-nas safetensors folder) or gguf."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (deci) or FILE.gguf (gguf)."),
    dtype: str = typer.Option(
        None,
        "--dtype",
        help="gguf: f32, f16 (default) or q8_0. deci: f32, f16 or bf16 (default: as loaded, f32).",
    ),
    tokenizer_gguf: Path = typer.Option(
        None,
        "--tokenizer-gguf",
        help="gguf only: copy tokenizer metadata from this GGUF of the same base model (needed for "
        "tokenizers harp cannot describe to llama.cpp itself, e.g. SentencePiece ones).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Export to a format existing inference engines run without custom code.

    Layers pruned with alpha != 0 become 'replace_with_linear' attention, alpha = 0 layers 'no_op'.

    The model is validated first: nothing is written if the format cannot hold it.
    """
    from harp.export.run import export

    console = Console(stderr=True)
    if tokenizer_gguf is not None and fmt != "gguf":
        raise ValueError("--tokenizer-gguf applies to --format gguf only.")
    if fmt in ("deci", "gguf"):
        from harp.export.run import check_export

        check_export(source, fmt, out, overwrite)  # the source's files and the output, before loading weights
    path, kinds = export(source, fmt, out, dtype=dtype, tokenizer_gguf=tokenizer_gguf, overwrite=overwrite)
    console.print(
        f"layers: attention {_ranges(kinds['attention'])}; linear {_ranges(kinds['linear'])}; "
        f"no_op {_ranges(kinds['no_op'])}",
        highlight=False,
    )
    if fmt == "gguf" and 0 in kinds["no_op"]:
        console.print(
            "note: layer 0 (alpha = 0) written as a zero linear layer: llama.cpp cannot load a no-op layer 0."
        )
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)
    if fmt == "gguf":
        console.print(f"serve it: llama-server -m {path}", highlight=False, soft_wrap=True)
