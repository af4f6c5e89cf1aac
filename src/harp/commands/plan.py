"""`harp plan`: peak memory of the alpha search and what the result saves, from the config alone."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console

from harp.jobs.plan import GiB, full_plan, human, parse_calib
from harp.model.configs import PRESETS
from harp.model.prune import refuse_pruned
from harp.model.source import load_config


def _params(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def render(p: dict[str, Any], name: str, memory_gib: float | None = None) -> list[str]:
    """The lines `harp plan` prints."""
    m, st, r = p["model"], p["settings"], p["result"]
    where = "CUDA context, estimate" if st["device"].startswith("cuda") else "Python + torch, CPU"
    rows = [
        ("weights resident", "weights"),
        ("calibration activations", "activations"),
        ("workspace (one batch)", "workspace"),
        (f"runtime ({where})", "runtime"),
    ]
    n, s = st["calib"]
    lines = [
        f"harp plan: {name} ({m['model_type']}, {m['layers']} layers, hidden {m['hidden']}, "
        f"{_params(m['params'])} parameters)",
        f"search: top {st['k']} layers, calibration {n} x {s} tokens, {st['dtype']} on {st['device']}, "
        f"batch {st['batch_size']}, LM-head chunks of {st['chunk_tokens']} tokens",
        "",
        f"{'peak memory of the alpha search':<40}{'streamed':>12}{'in-memory':>14}",
    ]
    for label, key in rows:
        lines.append(f"  {label:<38}{human(p['streamed'][key]):>12}{human(p['in_memory'][key]):>14}")
    lines.append(f"  {'peak':<38}{human(p['streamed']['total']):>12}{human(p['in_memory']['total']):>14}")
    if p["streamed"]["host_activations"]:
        lines.append(f"  (+ {human(p['streamed']['host_activations'])} of activations in CPU RAM: --activations cpu)")
    if memory_gib is not None:
        fits = [("streamed", p["streamed"]["total"]), ("in-memory", p["in_memory"]["total"])]
        verdict = ", ".join(f"{k} {'fits' if v <= memory_gib * GiB else 'does NOT fit'}" for k, v in fits)
        lines.append(f"  in {memory_gib:g} GiB: {verdict}")
    lines += [
        "",
        f"result: top {st['k']} of {m['layers']} layers pruned (layers {r['layers'][-1]}..{r['layers'][0]})",
        f"  parameters   {_params(r['params_before'])} -> {_params(r['params_after_min'])} .. "
        f"{_params(r['params_after_max'])}  (all alpha = 0 .. all alpha != 0; "
        f"-{100 * (1 - r['params_after_min'] / r['params_before']):.2f} % .. "
        f"-{100 * (1 - r['params_after_max'] / r['params_before']):.2f} %)",
        f"  weights      {human(r['bytes_before'])} -> {human(r['bytes_after_min'])} .. "
        f"{human(r['bytes_after_max'])}  ({st['dtype']})",
    ]
    # the same contexts every command states the KV saving at: 2,048 tokens and the model's maximum
    for i, kv in enumerate(p.get("kv") or [dict(context=r["context"], before=r["kv_before"], after=r["kv_after"],
                                                saving=r["kv_saving"], is_max=False)]):
        top = " (the model's maximum)" if kv["is_max"] else ""
        lines.append(f"  {'KV cache' if i == 0 else '':<12} {human(kv['before'])} -> {human(kv['after'])} per "
                     f"{kv['context']}-token sequence{top} (-{100 * kv['saving']:.1f} %, any alphas)")
    for i, kv in enumerate(p.get("kv_window") or []):
        top = " (the model's maximum)" if kv["is_max"] else ""
        label = f"as window layers of {p['window']} tokens (--window)" if i == 0 else ""
        lines.append(f"  {'':<12} {human(kv['before'])} -> {human(kv['after'])} per {kv['context']}-token "
                     f"sequence{top} (-{100 * kv['saving']:.1f} %) {label}".rstrip())
    return lines


def plan_cmd(
    model: str = typer.Option("smollm2-135m", "--model", "-m",
                              help=f"A config.json, a model folder, a hub id, or a preset: {', '.join(PRESETS)}."),
    layers: int = typer.Option(8, "--layers", "-k", help="Search / prune the top K decoder layers."),
    calib: str = typer.Option("16x512", "--calib", help="Calibration size: windows x tokens (as harp prune)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda (what the runtime line counts)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass."),
    chunk_tokens: int = typer.Option(1024, "--chunk-tokens", help="LM-head rows per chunk."),
    activations: str = typer.Option("device", "--activations", help="device | cpu | disk (streamed search)."),
    context: int = typer.Option(None, "--context", help="Also give the KV-cache figures at this sequence length "
                                                       "(always: 2,048 tokens and the model's maximum)."),
    memory: float = typer.Option(None, "--memory", help="Device memory in GiB: say whether each search fits."),
    window: int = typer.Option(None, "--window", help="Also give the KV saving if the K layers become window "
                                                     "layers of W tokens (harp prune --window W)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Peak memory of the alpha search (streamed and in-memory) and the size / KV savings of the result,
    from the model's config alone: know before starting whether a search fits your GPU."""
    if window is not None and window < 1:
        raise ValueError(f"--window {window}: a window is a whole number of tokens, at least 1.")
    if context is not None and context < 1:
        raise ValueError(f"--context {context}: must be a positive number of tokens.")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device {device!r}: use cpu or cuda.")
    cfg = load_config(model)
    # as harp prune refuses it: planning to prune a pruned model again plans nothing real
    refuse_pruned(cfg, lambda block: f"{model} is already a HARP-pruned checkpoint (layers {sorted(block.layers)}): "
                  "plan on the original model (its config.json, folder or preset).")
    n, s = parse_calib(calib)
    p = full_plan(cfg, layers, n, s, dtype=dtype, device=device, batch_size=batch_size, chunk_tokens=chunk_tokens,
                  activations=activations, context=context, window=window)
    console = Console(width=200)
    if as_json:
        console.print_json(json.dumps(p))
        return
    for line in render(p, model, memory):
        console.print(line, highlight=False, markup=False)
