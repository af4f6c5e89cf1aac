"""How precise are `harp bench`'s ratios on this machine? Time the default model against an identical
copy of itself, where the true ratio is exactly 1, with both timing methods of harp.bench.

    python benchmarks/bench_noise.py                       # contexts 256,1024, 12 rounds, 2 threads
    python benchmarks/bench_noise.py --context 512 --rounds 20 --out runs/bench_noise

Per context and round, the prefill of the same tokens is timed
- "forward": a whole forward of copy A, then a whole forward of copy B (what `--timing forward` does);
- "lockstep": both forwards taking turns at every attention and MLP sub-layer (`--timing lockstep`,
  the default of `harp bench`),
and the B/A time ratio is recorded. The spread of these ratios around 1 is the noise floor of each
method: a measured speed-up is only meaningful where it differs from the bound by more than that.
Writes noise.json and noise.md to --out and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model to compare with itself (default: the bundled SmolLM2-135M)")
    ap.add_argument("--context", default="256,1024")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_noise")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)

    import torch

    from harp import bench
    from harp.engine.text import bos_token
    from harp.model.load import load_model

    out = Path(a.out)
    paths = {"json": out / "noise.json", "table": out / "noise.md"}
    if not a.overwrite and any(p.exists() for p in paths.values()):
        raise SystemExit(f"{out} already holds noise.json/noise.md: pass --overwrite or another --out.")
    torch.set_num_threads(a.threads)
    model_a, tok = load_model(a.model)
    model_b = copy.deepcopy(model_a)
    kw = bench.cache_kwarg(model_a)
    contexts = bench.parse_contexts(a.context)
    ids = bench.prompt_tokens(model_a.config.vocab_size, max(contexts), seed=0, bos=bos_token(tok))
    rows = []
    for n in contexts:
        x = ids[:, :n]
        gc.collect()
        bench.lockstep_round(model_a, model_b, x, 0, (kw, kw), 0)  # warm-up
        ratios: dict[str, list[float]] = {"forward": [], "lockstep": []}
        for r in range(a.rounds):
            ta, tb = bench.lockstep_round(model_a, model_b, x, 0, (kw, kw), first=r % 2)
            ratios["lockstep"].append(tb["prefill_s"] / ta["prefill_s"])
            ta, tb = bench.measure(model_a, x, 0, kw), bench.measure(model_b, x, 0, kw)
            ratios["forward"].append(tb["prefill_s"] / ta["prefill_s"])
            print(
                f"context {n} round {r + 1}/{a.rounds}: lockstep {ratios['lockstep'][-1]:.3f}, "
                f"forward {ratios['forward'][-1]:.3f}",
                file=sys.stderr,
                flush=True,
            )
        for method, rs in ratios.items():
            lo, hi = bench.median_ci95(rs)
            rows.append(
                {
                    "context": n,
                    "timing": method,
                    "rounds": len(rs),
                    "median": statistics.median(rs),
                    "ci95": [lo, hi],
                    "stdev": statistics.stdev(rs) if len(rs) > 1 else 0.0,
                    "min": min(rs),
                    "max": max(rs),
                    "ratios": rs,
                }
            )
    table = [
        "| context | timing | rounds | median ratio (true: 1) | 95 % CI of median | st. dev. of one ratio | min–max |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        table.append(
            f"| {r['context']} | {r['timing']} | {r['rounds']} | {r['median']:.3f} | "
            f"{r['ci95'][0]:.3f}–{r['ci95'][1]:.3f} | {100 * r['stdev']:.1f} % | {r['min']:.3f}–{r['max']:.3f} |"
        )
    result = {
        "command": "python benchmarks/bench_noise.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": a.model or "smollm2-135m (bundled default)",
        "threads": a.threads,
        "what": "prefill time ratio copy B / copy A of the same model; true value 1",
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    paths["table"].write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
