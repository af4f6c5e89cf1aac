"""HARP GGUFs in llama.cpp: export, check against harp, and time original vs pruned.

    python benchmarks/bench_llamacpp.py export --out-dir runs/llamacpp [--dtype f32,f16]
    python benchmarks/bench_llamacpp.py check  --out-dir runs/llamacpp [--dtype f32]
    python benchmarks/bench_llamacpp.py speed  runs/llamacpp/original-f16.gguf runs/llamacpp/pruned-f16.gguf

`export` prunes the bundled default model (SmolLM2-135M-Instruct) with PLAN below (or uses
--checkpoint DIR, a HARP checkpoint) and writes original and pruned GGUFs of llama.cpp's `deci`
architecture: both go through the same exporter, so they differ only by HARP.

`check` runs the pruned GGUF in llama.cpp and harp's transformers model side by side: greedy
continuation of a fixed prompt (llama.cpp's own sampler at temperature 0 vs transformers `generate`
without sampling; reports the length of the common prefix) and perplexity on WikiText-2-raw test
windows (same token ids for both; llama.cpp's logits scored here).

`speed` times prefill and decode of the two GGUFs in llama.cpp at each context length. The two models
are loaded once and measured interleaved (original, pruned, original, ...) after a warm-up round, and
medians over the repeats are reported with the pruned/original ratio of each pair. Prefill: `n` tokens
into an empty KV cache (batch 512). Decode: `--decode` single-token steps right after that prefill, on
top of its `n`-token cache. The 1-minute load average before and after is recorded: on a shared
machine, numbers taken under load are noisy (the interleaving keeps the ratios fair, not the speeds).
The ideal bounds are computed from the GGUFs themselves (docs/method.md, "Speed bounds"): prefill FLOPs ratio
(2 FLOPs per weight per token + 4 d per attended key) and decode bytes-read ratio (every weight
once + the K and V cache of layers that still have attention, f16).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from default_plan import PLAN_ALPHAS, PLAN_LAYERS  # what `make prune` finds on the default model

PROMPT = "The history of the printing press begins in"


def _harp_model(checkpoint: str | None) -> tuple[Any, Any, Any]:
    """(original model, pruned model, tokenizer); the pruned one from `checkpoint` or PLAN."""
    import harp
    from harp.model.load import load_model

    original, tok = load_model(None)
    if checkpoint:
        pruned, _ = load_model(checkpoint, with_tokenizer=False)
    else:
        pruned, _ = load_model(None, with_tokenizer=False)
        harp.prune(pruned, layers=PLAN_LAYERS, alphas=PLAN_ALPHAS)
    return original, pruned, tok


def cmd_export(a: argparse.Namespace) -> None:
    from harp.export.run import export_gguf

    original, pruned, tok = _harp_model(a.checkpoint)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for dtype in a.dtype.split(","):
        for name, model in (("original", original), ("pruned", pruned)):
            t0 = time.perf_counter()
            p = export_gguf(
                model, out / f"{name}-{dtype}.gguf", dtype=dtype, tokenizer=tok, overwrite=a.overwrite
            )
            print(f"{p}  {p.stat().st_size / 2**20:.0f} MiB  ({time.perf_counter() - t0:.1f} s)")


def _wikitext_ids(tok: Any, n_tokens: int) -> list[int]:
    from harp.engine.text import load_text

    text = load_text("wikitext2-raw-test").text  # WikiText-2-raw test, bundled with harp
    return tok(text[: n_tokens * 8], add_special_tokens=False)["input_ids"][:n_tokens]


def harp_nll(model: Any, ids: list[int]) -> float:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))


def harp_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def cmd_check(a: argparse.Namespace) -> None:
    from harp.bench import llamacpp

    original, pruned, tok = _harp_model(a.checkpoint)
    prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
    ids = _wikitext_ids(tok, a.windows * a.window)
    windows = [ids[i * a.window : (i + 1) * a.window] for i in range(a.windows)]
    n_scored = sum(len(w) - 1 for w in windows)
    results: dict[str, Any] = {"prompt": PROMPT, "windows": a.windows, "window": a.window}
    for which in a.models.split(","):
        model = {"original": original, "pruned": pruned}[which]
        want = harp_greedy(model, prompt, a.tokens)
        ppl_harp = math.exp(sum(harp_nll(model, w) for w in windows) / n_scored)
        print(f"harp (transformers) {which}: ppl {ppl_harp:.4f} on {a.windows} x {a.window} tokens")
        print(f"  harp greedy: {tok.decode(want)!r}")
        res: dict[str, Any] = {"harp_ppl": ppl_harp, "gguf": {}}
        for dtype in a.dtype.split(","):
            path = Path(a.out_dir) / f"{which}-{dtype}.gguf"
            n_ctx = max(a.window, len(prompt) + a.tokens + 8)
            llm = llamacpp.open_gguf(path, n_ctx=n_ctx, logits_all=True, n_threads=a.threads)
            same_tokens = llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == prompt
            got = llamacpp.greedy(llm, prompt, a.tokens)
            ppl_lc = math.exp(sum(llamacpp.nll(llm, w)[0] for w in windows) / n_scored)
            llm.close()
            match = common_prefix(want, got)
            rel = ppl_lc / ppl_harp - 1
            print(
                f"  {which} {dtype}: greedy match {match}/{a.tokens} tokens; llama.cpp ppl {ppl_lc:.4f} "
                f"({100 * rel:+.3f} % vs harp); llama.cpp tokenises the prompt identically: {same_tokens}"
            )
            if match < a.tokens:
                print(f"    llama.cpp greedy: {tok.decode(got)!r}")
            res["gguf"][dtype] = {"match": match, "of": a.tokens, "ppl": ppl_lc, "rel_diff": rel}
        results[which] = res
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


# ---------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------


def gguf_cost(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What one token costs in this GGUF: weight elements per block type, attention geometry."""
    import gguf

    r = gguf.GGUFReader(path)
    arch = r.get_field("general.architecture").contents()

    def arr(key: str) -> list[int]:
        v = r.get_field(f"{arch}.{key}").contents()
        return list(v) if isinstance(v, list) else [v] * r.get_field(f"{arch}.block_count").contents()

    heads, kv = arr("attention.head_count"), arr("attention.head_count_kv")
    head_dim = r.get_field(f"{arch}.attention.key_length").contents()
    matrix_elems = weight_bytes = 0
    embd = out = None
    for t in r.tensors:
        if t.name == "token_embd.weight":
            embd = t
            continue
        if t.name == "output.weight":
            out = t
        elif len(t.shape) == 2:
            matrix_elems += int(np.prod(t.shape))
        weight_bytes += int(t.n_bytes)
    head = embd if out is None else out  # tied: the LM head is the embedding matrix
    if out is None:
        weight_bytes += int(embd.n_bytes)
    else:  # one embedding row per token
        weight_bytes += int(embd.n_bytes) // int(embd.shape[-1])
    attn_layers = [i for i, k in enumerate(kv) if k > 0]
    return {
        "matrix_elems": matrix_elems,
        "lm_head_elems": int(np.prod(head.shape)),
        "weight_bytes": weight_bytes,
        "attn_layers": len(attn_layers),
        "d": max(heads) * head_dim,
        "kv_dim": max(kv) * head_dim,
        "size": os.path.getsize(path),
    }


