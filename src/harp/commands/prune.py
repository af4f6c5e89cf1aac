"""`harp prune`: search alphas on calibration text, prune, measure, save."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from harp.commands import cli_text, params_row
from harp.jobs.prune import PruneReport, PruneSettings, run_prune


def _ints(s: str | None) -> list[int] | None:
    if not s:
        return None
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layer-ids must be comma-separated integers, got {s!r}.") from None


def _floats(s: str | None) -> list[float] | None:
    if not s:
        return None
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--alphas must be comma-separated numbers, got {s!r}.") from None


def _ridge(s: str) -> float | str:
    if s == "auto":
        return s
    try:
        return float(s)
    except ValueError:
        raise ValueError(f"--ridge must be a number >= 0 or 'auto', got {s!r}.") from None


def _sinks(s: str) -> int | str:
    if s == "fit":
        return s
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"--sinks must be a whole number of tokens >= 0 or 'fit', got {s!r}.") from None


def kv_row(r: PruneReport) -> str:
    """The KV saving at the contexts every command states it at (2,048 tokens and the model's maximum),
    from the saved config; a sliding-window model's saving depends on the context."""
    from harp.model.accounting import kv_savings_text

    if r.kv_at_contexts:
        return kv_savings_text(r.kv_at_contexts)
    return (f"{r.kv_bytes_before:,} -> {r.kv_bytes_after:,} bytes after a 16-token prefill "
            f"(-{100 * (1 - r.kv_bytes_after / max(r.kv_bytes_before, 1)):.1f} %)")


def summary_table(r: PruneReport) -> Table:
    d = r.to_dict()
    t = Table(title="HARP result", show_header=True, header_style="bold")
    t.add_column("")
    t.add_column("value", justify="right")
    rule = r.selection.get("rule", "top")
    t.add_row("layers pruned (top first)", ", ".join(map(str, r.layers))
              + ("" if rule == "top" else " (chosen by --kind auto)" if r.kinds else f" (chosen by --select {rule})"))
    if r.selection.get("picked"):
        t.add_row("--select auto", ", ".join(f"{k} {c['calib_ppl']:.2f}" for k, c in r.selection["candidates"].items())
                  + f" (ppl on {r.selection.get('judged_on', 'calibration windows')}): picked "
                  f"{r.selection['picked']}")
    given = r.search.get("method") == "given"
    refit = r.method == "harp-ls"
    if r.kinds:
        t.add_row("kinds (top first; --kind auto)", ", ".join(
            f"{i} {k}" + (f" {r.window}" if k == "window" else "") for i, k in r.kinds.items()))
        o = r.selection["objective"]
        t.add_row("--kind auto", f"saves {r.selection.get('budget', '')}; held-out long-context perplexity "
                  f"{o['base_ppl']:.2f} -> {o['ppl']:.2f}" + (f"; recall NLL {o['recall_base_nll']:.3f} -> "
                                                             f"{o['recall_nll']:.3f}" if "recall_nll" in o else ""))
    elif r.window is not None:
        t.add_row("kind", f"window layers: attention over the last {r.window} tokens"
                  + (f" and the first {r.sinks}" if r.sinks else "")
                  + (f", with fitted sinks (in place of {r.sink_fit['sinks']} sink tokens)" if r.sink_fit else ""))
    else:
        t.add_row("scales of the refit maps (top first)" if refit else "alphas (top first)",
                  ", ".join(f"{a:g}" for a in r.alphas) + (" (given)" if given else ""))
    if refit and r.fit.get("per_layer"):
        t.add_row("refit: ridge, prior (top first)",
                  ", ".join(f"{f['ridge']:g} {f['prior']}" for f in r.fit["per_layer"]))
    p = r.ppl
    saved = " (the saved model)"
    t.add_row("perplexity: original", f"{p['original']:.3f}")
    if "window" in p:
        t.add_row(f"perplexity: window layers ({r.window} tokens)" + saved, f"{p['window']:.3f}")
    if "mixed" in p:
        t.add_row("perplexity: --kind auto" + saved, f"{p['mixed']:.3f}")
    if "harp-ls" in p:
        t.add_row("perplexity: HARP + least-squares refit (harp-ls)" + (saved if refit else ""), f"{p['harp-ls']:.3f}")
    if "harp" in p:
        label = "HARP (given alphas)" if given and not refit else "HARP (searched alpha)"
        t.add_row(f"perplexity: {label}" + ("" if refit else saved), f"{p['harp']:.3f}")
    if "alpha=1" in p:
        t.add_row("perplexity: same layers, alpha = 1 (no rescaling)", f"{p['alpha=1']:.3f}")
        t.add_row("perplexity: same layers, alpha = 0 (attention dropped)", f"{p['alpha=0']:.3f}")
    t.add_row("evaluation tokens", f"{r.eval_tokens:,}")
    t.add_row("calibration tokens", f"{r.calib_tokens:,}")
    t.add_row(*params_row(r.params_removed, d["params_removed_pct"]))
    t.add_row("parameters", f"{r.params_before:,} -> {r.params_after:,}")
    t.add_row("KV cache", kv_row(r))
    sec = r.seconds
    parts = [f"{k} {sec[k]:.0f} s" for k in ("select", "search", "fit", "eval") if sec.get(k) or k != "select"]
    t.add_row("wall time", f"{sec['total']:.0f} s ({', '.join(parts)})")  # select: layer/kind choice
    if r.out:
        t.add_row("saved to", r.out)
    return t


def prune_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the pruned checkpoint."),
    model: str = typer.Option(None, "--model", "-m",
                              help="Model: 'smollm2-135m' (bundled default), a folder, a .gguf file, or a hub id."),
    layers: int = typer.Option(PruneSettings.k, "--layers", "-k", help="Prune the top K decoder layers."),
    layer_ids: str = typer.Option(None, "--layer-ids", help="Explicit layer indices instead of the top K (20,22,24)."),
    select: str = typer.Option(PruneSettings.select, "--select",
                               help="Which K layers: 'top' (HARP: the top K), 'attention-drop' (K layers at any "
                                    "depth with the most redundant attention, He et al.'s score), or 'auto' (prunes "
                                    "both ways and keeps the lower calibration perplexity)."),
    fit: str = typer.Option(PruneSettings.fit, "--fit",
                            help="What a pruned layer gets: 'lstsq' (the closed-form least-squares refit of its "
                                 "map) or 'none' (the paper's HARP: one searched alpha)."),
    ridge: str = typer.Option(str(PruneSettings.ridge), "--ridge",
                              help="Refit: relative ridge strength, or 'auto' (cross-validated per layer)."),
    fit_prior: str = typer.Option(PruneSettings.fit_prior, "--fit-prior",
                                  help="Refit: shrink toward 'zero', 'alpha' (the layer's own scaled map) or 'auto'."),
    alphas: str = typer.Option(None, "--alphas", help="Skip the search: alphas for the layers, top layer first "
                                                       "(with --fit lstsq: scales of the refit maps)."),
    window: int = typer.Option(None, "--window",
                               help="Window layers: the chosen layers keep their attention over their last W "
                                    "tokens instead of being bypassed (KV cache capped at W tokens each; exact "
                                    "below W tokens). No search or refit."),
    sinks: str = typer.Option(str(PruneSettings.sinks), "--sinks",
                              help="With --window: window layers also see (and cache) the first S tokens "
                                   "(attention sinks); 'fit': a fitted sink instead (a per-head logit and an output "
                                   "bias, fitted on calibration text to stand in for 4 sink tokens; caches nothing "
                                   "more, and vLLM serves it)."),
    kind: str = typer.Option(None, "--kind",
                             help="'auto': choose the layers (any depth) and per layer a window (--window, default "
                                  "1024), refit or drop, greedily on held-out long-context loss, under a KV budget: "
                                  "the saving of the top K bypassed layers, or --kv-saving, at --context tokens."),
    kv_saving: str = typer.Option(None, "--kv-saving", help="With --kind auto: the KV saving to reach (25%% or 0.25)."),
    context: int = typer.Option(None, "--context",
                                help="With --kind auto: the context the KV budget is stated at (default: the model's "
                                     "maximum)."),
    recall_windows: int = typer.Option(PruneSettings.recall_windows, "--recall-windows",
                                       help="With --kind auto: also judge plans on N calibration-text windows with "
                                            "numbered facts planted more than --window tokens before their questions "
                                            "(the answers' loss joins the objective; 0: text loss only)."),
    calib: str = typer.Option(None, "--calib", help="Calibration text: file, folder, or bundled 'wikitext2-valid'."),
    eval_: str = typer.Option(None, "--eval", help="Evaluation text: file, folder, or bundled 'wikitext2-raw-test'."),
    calib_windows: int = typer.Option(PruneSettings.calib_windows, "--calib-windows",
                                      help="Number of calibration windows."),
    seq_len: int = typer.Option(PruneSettings.seq_len, "--seq-len", help="Calibration window length (tokens)."),
    eval_tokens: int = typer.Option(PruneSettings.eval_tokens, "--eval-tokens",
                                    help="Evaluate on the first N tokens of the eval text."),
    eval_seq_len: int = typer.Option(PruneSettings.eval_seq_len, "--eval-seq-len",
                                     help="Evaluation window length (tokens)."),
    grid: str = typer.Option("0:1:0.1", "--grid", help="Alpha grid: 'start:stop:step' or 'a,b,c'."),
    seed: int = typer.Option(PruneSettings.seed, "--seed", help="Seed for choosing calibration windows."),
    batch_size: int = typer.Option(PruneSettings.batch_size, "--batch-size", help="Windows per forward pass."),
    method: str = typer.Option(PruneSettings.method, "--method", help="'cached' (fast) or 'naive' (reference) search."),
    no_reference: bool = typer.Option(False, "--no-reference",
                                      help="Skip the reference rows (the other of HARP and the refit, alpha = 1, "
                                           "alpha = 0)."),
    dtype: str = typer.Option(PruneSettings.dtype, "--dtype", help="float32 | bfloat16 | float16"),
    device: str = typer.Option(PruneSettings.device, "--device",
                               help="cpu | cuda | cuda:N | auto (GPUs if any; the whole model via device_map='auto')."),
    streamed: bool = typer.Option(False, "--streamed",
                                  help="Search without the whole model resident: bottom layers are streamed one "
                                       "at a time from the safetensors shards (see `harp plan`)."),
    activations: str = typer.Option(PruneSettings.activations, "--activations",
                                    help="With --streamed: keep calibration activations on the device, cpu, or disk "
                                         "(memory-mapped)."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    json_out: Path = typer.Option(None, "--json", help="Also write the summary to this JSON file."),
) -> None:
    """Prune K layers (by default refitting each pruned layer's map in closed form), report perplexity,
    size and KV cache against HARP's searched alphas, and save a checkpoint."""
    console = Console()
    # option defaults come from PruneSettings: `harp prune` and harp.run_prune cannot drift apart
    settings = PruneSettings(
        model=model, k=layers, layers=_ints(layer_ids), select=select, fit=fit, ridge=_ridge(ridge),
        fit_prior=fit_prior, alphas=_floats(alphas), window=window, sinks=_sinks(sinks), kind=kind, kv_saving=kv_saving,
        context=context, recall_windows=recall_windows, calib=calib, eval=eval_,
        calib_windows=calib_windows, seq_len=seq_len, eval_tokens=eval_tokens, eval_seq_len=eval_seq_len,
        grid=grid, seed=seed, batch_size=batch_size, method=method, references=not no_reference, dtype=dtype,
        device=device, streamed=streamed, activations=activations, threads=threads, out=str(out), overwrite=overwrite,
    )
    # run_prune checks every argument against the config / GGUF header / files before loading anything, and
    # holds the output's lock (a second run on this --out refuses); Ctrl-C says how to resume
    with resumable(out):
        report = run_prune(settings, log=lambda m: console.print(cli_text(m), highlight=False))
    console.print(summary_table(report))
    if json_out is not None:
        from harp.util.fsio import write_json_atomic

        write_json_atomic(json_out, report.to_dict())


@contextmanager
def resumable(out: str | os.PathLike[str] | None, err: Any = None) -> Iterator[None]:
    """Turn Ctrl-C (KeyboardInterrupt) into one line saying how to resume, exit code 130, no traceback.
    The search state file written after every layer is left in place."""
    import sys

    try:
        yield
    except KeyboardInterrupt:
        line = "interrupted."
        if out is not None:
            from harp.jobs.prune import state_file_for

            state = state_file_for(Path(out).expanduser().resolve())
            if state.is_file():
                try:
                    done = len(json.loads(state.read_text()).get("done", []))
                except (ValueError, OSError, AttributeError):
                    done = "some"
                line = (f"interrupted: the search progress ({done} layer(s) done) is kept in {state}; rerun the "
                        "same command to resume (or delete that file to start over).")
            else:
                line = "interrupted before the first searched layer was done: nothing to resume; rerun to start."
        print(f"error: {line}", file=err or sys.stderr, flush=True)
        raise SystemExit(130) from None
