"""Search cost: HARP's cached alpha search vs the naive one (a full-model forward per candidate).

Same model, same calibration windows, same process, one after the other. Prints wall time, the
ratio, and decoder-layer-forward counts against the ideal counts of docs/method.md, and checks
that both searches chose the same alphas.

    python benchmarks/bench_search_cost.py                       # SmolLM2-135M, k = 8, 4 x 256 tokens
    python benchmarks/bench_search_cost.py --k 8 --calib-windows 8 --seq-len 512 --json out.json
"""

from __future__ import annotations

import argparse
import time

import torch

import harp
from harp.engine.text import calibration_windows, load_text, tokenize
from harp.methods.search import ideal_layer_forwards, parse_grid, search_alphas
from harp.util.fsio import write_json_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--grid", default="0:1:0.1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model, tok = harp.load_model(args.model)
    w = calibration_windows(tokenize(tok, load_text(None)), args.calib_windows, args.seq_len, seed=0)
    num = model.config.num_hidden_layers
    grid = parse_grid(args.grid)
    runs = {}
    for method in ("cached", "naive"):
        t = time.perf_counter()
        r = search_alphas(model, w, args.k, grid=grid, method=method, progress=True)
        runs[method] = {"seconds": time.perf_counter() - t, "alphas": r.alphas, "layer_forwards": r.layer_forwards,
                        "head_evals": r.head_evals, "final_calib_ppl": r.final_ppl,
                        "ideal_layer_forwards": ideal_layer_forwards(num, args.k, len(grid), method)}
    c, n = runs["cached"], runs["naive"]
    result = {
        "model": args.model or "smollm2-135m", "layers": num, "k": args.k, "grid_size": len(grid),
        "calib_tokens": int(w.numel()), "threads": args.threads, "runs": runs,
        "time_ratio_naive_over_cached": n["seconds"] / c["seconds"],
        "layer_forward_ratio": n["layer_forwards"] / c["layer_forwards"],
        "same_alphas": c["alphas"] == n["alphas"],
    }
    print(f"\nmodel {result['model']}: L = {num}, k = {args.k}, G = {len(grid)}, "
          f"{args.calib_windows} x {args.seq_len} calibration tokens, {args.threads} threads")
    print(f"{'search':8} {'seconds':>9} {'layer fwd':>10} {'ideal':>7} {'head evals':>11}  alphas (top first)")
    for m, r in runs.items():
        print(f"{m:8} {r['seconds']:9.1f} {r['layer_forwards']:10d} {r['ideal_layer_forwards']:7d} "
              f"{r['head_evals']:11d}  {r['alphas']}")
    print(f"naive / cached: {result['time_ratio_naive_over_cached']:.2f}x wall time, "
          f"{result['layer_forward_ratio']:.2f}x decoder-layer forwards; same alphas: {result['same_alphas']}")
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