def prefill_flops(c: dict[str, Any], n: int) -> float:
    """Layer matrices on every token, attention 4 d per attended key, LM head on the last token only
    (llama.cpp computes logits for the last token when logits_all is off)."""
    return (
        2.0 * c["matrix_elems"] * n
        + 4.0 * c["d"] * c["attn_layers"] * n * (n + 1) / 2
        + 2.0 * c["lm_head_elems"]
    )


def decode_bytes(c: dict[str, Any], n: int, kv_bytes: int = 2) -> float:
    return c["weight_bytes"] + 2.0 * kv_bytes * c["kv_dim"] * c["attn_layers"] * n


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _time_prefill_decode(llm: Any, ids: list[int], steps: list[int]) -> dict[str, tuple[float, float]]:
    """Per clock: seconds for a prefill of `ids` into an empty KV cache, and seconds per token of the
    single-token decode steps on top of it. 'cpu' is the process's CPU time: with one thread it is the
    compute time alone, much less disturbed by other processes competing for the cores than 'wall'."""
    llm.reset()
    t0 = {k: c() for k, c in CLOCKS.items()}
    llm.eval(ids)
    t1 = {k: c() for k, c in CLOCKS.items()}
    for tok in steps:
        llm.eval([tok])
    t2 = {k: c() for k, c in CLOCKS.items()}
    return {k: (t1[k] - t0[k], (t2[k] - t1[k]) / len(steps)) for k in CLOCKS}


