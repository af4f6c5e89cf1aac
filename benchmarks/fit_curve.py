"""Perplexity against KV-cache saving for HARP, the least-squares refit and Attention Drop, in domain
(WikiText-2) and out of domain (Tiny Shakespeare), calibrated on WikiText-2 validation only.

    python benchmarks/fit_curve.py                       # SmolLM2-135M, k = 2,4,6,8,10,12 (resumable)
    python benchmarks/fit_curve.py --ks 4,8 --out benchmarks/results/fit_smollm2_k48
    python benchmarks/fit_curve.py --model FILE.gguf --ks 4 --shakespeare PATH

Methods (harp.methods): harp (top k, greedy alpha search), harp-ls (top k, closed-form refit),
attention-drop (He et al.: k most redundant attention sub-layers removed), harp-any-ls (Attention Drop's
layers, refit); with --with-harp-any also harp-any (Attention Drop's layers, alpha search). Each row
records the calibration perplexity, the selection/search/fit seconds, and perplexity on the first
--eval-tokens tokens of WikiText-2-raw test and of the out-of-domain text, 1024-token windows.

Writes OUT.json (every row, resumable: rows already measured are kept), OUT.md (the table, the number of
layers each method prunes within +10 % and +25 % perplexity) and OUT.png (perplexity against KV saving).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ("harp", "harp-ls", "attention-drop", "harp-any-ls")
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: the bundled SmolLM2-135M)")
    ap.add_argument("--ks", default="2,4,6,8,10,12")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--with-harp-any", action="store_true", help="also harp-any (alpha search on Attention Drop's "
                    "layers; its search is redone for every k)")
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--shakespeare", default=str(SHAKESPEARE), help="out-of-domain evaluation text")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/fit_curve_smollm2")
    a = ap.parse_args()

    import torch

    import harp
    from harp.engine.text import bos_token, calibration_windows, evaluation_windows, load_text, tokenize
    from harp.methods.selector import Selector, applied
    from harp.model.accounting import kv_bytes_after_prefill
    from harp.util.fsio import write_json_atomic

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state_path = out.with_suffix(".json")
    state = json.loads(state_path.read_text()) if state_path.exists() else {"rows": {}}
    rows: dict[str, dict] = state["rows"]

    t0 = time.perf_counter()
    model, tok = harp.load_model(a.model)
    bos = bos_token(tok)
    calib = calibration_windows(tokenize(tok, load_text("wikitext2-valid")), a.calib_windows, a.seq_len, 0, bos=bos)
    evs = {
        "wikitext2": evaluation_windows(tokenize(tok, load_text("wikitext2-raw-test")), 1024, a.eval_tokens, bos=bos),
        "shakespeare": evaluation_windows(tokenize(tok, load_text(a.shakespeare)), 1024, a.eval_tokens, bos=bos),
    }
    num = model.config.num_hidden_layers
    state.update(model=a.model or "smollm2-135m", num_layers=num, calib=f"wikitext2-valid {tuple(calib.shape)}",
                 eval_tokens=a.eval_tokens, bos_token=bos)
    print(f"loaded in {time.perf_counter() - t0:.0f} s; calibration {tuple(calib.shape)}", flush=True)

    def save() -> None:
        write_json_atomic(state_path, state)

    kv0 = kv_bytes_after_prefill(model)
    if "original" not in rows:
        rows["original"] = {"k": 0, "method": "original", "kv_reduction": 0.0,
                            "ppl": {n: harp.perplexity(model, w).ppl for n, w in evs.items()}}
        save()
    print("original", rows["original"]["ppl"], flush=True)

    methods = [m for m in a.methods.split(",") if m] + (["harp-any"] if a.with_harp_any else [])
    ks = sorted({int(k) for k in a.ks.split(",")}, reverse=True)  # largest k first: greedy prefixes are reused
    sel = Selector(model, calib, log=lambda m: print(m, flush=True))
    for k in ks:
        for m in methods:
            key = f"{k}:{m}"
            if key in rows:
                continue
            t = time.perf_counter()
            plan = sel.select(m, k)
            seconds = time.perf_counter() - t
            with applied(model, plan):
                ppl = {n: harp.perplexity(model, w).ppl for n, w in evs.items()}
                kv = kv_bytes_after_prefill(model)
            rows[key] = {"k": k, "method": m, "layers": sorted(plan.layers), "alphas": plan.alphas,
                         "calib_ppl": plan.calib_ppl, "select_seconds": seconds,
                         "search_seconds": plan.search_seconds, "kv_reduction": 1 - kv / kv0, "ppl": ppl}
            save()
            print(f"k={k} {m}: " + ", ".join(f"{n} {v:.2f}" for n, v in ppl.items())
                  + f" (calib {plan.calib_ppl or float('nan'):.2f}, {plan.search_seconds:.0f} s)", flush=True)
    state["seconds"] = time.perf_counter() - t0
    save()
    out.with_suffix(".md").write_text(markdown(state, methods))
    plot(state, methods, out.with_suffix(".png"))
    print(f"wrote {out}.json/.md/.png", file=sys.stderr)


def within(state: dict, method: str, domain: str, frac: float) -> int:
    """The largest k whose perplexity stays within +frac of the original (0 if none)."""
    base = state["rows"]["original"]["ppl"][domain]
    ks = [r["k"] for r in state["rows"].values() if r["method"] == method and r["ppl"][domain] <= base * (1 + frac)]
    return max(ks, default=0)


def markdown(state: dict, methods: list[str]) -> str:
    rows = state["rows"]
    ks = sorted({r["k"] for r in rows.values() if r["k"]})
    o = rows["original"]["ppl"]
    lines = [f"# Perplexity vs KV saving: {state['model']} ({state['num_layers']} layers)", "",
             f"Calibration {state['calib']} (WikiText-2 validation); evaluation: first {state['eval_tokens']} tokens "
             "of WikiText-2-raw test (in domain) and of Tiny Shakespeare (out of domain), 1024-token windows. "
             f"Original: {o['wikitext2']:.2f} / {o['shakespeare']:.2f}.", "",
             "| k | KV saved | " + " | ".join(f"{m} wiki / shakesp." for m in methods) + " |",
             "|---:|---:|" + "---:|" * len(methods)]
    for k in ks:
        cells = []
        for m in methods:
            r = rows.get(f"{k}:{m}")
            cells.append("–" if r is None else f"{r['ppl']['wikitext2']:.2f} / {r['ppl']['shakespeare']:.2f}")
        kv = next(r["kv_reduction"] for r in rows.values() if r["k"] == k)
        lines.append(f"| {k} | {100 * kv:.1f} % | " + " | ".join(cells) + " |")
    lines += ["", "| method | layers within +10 % (wiki / shakesp.) | within +25 % | seconds (select + search/fit, "
              "largest k) |", "|---|---:|---:|---:|"]
    for m in methods:
        big = max((r for r in rows.values() if r["method"] == m), key=lambda r: r["k"], default=None)
        lines.append(f"| {m} | {within(state, m, 'wikitext2', 0.10)} / {within(state, m, 'shakespeare', 0.10)} | "
                     f"{within(state, m, 'wikitext2', 0.25)} / {within(state, m, 'shakespeare', 0.25)} | "
                     f"{'' if big is None else round(big['search_seconds'])} |")
    return "\n".join(lines) + "\n"


def plot(state: dict, methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    rows = state["rows"]
    for ax, domain, title in zip(axes, ("wikitext2", "shakespeare"), ("WikiText-2 (in domain)",
                                                                     "Tiny Shakespeare (out of domain)"), strict=True):
        for m in methods:
            pts = sorted((r["kv_reduction"], r["ppl"][domain]) for r in rows.values() if r["method"] == m)
            if pts:
                ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=m)
        ax.axhline(rows["original"]["ppl"][domain], color="k", lw=0.8, ls="--", label="original")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("KV cache saved (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("perplexity (log scale)")
    axes[0].legend()
    fig.suptitle(f"{state['model']}: calibrated on WikiText-2 validation only")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
