"""`harp analyze MODEL`: per-layer Sim(H), attention diagonality and baseline scores, table + plot."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def _model_name(model: str | None) -> str:
    if model is None:
        return "smollm2-135m"
    p = Path(model)
    return (p.stem if p.suffix == ".gguf" else p.name) or "model"


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
    import torch

    from harp.engine.text import DEFAULT_CALIB, bos_token, calibration_windows, load_text, tokenize
    from harp.methods.analyze import analyze
    from harp.model.load import load_model
    from harp.report.analyze import analyze_markdown, plot_analyze
    from harp.util.fsio import atomic_dir, write_json_atomic

    console = Console()
    if threads:
        torch.set_num_threads(threads)
    name = _model_name(model)
    out = out or Path("runs") / f"analyze-{name}"
    from harp.jobs.analyze import check_analyze

    check_analyze(model, text, windows, seq_len, out, overwrite)  # every argument, before the model loads
    m, tok = load_model(model, attn_implementation="eager")
    src = load_text(text, DEFAULT_CALIB)
    w = calibration_windows(tokenize(tok, src), windows, seq_len, seed, bos=bos_token(tok))
    console.print(f"analysing {name} on {w.shape[0]} x {w.shape[1]} tokens of {src.description}", highlight=False)
    res = analyze(m, w, batch_size=batch_size, name=name, text=src.description)

    t = Table(title=f"{name}: per-layer evidence", header_style="bold")
    for col in ("layer", "Sim(H)", "attn on self", "attn on 1st", "cos(X,X+Attn)", "Block Infl.", "pruned"):
        t.add_column(col, justify="right")
    t.add_row("emb", f"{res.embedding_sim:.3f}", "", "", "", "", "")
    for r in res.layers:
        def f(x: float | None, d: int = 3) -> str:
            return "–" if x is None else f"{x:.{d}f}"

        t.add_row(str(r["layer"]), f(r["sim"]), f(r["attn_self"]), f(r["attn_first"]), f(r["attn_cos"]),
                  f(r["block_influence"], 4), "" if r["alpha"] is None else f"alpha {r['alpha']:g}")
    console.print(t)
    with atomic_dir(out, overwrite) as tmp:
        write_json_atomic(tmp / "analyze.json", res.to_dict())
        (tmp / "analyze.md").write_text(analyze_markdown(res))
        plot_analyze(res, tmp / "analyze.png", highlight_top=highlight_top)
    console.print(f"wrote {out}/analyze.md, analyze.json, analyze.png ({res.seconds:.0f} s)", highlight=False)
