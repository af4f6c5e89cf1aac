"""Reproduce the README's method comparison on the default model (SmolLM2-135M-Instruct).

    python benchmarks/compare_smollm2.py                    # k = 4 and k = 8, writes runs/compare-smollm2
    python benchmarks/compare_smollm2.py --layers 8 --out runs/compare-k8

It is exactly this harp command (printed, and recorded in compare.md):

    harp compare --layers 4,8 --methods all --tasks lambada,piqa,gsm8k,nq_open \\
        --limit 50,gsm8k=8,nq_open=32 --calib-windows 2 --seq-len 256 --eval-tokens 8192 \\
        --max-gen-toks 64 --out runs/compare-smollm2

The budget is sized so that the k = 8 part (original + 8 methods, 4 tasks + perplexity) finishes
within 30 minutes on 2 CPU cores: k = 8 rows come first, and the log's timestamps say when they are
done. Small limits make task scores coarse (50 items: +-7 points); their stderr is in the table.

Needs the task data folder (--data-dir, e.g. ../shared/data on the development machines, or
$HARP_DATA_DIR, or ./data). A long run is resumable: rerun the same command after an interruption.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The README settings: small enough for a 2-core CPU, the same for every method.
README = {
    "methods": "all",
    "tasks": "lambada,piqa,gsm8k,nq_open",
    # per row at these limits, 2 threads: perplexity ~30 s, LAMBADA/PIQA ~15 s each, GSM8K (one lm-eval
    # batch of 8 long 8-shot prompts) ~40 s, NQ-open ~30 s
    "limit": "50,gsm8k=8,nq_open=32",
    "calib_windows": 2,
    "seq_len": 256,
    "eval_tokens": 8192,
    # GSM8K's 8-shot chain-of-thought answers are 30-80 tokens; a 135M model rambles to the cap and
    # never reaches "The answer is N", and decoding is most of a row's time on a CPU.
    "max_gen_toks": 64,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="4,8", help="k values, e.g. 4,8")
    ap.add_argument("--out", default="runs/compare-smollm2")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 is much faster than 2 when other jobs share the cores)")
    ap.add_argument("--methods", default=README["methods"],
                    help="subset of methods, e.g. harp-any,attention-drop (default: all, the README table)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: k=2, 3 items per task, 2 x 128 calibration")
    a = ap.parse_args()

    from rich.console import Console

    from harp.jobs.compare import CompareSettings, run_compare

    s = dict(README, methods=a.methods)
    layers = a.layers
    if a.quick:
        s.update(limit="3", calib_windows=2, seq_len=128, eval_tokens=2048)
        layers = "2"
    args = ["compare", "--layers", layers, "--methods", s["methods"], "--tasks", s["tasks"], "--limit", s["limit"],
            "--calib-windows", str(s["calib_windows"]), "--seq-len", str(s["seq_len"]),
            "--eval-tokens", str(s["eval_tokens"]), "--max-gen-toks", str(s["max_gen_toks"]), "--out", a.out]
    if a.data_dir:
        args += ["--data-dir", a.data_dir]
    if a.threads:
        args += ["--threads", str(a.threads)]
    if a.overwrite:
        args += ["--overwrite"]
    command = "harp " + " ".join(shlex.quote(x) for x in args)
    console = Console()
    console.print(command, highlight=False)
    t0 = time.perf_counter()
    rep = run_compare(
        CompareSettings(ks=[int(k) for k in layers.split(",")], methods=s["methods"], tasks=s["tasks"],
                        limit=s["limit"], data_dir=a.data_dir, calib_windows=s["calib_windows"], seq_len=s["seq_len"],
                        eval_tokens=s["eval_tokens"], max_gen_toks=s["max_gen_toks"], threads=a.threads,
                        out=a.out, overwrite=a.overwrite,
                        progress=sys.stderr.isatty(), command=command),
        log=lambda m: console.print(f"[{time.perf_counter() - t0:7.0f} s] {m}", highlight=False),
    )
    print(rep.to_markdown())
    print(f"wall time {rep.seconds['total'] / 60:.1f} min -> {rep.out}")


if __name__ == "__main__":
    main()
