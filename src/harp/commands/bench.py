"""`harp bench`: prefill latency, decode throughput, KV cache and peak memory, original vs pruned."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def _table(result: dict) -> Table:
    t = Table(title="harp bench: original → pruned (medians)", header_style="bold")
    for col in (
        "ctx",
        "prefill ms",
        "speed-up",
        "95 % CI",
        "bound",
        "of ideal",
        "decode tok/s",
        "KV MiB",
        "peak RSS MiB",
    ):
        t.add_column(col, justify="right")
    for r in result["contexts"]:
        pre = r["prefill"]
        frac = pre["fraction_of_ideal_saving"]
        dec = r.get("decode")
        kv = r["kv_cache_bytes"]
        rss = r["peak_rss_bytes"]
        t.add_row(
            str(r["context"]),
            f"{pre['original']['median_ms']:.0f} → {pre['pruned']['median_ms']:.0f}",
            f"{pre['speedup']:.3f}",
            "{:.3f}–{:.3f}".format(*pre["speedup_ci95"]),
            f"{pre['bound']:.3f}",
            "-" if frac is None else f"{100 * frac:.0f} %",
            f"{dec['original']['median_tokens_per_s']:.1f} → {dec['pruned']['median_tokens_per_s']:.1f}"
            if dec
            else "-",
            f"{kv['original'] / 2**20:.1f} → {kv['pruned'] / 2**20:.1f}",
            f"{rss['original'] / 2**20:.0f} → {rss['pruned'] / 2**20:.0f}" if rss else "-",
        )
    return t


def _command_line(
    model: str | None,
    pruned: Path,
    contexts: list[int],
    new_tokens: int,
    repeats: int,
    warmup: int,
    timing: str,
    dtype: str,
    min_seconds: float,
    threads: int | None,
    attn: str | None,
) -> str:
    """The `harp bench` command that reproduces this run (recorded in bench.json)."""
    args = (
        ["harp", "bench"]
        + (["--model", model] if model else [])
        + [
            "--pruned",
            str(pruned),
            "--context",
            ",".join(map(str, contexts)),
            "--new-tokens",
            str(new_tokens),
            "--repeats",
            str(repeats),
            "--warmup",
            str(warmup),
            "--timing",
            timing,
            "--dtype",
            dtype,
        ]
        + (["--min-seconds", f"{min_seconds:g}"] if min_seconds else [])
        + (["--threads", str(threads)] if threads else [])
        + (["--attn", attn] if attn else [])
    )
    return " ".join(args)


def bench_cmd(
    pruned: Path = typer.Option(..., "--pruned", "-p", help="HARP checkpoint folder (from `harp prune`)."),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="Original model: 'smollm2-135m' (bundled default), a folder, a .gguf file, or a hub id.",
    ),
    context: str = typer.Option(
        "256,512,1024,2048,4096", "--context", "-c", help="Comma-separated context lengths (prefill tokens)."
    ),
    new_tokens: int = typer.Option(32, "--new-tokens", help="Tokens generated after each prefill (decode)."),
    repeats: int = typer.Option(3, "--repeats", "-r", help="Measured A/B rounds per context."),
    min_seconds: float = typer.Option(
        0.0,
        "--min-seconds",
        help="Per context, add rounds beyond --repeats until measuring took this long (cheap short "
        "contexts get more rounds).",
    ),
    warmup: int = typer.Option(1, "--warmup", help="Unmeasured A/B rounds per context before measuring."),
    timing: str = typer.Option(
        "lockstep",
        "--timing",
        help="lockstep: the two prefills take turns at every attention/MLP sub-layer and decode alternates "
        "step by step (robust to a noisy machine); forward: whole forwards A then B (also CPU time).",
    ),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    attn: str = typer.Option(None, "--attn", help="Attention implementation for both models (sdpa, eager)."),
    isolated_memory: bool = typer.Option(
        True,
        "--isolated-memory/--no-isolated-memory",
        help="Measure each model's peak RSS in a fresh process of its own (costs one extra run per model).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random prompt tokens."),
    out: Path = typer.Option(Path("runs/bench"), "--out", "-o", help="Folder for bench.json and bench.png."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Also write bench.png (needs matplotlib)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing bench.json / bench.png."),
) -> None:
    """Prefill latency and decode throughput of a HARP model against its original, interleaved A/B,
    with KV-cache bytes, peak memory and the FLOP-ideal speed-up bound.

    The bounds are computed from the model config: docs/method.md, "Speed bounds"."""
    from harp.bench.run import output_paths, parse_contexts, run_bench, write_bench
    from harp.report import check_plot_available

    err = Console(stderr=True)
    contexts = parse_contexts(context)
    output_paths(out, overwrite)  # fail before the (long) run, not after it
    if plot:
        check_plot_available()
    result = run_bench(
        model,
        str(pruned),
        contexts,
        new_tokens=new_tokens,
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        dtype=dtype,
        attn_implementation=attn,
        isolated_memory=isolated_memory,
        seed=seed,
        timing=timing,
        min_seconds=min_seconds,
        progress=lambda m: err.print(f"[dim]{m}[/]", highlight=False),
    )
    result["command"] = _command_line(
        model, pruned, contexts, new_tokens, repeats, warmup, timing, dtype, min_seconds, threads, attn
    )
    written = write_bench(result, out, overwrite=overwrite, plot=plot)
    Console().print(_table(result))
    for kind, path in written.items():
        err.print(f"wrote {kind}: {path}", highlight=False)
