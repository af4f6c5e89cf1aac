"""`harp compare`: all methods at equal KV-cache reduction, one table, one chart."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

import harp.methods.catalog  # noqa: F401  (registers every method: the --methods help lists them)
from harp.commands.eval import TASKS_HELP
from harp.methods.registry import METHODS, all_methods

_NAMED_ONLY = [m for m in METHODS if m not in all_methods()]
METHODS_HELP = (f"Comma-separated (or 'all'): {', '.join(METHODS)}. 'all' leaves out the fitted-sink windows "
                f"({', '.join(_NAMED_ONLY)}): name them, e.g. 'all,window-1024-fit'.")


def _ks(spec: str | None) -> list[int]:
    if not spec:
        return []
    try:
        ks = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers must be an integer or a comma-separated list (e.g. 4,8), got {spec!r}.") from None
    if any(k < 1 for k in ks):
        raise ValueError(f"--layers values must be at least 1, got {spec!r}.")
    return ks


def _console_table(rep) -> list[Table]:
    tables = []
    original = rep.row(0, "original")
    for k in rep.ks:
        t = Table(title=f"k = {k} of {rep.num_layers} layers", header_style="bold")
        t.add_column("method")
        t.add_column("pruned")
        for task in rep.tasks:
            t.add_column(task["title"], justify="right")
        for col in ("params removed", "KV", "search"):
            t.add_column(col, justify="right")
        for r in [original] + [r for r in rep.rows if r["k"] == k]:
            cells = [r["method"], "–" if not r["k"] else (("blocks " if r["kind"] == "blocks" else "attn ")
                                                          + ",".join(map(str, sorted(r["layers"]))))]
            for task in rep.tasks:
                sc = r["scores"][task["name"]]
                v = sc["value"]
                cells.append((f"{v:.3f}" if v < 1000 else f"{v:.3g}")
                             + (f" ±{sc['stderr']:.3f}" if task["kind"] == "longctx" and sc["stderr"] is not None
                                else ""))
            cells += ([f"{r['params_removed_pct']:.1f} %", f"-{100 * r['kv_reduction']:.0f} %",
                       f"{r['search_seconds']:.0f} s"] if r["k"] else ["–", "–", "–"])
            t.add_row(*cells)
        tables.append(t)
    return tables


def compare_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: compare.md, compare.json, compare.png "
                             "(and loss_by_position_k<k>.png with --eval-seq-len above 1024)."),
    model: str = typer.Option(None, "--model", "-m",
                              help="Model: 'smollm2-135m' (bundled default), a folder, a .gguf file, or a hub id."),
    layers: str = typer.Option("8", "--layers", "-k", help="k: attention sub-layers to remove/bypass; '4,8' for both."),
    methods: str = typer.Option("all", "--methods", help=METHODS_HELP),
    tasks: str = typer.Option(None, "--tasks", "-t", help=TASKS_HELP + " WikiText-2 perplexity is always measured."),
    limit: str = typer.Option(None, "--limit", help="Items per lm-eval task: N, or e.g. '200,gsm8k=30'."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Task data folder (default: $HARP_DATA_DIR, then ./data)."),
    calib: str = typer.Option(None, "--calib", help="Calibration text (default: bundled 'wikitext2-valid')."),
    calib_windows: int = typer.Option(16, "--calib-windows", help="Number of calibration windows."),
    seq_len: int = typer.Option(512, "--seq-len", help="Calibration window length (tokens)."),
    seed: int = typer.Option(0, "--seed", help="Seed for choosing calibration windows."),
    eval_: str = typer.Option(None, "--eval", help="Perplexity text (default: bundled 'wikitext2-raw-test')."),
    eval_tokens: int = typer.Option(16384, "--eval-tokens", help="Perplexity on the first N tokens."),
    eval_seq_len: int = typer.Option(1024, "--eval-seq-len", help="Perplexity window length; above 1024 each row "
                                     "also gets the loss by position bucket and a PNG per k."),
    grid: str = typer.Option("0:1:0.1", "--grid", help="Alpha grid for harp/harp-low/harp-refine."),
    batch_size: int = typer.Option(4, "--batch-size", help="Calibration windows per forward pass."),
    eval_batch_size: int = typer.Option(8, "--eval-batch-size", help="lm-eval batch size."),
    max_gen_toks: int = typer.Option(None, "--max-gen-toks", help="Cap generated tokens (generation tasks)."),
    context: str = typer.Option(None, "--context", help="Prompt lengths in tokens for passkey and niah, e.g. 4096 "
                                "or 1k,4k: a column per task and context (default 4096, or the model's maximum)."),
    filler: str = typer.Option(None, "--filler", help="Haystack text for passkey and niah: a text file or folder "
                               "(default: the classic filler for passkey, bundled Tiny Shakespeare for niah)."),
    refine_passes: int = typer.Option(6, "--refine-passes", help="At most this many harp-refine passes."),
    auto_k: bool = typer.Option(False, "--auto-k", help="Choose k: the largest within --max-ppl-increase."),
    max_ppl_increase: str = typer.Option(None, "--max-ppl-increase",
                                         help="With --auto-k: percent calibration perplexity may rise (10 = 10 %)."),
    max_k: int = typer.Option(None, "--max-k", help="With --auto-k: never prune more than this many layers."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Compare HARP with its ablations and published baselines at equal KV-cache reduction: perplexity,
    task scores, parameters removed, KV reduction and search time, as Markdown, JSON and a PNG chart.

    Long context: --tasks passkey,niah --context 4096 adds a column per task and context (accuracy ± stderr,
    --limit items, the same prompts for every method); --eval-seq-len 8192 adds the loss by position."""
    from harp.jobs.compare import CompareSettings, run_compare
    from harp.methods.autok import parse_ppl_increase

    console = Console()
    inc = parse_ppl_increase(max_ppl_increase) if max_ppl_increase is not None else None
    if inc is not None and not auto_k:
        raise ValueError("--max-ppl-increase only applies with --auto-k.")
    settings = CompareSettings(
        model=model, ks=[] if auto_k else _ks(layers), methods=methods, tasks=tasks, limit=limit,
        data_dir=str(data_dir) if data_dir else None, calib=calib, calib_windows=calib_windows, seq_len=seq_len,
        seed=seed, eval=eval_, eval_tokens=eval_tokens, eval_seq_len=eval_seq_len, grid=grid,
        batch_size=batch_size, eval_batch_size=eval_batch_size, max_gen_toks=max_gen_toks, context=context,
        filler=filler, refine_passes=refine_passes, auto_k=auto_k, max_ppl_increase=inc, max_k=max_k, dtype=dtype,
        threads=threads, out=str(out), overwrite=overwrite,
        command="harp " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["compare"] else None,
    )
    # run_compare checks the model's config, k, grid, texts and output before any weight is read, and holds
    # the output's lock while it runs
    rep = run_compare(settings, log=lambda m: console.print(m, highlight=False))
    for t in _console_table(rep):
        console.print(t)
    plots = "".join(f", {p}" for p in (rep.long_context or {}).get("position_plots", []))
    console.print(f"wrote {rep.out}/compare.md, compare.json, compare.png{plots} "
                  f"(wall time {rep.seconds['total'] / 60:.1f} min)", highlight=False)
