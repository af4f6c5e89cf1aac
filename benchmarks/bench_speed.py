"""Reproduce the README's "Speed and memory" table: HARP vs original on the default model.

    python benchmarks/bench_speed.py                      # contexts 256..4096, 2 threads, lockstep timing
    python benchmarks/bench_speed.py --context 256,512,1024,2048,4096,8192 --out runs/bench_8k

What it does:
1. Loads the bundled default model (SmolLM2-135M-Instruct, 30 layers, float32) and prunes its top 8
   layers with PLAN below, unless --pruned DIR names a HARP checkpoint to use instead. The alpha
   search is not part of this script: PLAN is what `make prune` finds on the default settings
   (benchmarks/results/prune_smollm2_k8.json). Speed depends on the alphas only through
   alpha == 0 (attention sub-layer gone) vs alpha != 0 (v_proj + folded o_proj kept): 1 + 7 here.
2. Saves the pruned model as a HARP checkpoint (under --out, reused on later runs) so that each
   model's peak memory can be measured alone in a fresh process.
3. Runs `harp.bench.run_bench` (the code behind `harp bench`): per context, a warm-up round, then
   at least --repeats rounds (more until --min-seconds of timed work) of original and pruned
   interleaved - by default in lockstep: the two prefills take turns at every attention and MLP
   sub-layer, decode alternates step by step; prefill of n tokens into an empty cache (last-token
   logits), then --new-tokens greedy decode steps; pair-by-pair ratios with a bootstrap 95 %
   interval; FLOP and bytes bounds from harp.model.accounting; KV-cache bytes from the cache object.
4. Writes bench.json, bench.md (the table) and bench.png (runtime vs context, speed-up and bound)
   to --out and prints the table and the acceptance checks of the README.

The equivalent CLI call, once the pruned checkpoint exists:

    harp bench --pruned runs/bench_speed/pruned-k8 --context 256,512,1024,2048,4096 --threads 2 \\
        --repeats 8 --min-seconds 90 --new-tokens 16 --out runs/bench_speed --overwrite
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from default_plan import PLAN_ALPHAS, PLAN_LAYERS  # what `make prune` finds on the default model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pruned_checkpoint(out: Path, model: str | None) -> Path:
    """The HARP checkpoint of PLAN applied to `model`, written once under `out`."""
    import harp
    from harp.model.checkpoint import is_harp_checkpoint, read_config
    from harp.model.load import load_model

    path = out / "pruned-k8"
    if is_harp_checkpoint(path):
        harp_cfg = read_config(path)["harp"]
        if [sorted(harp_cfg["layers"]), harp_cfg["alphas"]] != [sorted(PLAN_LAYERS), _ascending_alphas()]:
            raise SystemExit(
                f"{path} was pruned with another plan than benchmarks/default_plan.py "
                f"(layers {harp_cfg['layers']}, alphas {harp_cfg['alphas']}): delete it to rebuild it, "
                "or pass --pruned DIR to benchmark it as it is."
            )
        return path
    m, tok = load_model(model)
    harp.prune(m, layers=PLAN_LAYERS, alphas=PLAN_ALPHAS)
    harp.save(m, path, tokenizer=tok, recipe={"note": "benchmarks/bench_speed.py fixed plan", "search": None})
    return path


def _ascending_alphas() -> list[float]:
    """PLAN_ALPHAS in the order a checkpoint's config stores them (layers ascending)."""
    return [a for _, a in sorted(zip(PLAN_LAYERS, PLAN_ALPHAS, strict=True))]


def acceptance(result: dict[str, Any]) -> list[str]:
    """The README's claims, checked on this run (reported, not asserted)."""
    lines = []
    rows = {r["context"]: r for r in result["contexts"]}
    k = len(result["models"]["pruned"]["harp_layers"])
    L = result["models"]["pruned"]["num_layers"]
    kv_ok = all(r["kv_cache_bytes"]["pruned"] * L == r["kv_cache_bytes"]["original"] * (L - k) for r in rows.values())
    lines.append(f"KV-cache bytes fall by exactly {k}/{L} at every context: {'yes' if kv_ok else 'NO'}")
    for n, r in rows.items():
        pre = r["prefill"]
        lines.append(
            f"context {n}: prefill saving {100 * pre['measured_saving']:.1f} % vs ideal "
            f"{100 * pre['ideal_saving']:.1f} % -> {100 * pre['fraction_of_ideal_saving']:.0f} % of ideal "
            f"({'>= 80 %' if pre['fraction_of_ideal_saving'] >= 0.8 else '< 80 %'})"
        )
    speedups = [rows[n]["prefill"]["speedup"] for n in sorted(rows)]
    grows = all(b >= a for a, b in zip(speedups, speedups[1:], strict=False))
    lines.append(
        "prefill speed-up grows with context: "
        + ("yes" if grows else "not monotonically")
        + " ("
        + ", ".join(
            f"{rows[n]['prefill']['speedup']:.3f} [{rows[n]['prefill']['speedup_ci95'][0]:.3f}-"
            f"{rows[n]['prefill']['speedup_ci95'][1]:.3f}]"
            for n in sorted(rows)
        )
        + "; median [95 % CI])"
    )
    for n, r in rows.items():
        if "decode" in r:
            d = r["decode"]
            lines.append(
                f"context {n}: decode {d['original']['median_tokens_per_s']:.1f} -> "
                f"{d['pruned']['median_tokens_per_s']:.1f} tok/s "
                f"(x{d['speedup']:.3f}, bytes bound x{d['bytes_bound']:.3f})"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="original model (default: the bundled SmolLM2-135M)")
    ap.add_argument("--pruned", default=None, help="a HARP checkpoint to use instead of pruning with PLAN")
    ap.add_argument("--context", default="256,512,1024,2048,4096")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--min-seconds", type=float, default=90.0, help="per context: rounds until this much timed work")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timing", default="lockstep", choices=["lockstep", "forward"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-isolated-memory", action="store_true", help="skip the per-model peak-RSS processes")
    ap.add_argument("--out", default="runs/bench_speed")
    ap.add_argument("--overwrite", action="store_true", help="replace bench.json/.md/.png from an earlier run")
    a = ap.parse_args(argv)

    from harp.bench.run import output_paths, parse_contexts, run_bench, write_bench
    from harp.report.bench import bench_table

    out = Path(a.out)
    contexts = parse_contexts(a.context)
    output_paths(out, a.overwrite)  # refuse to clobber before the long run, not after it
    pruned = Path(a.pruned) if a.pruned else pruned_checkpoint(out, a.model)
    result = run_bench(
        a.model,
        str(pruned),
        contexts,
        new_tokens=a.new_tokens,
        repeats=a.repeats,
        warmup=a.warmup,
        threads=a.threads,
        isolated_memory=not a.no_isolated_memory,
        timing=a.timing,
        min_seconds=a.min_seconds,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    result["command"] = "python benchmarks/bench_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    written = write_bench(result, out, overwrite=a.overwrite)
    print(bench_table(result))
    print()
    print("\n".join(acceptance(result)))
    for kind, path in written.items():
        print(f"wrote {kind}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
