"""How much the refit's test perplexity depends on which calibration windows it was fitted on.

    python benchmarks/fit_seeds.py                       # SmolLM2-135M, seeds 0-4 (~12 min on 2 cores)
    python benchmarks/fit_seeds.py --seeds 0,1,2 --calib-windows 32

`make prune`'s settings (8 x 256 tokens of WikiText-2 validation) except the seed that picks the windows.
For every seed: the refit of the top 4 and top 8 layers (harp-ls) and of Attention Drop's 8 layers, scored
on the same windows (harp-any-ls); perplexity on the first 8,192 tokens of WikiText-2-raw test and of Tiny
Shakespeare (out of domain), 1024-token windows. The spread across seeds is the precision of any single
row in docs/results.md: two variants closer than it are not told apart by one calibration sample.

Writes OUT.json (resumable: rows already measured are kept) and OUT.md (per seed, then mean and range).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
ROWS = (("harp-ls", 4), ("harp-ls", 8), ("harp-any-ls", 8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--shakespeare", default=str(SHAKESPEARE), help="out-of-domain evaluation text")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch

    import harp
    from harp.engine.text import bos_token, calibration_windows, evaluation_windows, load_text, tokenize
    from harp.methods.scores import attention_drop_scores, pick

    torch.set_num_threads(a.threads)
    out = Path(a.out or f"benchmarks/results/fit_seeds_smollm2_c{a.calib_windows}")
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    state = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    model, tok = harp.load_model()
    bos = bos_token(tok)
    ids = tokenize(tok, load_text("wikitext2-valid"))
    evs = {"wikitext2": evaluation_windows(tokenize(tok, load_text("wikitext2-raw-test")), 1024, 8192, bos=bos),
           "shakespeare": evaluation_windows(tokenize(tok, load_text(a.shakespeare)), 1024, 8192, bos=bos)}
    n = model.config.num_hidden_layers
    if "original" not in state:
        state["original"] = {d: harp.perplexity(model, w).ppl for d, w in evs.items()}
    for seed in (int(s) for s in a.seeds.split(",")):
        calib = calibration_windows(ids, a.calib_windows, 256, seed, bos=bos)
        any_depth = None
        for method, k in ROWS:
            key = f"{method} k={k} seed={seed}"
            if key in state["rows"]:
                continue
            if method == "harp-ls":
                layers = list(range(n - 1, n - 1 - k, -1))
            else:
                any_depth = any_depth or attention_drop_scores(model, calib)
                layers = sorted(pick(any_depth, k, highest=True), reverse=True)
            fit = harp.fit_layers(model, calib, layers)
            with harp.temporarily_pruned(model, layers, [1.0] * k, fit.maps):
                ppl = {d: harp.perplexity(model, w).ppl for d, w in evs.items()}
            state["rows"][key] = {"method": method, "k": k, "seed": seed, "layers": layers, "ppl": ppl,
                                  "fit_seconds": fit.seconds}
            print(f"{key}: layers {sorted(layers)} " + ", ".join(f"{d} {v:.2f}" for d, v in ppl.items()), flush=True)
            path.write_text(json.dumps(state, indent=1))
    path.write_text(json.dumps(state, indent=1))

    o = state["original"]
    seeds = sorted({r["seed"] for r in state["rows"].values()})
    lines = [f"# Refit perplexity across calibration samples, SmolLM2-135M ({a.calib_windows} x 256 tokens)", "",
             f"WikiText-2 validation windows chosen by seed; perplexity WikiText-2 / Shakespeare (first 8,192 "
             f"tokens each). Original: {o['wikitext2']:.2f} / {o['shakespeare']:.2f}.", "",
             "| method | k | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | range |",
             "|---|---:|" + "---:|" * (len(seeds) + 2)]
    for method, k in ROWS:
        rs = [state["rows"].get(f"{method} k={k} seed={s}") for s in seeds]
        if not all(rs):
            continue
        cells = [f"{r['ppl']['wikitext2']:.2f} / {r['ppl']['shakespeare']:.2f}" for r in rs]
        stats = []
        for d in ("wikitext2", "shakespeare"):
            v = [r["ppl"][d] for r in rs]
            stats.append((statistics.mean(v), min(v), max(v)))
        lines.append(f"| {method} | {k} | " + " | ".join(cells)
                     + f" | {stats[0][0]:.2f} / {stats[1][0]:.2f} | "
                     + f"{stats[0][1]:.2f}–{stats[0][2]:.2f} / {stats[1][1]:.2f}–{stats[1][2]:.2f} |")
    any_rows = [r for r in state["rows"].values() if r["method"] == "harp-any-ls"]
    if any_rows:
        per_seed = sorted(any_rows, key=lambda r: r["seed"])
        lines += ["", "Attention Drop's 8 layers per seed: "
                  + "; ".join(f"seed {r['seed']}: {sorted(r['layers'])}" for r in per_seed)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.json/.md")


if __name__ == "__main__":
    main()
