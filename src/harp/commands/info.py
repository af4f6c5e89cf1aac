"""`harp info DIR`: what a HARP checkpoint is — which layers, which alphas, how it was made."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from harp.commands import params_row
from harp.jobs.info import describe, kv_text
from harp.modeling import HarpBlock

__all__ = ["describe", "info_cmd", "kv_text"]  # describe and kv_text live in harp.jobs.info


def info_cmd(
    path: Path = typer.Argument(..., help="A checkpoint folder written by harp prune / harp.save."),
    as_json: bool = typer.Option(False, "--json", help="Print the description as JSON."),
) -> None:
    """Describe a HARP checkpoint: pruned layers, alphas, provenance, size and measured quality."""
    d = describe(path)
    console = Console()
    if as_json:
        console.print_json(json.dumps(d, default=str))
        return
    h = d["harp"]
    t = Table(title=f"{path}", show_header=False)
    t.add_row("architecture", f"{d['architecture']} ({d['model_type']}), {d['num_layers']} layers, "
              f"hidden {d['hidden_size']}")
    if not h:
        t.add_row("HARP", "not pruned (an ordinary transformers folder)")
    else:
        t.add_row("HARP format", str(h.get("format_version")))
        block = HarpBlock.from_dict(h)
        n = d["num_layers"] or 1
        kv = []
        if block.layers:
            t.add_row("pruned layers (top first)", block.layers_text())
            t.add_row("alphas (top first)", block.alphas_text())
            kv.append(f"{len(block.layers)} of {n} layers keep none")
        if block.window_layers:
            t.add_row("window layers (top first)", f"{block.windows_text()} (layer:window, attention over the "
                      "last W tokens)")
            kv.append(f"{len(block.window_layers)} keep their last W - 1 tokens")
        t.add_row("KV cache", "; ".join(kv) + f"; {kv_text(path)}")
    t.add_row("weights on disk", f"{d['weights_bytes'] / 2**20:.1f} MiB")
    rec = d.get("harp_recipe") or {}
    if rec:
        t.add_row("made by", f"harp {rec.get('harp_version')} / transformers {rec.get('transformers_version')}")
        if rec.get("source_model"):
            t.add_row("source model", str(rec["source_model"]))
        cal = rec.get("calibration")
        if cal:
            t.add_row("calibration", f"{cal.get('description')}: {cal.get('windows')} x {cal.get('seq_len')} tokens, "
                      f"seed {cal.get('seed')}")
        fit = rec.get("fit") or {}
        if fit.get("used"):
            t.add_row("pruned layers' maps", "least-squares refit (harp-ls): ridge, prior per layer (top first) "
                      + ", ".join(f"{f['ridge']:g} {f['prior']}" for f in fit.get("per_layer", []))
                      + f"; the alphas scale the refit maps; {fit.get('seconds', 0):.0f} s")
        s = rec.get("search") or {}
        if s.get("method") and s["method"] != "window":  # window layers are not searched
            what = "search (reference row)" if fit.get("used") else "search"
            t.add_row(what, f"{s.get('method')}, grid {s.get('grid')}, {s.get('seconds', 0):.0f} s")
    summ = d.get("harp_summary") or {}
    if summ.get("ppl"):
        t.add_row("perplexity", ", ".join(f"{k} {v:.3f}" for k, v in summ["ppl"].items()))
        t.add_row(*params_row(summ["params_removed"], summ["params_removed_pct"]))
    console.print(t)
