"""Which refit is the default: the measurements behind `harp prune --fit lstsq --ridge auto --fit-prior auto`.

    python benchmarks/fit_variants.py                 # SmolLM2-135M, top 8 of 30 layers (~10 min idle)
    python benchmarks/fit_variants.py --k 4 --no-scale

On `make prune`'s settings (8 x 256 calibration tokens of WikiText-2 validation, seed 0) it prunes the
top k layers with HARP's searched alphas (the greedy search) and with several refits, and measures
perplexity on the first 8,192 tokens of WikiText-2-raw test (in domain) and of Tiny Shakespeare (out of
domain; never seen in calibration):

- `ridge 1e-3, prior zero`: a plain ridge regression with a fixed small ridge (the first probe);
- `ridge auto, prior auto`: ridge and prior (zero, or the best scalar multiple of the layer's own W_O R)
  chosen per layer by 4-fold cross-validation over calibration windows (the default);
- `ridge auto, prior alpha`: the same, always shrinking toward the scaled W_O R;
- `... x 32 windows`: the default with four times as much calibration text;
- `... + searched scale`: the default, then HARP's greedy top-down search of a scale per layer on
  top of the fitted maps (grid 0..1.3), i.e. the fit followed by the paper's search.

Writes OUT.json and OUT.md (default benchmarks/results/fit_variants_smollm2_k8).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--no-scale", action="store_true", help="skip the (slow) searched-scale variant")
    ap.add_argument("--shakespeare", default=str(SHAKESPEARE))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch

    import harp
    from harp.engine.text import bos_token, calibration_windows, evaluation_windows, load_text, tokenize

    torch.set_num_threads(a.threads)
    out = Path(a.out or f"benchmarks/results/fit_variants_smollm2_k{a.k}")
    model, tok = harp.load_model()
    bos = bos_token(tok)
    ids = tokenize(tok, load_text("wikitext2-valid"))
    calib = {n: calibration_windows(ids, n, 256, 0, bos=bos) for n in (8, 32)}
    evs = {"wikitext2": evaluation_windows(tokenize(tok, load_text("wikitext2-raw-test")), 1024, 8192, bos=bos),
           "shakespeare": evaluation_windows(tokenize(tok, load_text(a.shakespeare)), 1024, 8192, bos=bos)}
    layers = list(range(model.config.num_hidden_layers - 1, model.config.num_hidden_layers - 1 - a.k, -1))
    rows: dict[str, dict] = {}

    def measure(name: str, alphas: list[float], maps: dict | None, seconds: float, **extra: object) -> None:
        with harp.temporarily_pruned(model, layers, alphas, maps):
            ppl = {n: harp.perplexity(model, w).ppl for n, w in evs.items()}
        rows[name] = {"ppl": ppl, "seconds": seconds, "alphas": alphas, **extra}
        print(f"{name}: " + ", ".join(f"{n} {v:.2f}" for n, v in ppl.items()) + f" ({seconds:.0f} s)", flush=True)

    rows["original"] = {"ppl": {n: harp.perplexity(model, w).ppl for n, w in evs.items()}}
    t = time.perf_counter()
    s = harp.search_alphas(model, calib[8], layers)
    measure("HARP, searched alphas", s.alphas, None, time.perf_counter() - t)
    fits = {}
    for name, n, ridge, prior in (("refit, ridge 1e-3, prior zero", 8, 1e-3, "zero"),
                                  ("refit, ridge auto, prior auto (default)", 8, "auto", "auto"),
                                  ("refit, ridge auto, prior alpha", 8, "auto", "alpha"),
                                  ("refit, ridge auto, prior auto, 32 windows", 32, "auto", "auto")):
        t = time.perf_counter()
        f = harp.fit_layers(model, calib[n], layers, ridge=ridge, prior=prior)
        fits[name] = f
        measure(name, [1.0] * a.k, f.maps, time.perf_counter() - t,
                per_layer=[f.fits[i].to_dict() for i in f.layers])
    if not a.no_scale:
        f = fits["refit, ridge auto, prior auto (default)"]
        t = time.perf_counter()
        sc = harp.search_alphas(model, calib[8], layers, grid="0:1.3:0.1", maps=f.maps)
        measure("refit (default) + searched scale", sc.alphas, f.maps, f.seconds + time.perf_counter() - t)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"k": a.k, "layers": layers, "rows": rows}, indent=1))
    o = rows["original"]["ppl"]
    lines = [f"# Refit variants, SmolLM2-135M, top {a.k} of 30 layers", "",
             "Calibration 8 x 256 tokens of WikiText-2 validation (seed 0) unless stated; perplexity on the first "
             "8,192 tokens of WikiText-2-raw test and of Tiny Shakespeare. Gap closed = share of the "
             "HARP-to-original gap.", "",
             "| variant | WikiText-2 | gap closed | Tiny Shakespeare | gap closed | seconds |",
             "|---|---:|---:|---:|---:|---:|",
             f"| original | {o['wikitext2']:.2f} | | {o['shakespeare']:.2f} | | |"]
    h = rows["HARP, searched alphas"]["ppl"]
    for name, r in rows.items():
        if name == "original":
            continue
        p = r["ppl"]
        gaps = [(h[d] - p[d]) / (h[d] - o[d]) if h[d] != o[d] else 0.0 for d in ("wikitext2", "shakespeare")]
        lines.append(f"| {name} | {p['wikitext2']:.2f} | {100 * gaps[0]:.0f} % | {p['shakespeare']:.2f} | "
                     f"{100 * gaps[1]:.0f} % | {r['seconds']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.json/.md")


if __name__ == "__main__":
    main()
