"""`harp analyze MODEL`: per-layer Sim(H), attention diagonality and baseline scores, table + plot."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def analyze_cmd(
    model: str = typer.Argument(None, help="Model: 'smollm2-135m' (default), a folder, a .gguf file, or a hub id."),
    text: str = typer.Option(None, "--text", help="Text to analyse on (default: bundled 'wikitext2-valid')."),
    windows: int = typer.Option(8, "--windows", help="Number of windows."),
    seq_len: int = typer.Option(256, "--seq-len", help="Window length (tokens)."),
    seed: int = typer.Option(0, "--seed", help="Seed for choosing the windows."),
    batch_size: int = typer.Option(2, "--batch-size", help="Windows per forward pass."),
    highlight_top: int = typer.Option(None, "--highlight-top", help="Shade the top K layers in the plot."),
    out: Path = typer.Option(None, "--out", "-o",
                             help="Folder for analyze.json/.md/.png (default runs/analyze-<model name>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads."),
) -> None:
    """Per-layer evidence for which layers to prune: Sim(H), how diagonal attention is, and the
    Attention Drop / ShortGPT scores, as a table, a Markdown/JSON file and a PNG plot."""
    from harp.jobs.analyze import AnalyzeSettings, run_analyze

    console = Console()
    settings = AnalyzeSettings(model=model, text=text, windows=windows, seq_len=seq_len, seed=seed,
                               batch_size=batch_size, highlight_top=highlight_top, out=out, overwrite=overwrite,
                               threads=threads)
    res, out = run_analyze(settings, log=lambda m: console.print(m, highlight=False))
    t = Table(title=f"{res.model}: per-layer evidence", header_style="bold")
    for col in ("layer", "Sim(H)", "attn on self", "attn on 1st", "cos(X,X+Attn)", "Block Infl.", "pruned"):
        t.add_column(col, justify="right")
    t.add_row("emb", f"{res.embedding_sim:.3f}", "", "", "", "", "")
    for r in res.layers:
        def f(x: float | None, d: int = 3) -> str:
            return "–" if x is None else f"{x:.{d}f}"

        t.add_row(str(r["layer"]), f(r["sim"]), f(r["attn_self"]), f(r["attn_first"]), f(r["attn_cos"]),
                  f(r["block_influence"], 4), "" if r["alpha"] is None else f"alpha {r['alpha']:g}")
    console.print(t)
    console.print(f"wrote {out}/analyze.md, analyze.json, analyze.png ({res.seconds:.0f} s)", highlight=False)
