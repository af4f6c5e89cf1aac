"""Issue 23's speed evidence: window layers vs full pruning (bypass) vs the original, at long contexts.

    python benchmarks/bench_window.py                                  # 2k/4k/8k, windows 256 and 1024, k = 8
    python benchmarks/bench_window.py --context 2048 --windows 256 --repeats 2   # quicker

What it does:
1. Writes three HARP checkpoints of the bundled SmolLM2-135M under --checkpoints (reused by later runs): the top 8
   layers bypassed with the fixed plan of benchmarks/default_plan.py (what `make prune` finds; speed depends on
   the alphas only through alpha == 0), and the same 8 layers made window layers of w tokens (+ 4 sinks, the
   default of `harp prune --window`) for each w in --windows.
2. For each pruned checkpoint, runs `harp.bench.run_bench` (the code behind `harp bench`) against the original,
   in lockstep (the two prefills take turns at every sub-layer, decode alternates step by step), so every
   speed-up is a ratio measured side by side in one run: prefill of n tokens into an empty cache, then
   --new-tokens greedy decode steps; FLOP and bytes bounds from harp.model.accounting (a window layer's
   attention counted as O(n w), its KV as w - 1 + sinks tokens); KV-cache bytes read from the cache object.
3. Writes each pair's bench.json/md/png under OUT/<method>/ and one summary.md (+ printed) with, per
   context, prefill and decode speed-up [95 % CI] against the bound, and KV bytes of every model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from default_plan import PLAN_ALPHAS, PLAN_LAYERS  # what `make prune` finds on the default model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SINKS = 4


def checkpoint(out: Path, name: str, windows: int | None) -> Path:
    """The HARP checkpoint `name` in folder `out`: PLAN bypassed (windows None) or PLAN's layers as window layers."""
    import harp
    from harp.model.checkpoint import is_harp_checkpoint
    from harp.model.load import load_model

    path = out / name
    if is_harp_checkpoint(path):
        return path
    m, tok = load_model(None)
    if windows is None:
        harp.prune(m, layers=PLAN_LAYERS, alphas=PLAN_ALPHAS)
    else:
        harp.prune(m, [], [], windows={i: windows for i in PLAN_LAYERS}, sinks=SINKS)
    harp.save(m, path, tokenizer=tok, recipe={"note": f"benchmarks/bench_window.py {name}", "search": None})
    return path


def summary(results: dict[str, dict[str, Any]]) -> str:
    """One Markdown table: per context and method, speed-ups against the original with their bounds."""
    lines = [
        "| context | method | prefill ms (orig -> pruned) | prefill x [95 % CI] | FLOP bound | "
        "decode tok/s (orig -> pruned) | decode x | bytes bound | KV MiB (orig -> pruned) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    contexts = sorted({r["context"] for res in results.values() for r in res["contexts"]})
    for n in contexts:
        for name, res in results.items():
            row = next((r for r in res["contexts"] if r["context"] == n), None)
            if row is None:
                continue
            p, d, kv = row["prefill"], row.get("decode", {}), row["kv_cache_bytes"]
            lo, hi = p["speedup_ci95"]
            dec = (
                f"{d['original']['median_tokens_per_s']:.1f} -> {d['pruned']['median_tokens_per_s']:.1f} | "
                f"{d['speedup']:.3f} | {d['bytes_bound']:.3f}"
                if d
                else "– | – | –"
            )
            lines.append(
                f"| {n} | {name} | {p['original']['median_ms']:.0f} -> {p['pruned']['median_ms']:.0f} | "
                f"{p['speedup']:.3f} [{lo:.3f}-{hi:.3f}] | {p['bound']:.3f} | {dec} | "
                f"{kv['original'] / 2**20:.1f} -> {kv['pruned'] / 2**20:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", default="2048,4096,8192")
    ap.add_argument("--windows", default="256,1024", help="window sizes to benchmark, e.g. 256,1024")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/bench_window_smollm2_k8")
    ap.add_argument("--checkpoints", default="runs/bench_window/checkpoints", help="where the pruned models go")
    ap.add_argument("--overwrite", action="store_true", help="measure again the pairs already on disk")
    a = ap.parse_args(argv)

    from harp.bench.run import parse_contexts, run_bench, write_bench

    out = Path(a.out)
    contexts = parse_contexts(a.context)
    methods = {"bypass": None} | {f"window-{w}": int(w) for w in a.windows.split(",") if w.strip()}
    results: dict[str, dict[str, Any]] = {}
    for name, w in methods.items():
        done = out / name / "bench.json"
        if done.exists() and not a.overwrite:
            results[name] = json.loads(done.read_text())
            print(f"{name}: kept {done}", file=sys.stderr)
            continue
        pruned = checkpoint(Path(a.checkpoints), name, w)
        result = run_bench(
            None,
            str(pruned),
            contexts,
            new_tokens=a.new_tokens,
            repeats=a.repeats,
            warmup=a.warmup,
            threads=a.threads,
            progress=lambda m, name=name: print(f"{name}: {m}", file=sys.stderr, flush=True),
        )
        result["command"] = "python benchmarks/bench_window.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_bench(result, out / name, overwrite=True)
        results[name] = result
    table = summary(results)
    head = (
        "# Window layers vs bypass vs original: SmolLM2-135M, top 8 layers, lockstep pairs\n\n"
        f"Command: `python benchmarks/bench_window.py {' '.join(argv if argv is not None else sys.argv[1:])}`. "
        f"Each row is one pair measured side by side (original vs that method); window layers keep {SINKS} sinks.\n\n"
    )
    (out / "summary.md").write_text(head + table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
