"""`harp info DIR`: what a HARP checkpoint is — which layers, which alphas, how it was made."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from harp.model.checkpoint import RECIPE_FILE, read_config


def describe(path: str | Path) -> dict:
    """A dict describing a checkpoint folder (no weights are loaded). A damaged folder (truncated weights,
    a malformed harp block, a half-written save) is an error naming the file, not a description."""
    from harp.model.checkpoint import check_complete

    path = Path(path)
    cfg = read_config(path)
    check_complete(path, cfg)
    harp_block = cfg.get("harp") or {}
    info: dict = {
        "path": str(path),
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "model_type": cfg.get("model_type"),
        "num_layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "harp": harp_block,
        "weights_bytes": sum(p.stat().st_size for p in path.glob("*.safetensors")),
    }
    if harp_block:
        from harp.model.accounting import kv_savings
        from harp.model.configs import config_from_dict

        try:
            info["kv_savings"] = kv_savings(config_from_dict(cfg), None)
        except (TypeError, ValueError, KeyError):
            pass
    for name in (RECIPE_FILE, "harp_summary.json"):
        f = path / name
        if f.is_file():
            info[name.removesuffix(".json")] = json.loads(f.read_text())
    return info


def kv_text(path: str | Path) -> str:
    """The KV saving at the contexts every command states it at (2,048 tokens and the model's maximum)."""
    from harp.model.accounting import kv_savings, kv_savings_text
    from harp.model.configs import config_from_dict

    try:
        cfg = config_from_dict(read_config(path))
        dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32"
        return kv_savings_text(kv_savings(cfg, None, dtype=str(dtype).removeprefix("torch.")))
    except (TypeError, ValueError, KeyError):
        return "KV figures unavailable for this config"


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
        pairs = sorted(zip(h["layers"], h["alphas"], strict=True), reverse=True)
        t.add_row("pruned layers (top first)", ", ".join(str(i) for i, _ in pairs))
        t.add_row("alphas (top first)", ", ".join(f"{a:g}" for _, a in pairs))
        n = d["num_layers"] or 1
        t.add_row("KV cache", f"{len(pairs)} of {n} layers keep none; {kv_text(path)}")
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
        if s.get("method"):
            what = "search (reference row)" if fit.get("used") else "search"
            t.add_row(what, f"{s.get('method')}, grid {s.get('grid')}, {s.get('seconds', 0):.0f} s")
    summ = d.get("harp_summary") or {}
    if summ.get("ppl"):
        t.add_row("perplexity", ", ".join(f"{k} {v:.3f}" for k, v in summ["ppl"].items()))
        t.add_row("parameters removed", f"{summ['params_removed']:,} ({summ['params_removed_pct']:.2f} %)")
    console.print(t)