def _summary(n: int, t: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    pre = [o / q for o, q in zip(t["original"]["prefill"], t["pruned"]["prefill"], strict=True)]
    dec = [o / q for o, q in zip(t["original"]["decode"], t["pruned"]["decode"], strict=True)]
    return {
        "prefill_tok_s": {k: n / statistics.median(v["prefill"]) for k, v in t.items()},
        "decode_tok_s": {k: 1 / statistics.median(v["decode"]) for k, v in t.items()},
        "prefill_speedup": statistics.median(pre),
        "prefill_speedup_range": [min(pre), max(pre)],
        "decode_speedup": statistics.median(dec),
        "decode_speedup_range": [min(dec), max(dec)],
    }


def cmd_speed(a: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from harp.bench import llamacpp
    from harp.model.load import default_model_dir

    contexts = [int(x) for x in a.contexts.split(",")]
    n_ctx = max(contexts) + a.decode + 8
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    ids = _wikitext_ids(tok, max(contexts) + a.decode)
    paths = {"original": a.original, "pruned": a.pruned}
    costs = {k: gguf_cost(p) for k, p in paths.items()}
    llms = {
        k: llamacpp.open_gguf(p, n_ctx=n_ctx, n_threads=a.threads, n_batch=a.batch, flash_attn=a.flash_attn)
        for k, p in paths.items()
    }
    clocks = ["wall", "cpu"] if a.threads == 1 else ["wall"]  # CPU time of >1 thread counts spinning
    rows = []
    load_before = os.getloadavg()
    for n in contexts:
        prompt, steps = ids[:n], ids[n : n + a.decode]
        t = {c: {k: {"prefill": [], "decode": []} for k in paths} for c in clocks}
        for rep in range(a.repeats + 1):  # round 0 is warm-up
            for k in paths:  # interleaved: original, pruned, original, pruned, ...
                res = _time_prefill_decode(llms[k], prompt, steps)
                for c in clocks:
                    if rep:
                        t[c][k]["prefill"].append(res[c][0])
                        t[c][k]["decode"].append(res[c][1])
        row: dict[str, Any] = {
            "context": n,
            "prefill_bound": prefill_flops(costs["original"], n) / prefill_flops(costs["pruned"], n),
            "decode_bound": decode_bytes(costs["original"], n) / decode_bytes(costs["pruned"], n),
        }
        for c in clocks:
            row[c] = _summary(n, t[c])
        rows.append(row)
        for c in clocks:
            print(f"[{c}] " + _fmt_row(row, c), flush=True)
    for llm in llms.values():
        llm.close()
    info = {
        "engine": f"llama.cpp via llama-cpp-python {llamacpp.require_llama_cpp().__version__}",
        "threads": a.threads,
        "batch": a.batch,
        "flash_attn": a.flash_attn,
        "repeats": a.repeats,
        "decode_steps": a.decode,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "files": {k: {"path": str(p), "MiB": costs[k]["size"] / 2**20} for k, p in paths.items()},
        "rows": rows,
    }
    for c in clocks:
        print(f"\n{c} clock:\n" + markdown_table(info, c))
    if a.json:
        Path(a.json).write_text(json.dumps(info, indent=2))


def _fmt_row(r: dict[str, Any], clock: str) -> str:
    m = r[clock]
    return (
        f"ctx {r['context']:5d}: prefill {m['prefill_tok_s']['original']:7.1f} -> "
        f"{m['prefill_tok_s']['pruned']:7.1f} tok/s "
        f"(x{m['prefill_speedup']:.3f}, bound x{r['prefill_bound']:.3f}); decode "
        f"{m['decode_tok_s']['original']:6.1f} -> {m['decode_tok_s']['pruned']:6.1f} tok/s "
        f"(x{m['decode_speedup']:.3f}, bound x{r['decode_bound']:.3f})"
    )


def markdown_table(info: dict[str, Any], clock: str = "wall") -> str:
    lines = [
        "| context | prefill tok/s original | pruned | speed-up (min-max) | FLOP bound "
        "| decode tok/s original | pruned | speed-up (min-max) | bytes bound |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in info["rows"]:
        m = r[clock]
        pr, dr = m["prefill_speedup_range"], m["decode_speedup_range"]
        lines.append(
            f"| {r['context']} | {m['prefill_tok_s']['original']:.0f} | {m['prefill_tok_s']['pruned']:.0f} "
            f"| x{m['prefill_speedup']:.2f} ({pr[0]:.2f}-{pr[1]:.2f}) | x{r['prefill_bound']:.2f} "
            f"| {m['decode_tok_s']['original']:.1f} | {m['decode_tok_s']['pruned']:.1f} "
            f"| x{m['decode_speedup']:.2f} ({dr[0]:.2f}-{dr[1]:.2f}) | x{r['decode_bound']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write original and pruned GGUFs")
    e.add_argument("--out-dir", default="runs/llamacpp")
    e.add_argument("--dtype", default="f32,f16", help="comma-separated: f32, f16, q8_0")
    e.add_argument("--checkpoint", help="a HARP checkpoint (default: the default model pruned with PLAN)")
    e.add_argument("--overwrite", action="store_true")
    c = sub.add_parser("check", help="greedy match and perplexity, llama.cpp vs harp")
    c.add_argument("--out-dir", default="runs/llamacpp")
    c.add_argument("--dtype", default="f32")
    c.add_argument("--checkpoint")
    c.add_argument("--tokens", type=int, default=64)
    c.add_argument("--windows", type=int, default=4)
    c.add_argument("--window", type=int, default=512)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--models", default="pruned,original", help="which GGUFs to check: pruned, original")
    c.add_argument("--json")
    s = sub.add_parser("speed", help="prefill/decode speed, original vs pruned GGUF")
    s.add_argument("original")
    s.add_argument("pruned")
    s.add_argument("--contexts", default="512,1024,2048,4096")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--decode", type=int, default=32)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--batch", type=int, default=512)
    s.add_argument("--flash-attn", action="store_true")
    s.add_argument("--json")
    a = p.parse_args(argv)
    {"export": cmd_export, "check": cmd_check, "speed": cmd_speed}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
