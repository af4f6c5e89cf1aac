"""Peak memory of the streamed vs the in-memory alpha search, as the model gets deeper (issue 7).

Synthetic models with SmolLM2-135M's shape (hidden 576, 9 heads / 3 KV heads, MLP 1536, vocab 49152,
tied embeddings) but 30, 60 and 120 decoder layers, random weights, saved as sharded safetensors in a
temporary folder. Each search runs in a fresh subprocess; its peak resident set (VmHWM of that process) is what is
reported, next to `harp plan`'s prediction from the config alone.
With --default the real default model is searched both ways too and the alphas are compared.

    python benchmarks/bench_streamed_memory.py                      # 30/60/120 layers, k=4, calib 8x256
    python benchmarks/bench_streamed_memory.py --default --default-calib 16x512 --default-k 8

RSS is robust to a busy machine; the seconds printed are not (single runs on shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
)
MiB = 2**20


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


# ------------------------------------------------------------------------------------------------
# children
# ------------------------------------------------------------------------------------------------


def child_make(folder: str, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2, num_hidden_layers=layers)).eval()
    model.save_pretrained(folder, max_shard_size="100MB")


def child_search(mode: str, folder: str, windows_file: str, k: int, grid: str, batch_size: int,
                 chunk_tokens: int, threads: int, activations: str) -> None:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (the model code both modes import)

    from harp.methods.search import search_alphas, streamed_search
    from harp.model.load import load_model

    torch.set_num_threads(threads)
    windows = torch.load(windows_file)
    base = _status("VmRSS")
    t = time.perf_counter()
    if mode == "in-memory":
        model, _ = load_model(folder, with_tokenizer=False)
        res = search_alphas(model, windows, k, grid=grid, batch_size=batch_size, chunk_tokens=chunk_tokens)
    else:
        res = streamed_search(folder, windows, k, grid=grid, batch_size=batch_size, chunk_tokens=chunk_tokens,
                              activations=activations)
    out = {"mode": mode, "peak": _status("VmHWM"), "base": base, "seconds": time.perf_counter() - t,
           "layers": res.layers, "alphas": res.alphas, "log": res.log, "layer_forwards": res.layer_forwards}
    print("RESULT " + json.dumps(out))


# ------------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------------


def _run_child(args: list[str]) -> dict[str, Any]:
    """Run this script as a child in a fresh process and return its RESULT json (peak = its own VmHWM)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HARP_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"child {args[:2]} failed:\n{r.stderr[-3000:]}")
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"child {args[:2]} printed no result:\n{r.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def _search_pair(folder: Path, windows_file: Path, k: int, grid: str, batch_size: int, chunk_tokens: int,
                 threads: int, activations: str) -> dict[str, dict[str, Any]]:
    res = {}
    for mode in ("in-memory", "streamed"):
        r = _run_child(["--child-search", mode, str(folder), str(windows_file), str(k), grid, str(batch_size),
                           str(chunk_tokens), str(threads), activations])
        res[mode] = r
        print(f"    {mode:<9}  peak RSS {r['peak'] / MiB:7.0f} MiB  ({r['seconds']:.0f} s)", flush=True)
    return res


def _plan(config: Any, k: int, n: int, s: int, batch_size: int, chunk_tokens: int, streamed: bool) -> int:
    from harp.jobs.plan import search_memory

    return search_memory(config, k, n, s, batch_size=batch_size, chunk_tokens=chunk_tokens, streamed=streamed,
                         dtype="float32", device="cpu")["total"]


def _parse_calib(s: str) -> tuple[int, int]:
    from harp.jobs.plan import parse_calib

    return parse_calib(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="30,60,120", help="synthetic model depths")
    ap.add_argument("--k", type=int, default=4, help="searched (top) layers")
    ap.add_argument("--calib", default="8x256", help="calibration windows N x seq_len")
    ap.add_argument("--grid", default="0:1:0.5")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--activations", default="device", help="streamed search: device | cpu | disk")
    ap.add_argument("--default", action="store_true", help="also search the real default model both ways")
    ap.add_argument("--default-k", type=int, default=8)
    ap.add_argument("--default-calib", default="16x512")
    ap.add_argument("--default-grid", default="0:1:0.1")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--workdir", default=None, help="where the synthetic models go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write all results here")
    a = ap.parse_args()

    import torch
    from transformers import LlamaConfig

    n, s = _parse_calib(a.calib)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="harp-bench-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"settings": vars(a), "synthetic": [], "default": None}
    try:
        if not a.no_synthetic:
            print(f"streamed vs in-memory alpha search, peak RSS (fresh process each); k={a.k}, calibration {n}x{s}, "
                  f"grid {a.grid}, batch {a.batch_size}, float32, {a.threads} thread(s)", flush=True)
            windows_file = work / "windows.pt"
            torch.save(torch.randint(0, SMOLLM2["vocab_size"], (n, s), generator=torch.Generator().manual_seed(0)),
                       windows_file)
            for depth in [int(x) for x in a.layers.split(",")]:
                folder = work / f"smollm2-shape-{depth}"
                print(f"  {depth} layers: writing random weights to {folder}", flush=True)
                if not (folder / "config.json").is_file():
                    _run_child_make(folder, depth)
                pair = _search_pair(folder, windows_file, a.k, a.grid, a.batch_size, a.chunk_tokens, a.threads,
                                    a.activations)
                cfg = LlamaConfig(**SMOLLM2, num_hidden_layers=depth)
                row = {
                    "layers": depth,
                    "shard_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                    "in_memory_peak": pair["in-memory"]["peak"],
                    "streamed_peak": pair["streamed"]["peak"],
                    "base": pair["streamed"]["base"],
                    "plan_in_memory": _plan(cfg, a.k, n, s, a.batch_size, a.chunk_tokens, False),
                    "plan_streamed": _plan(cfg, a.k, n, s, a.batch_size, a.chunk_tokens, True),
                    "same_alphas": pair["in-memory"]["alphas"] == pair["streamed"]["alphas"],
                    "same_log": pair["in-memory"]["log"] == pair["streamed"]["log"],
                    "seconds": {m: pair[m]["seconds"] for m in pair},
                }
                report["synthetic"].append(row)
                shutil.rmtree(folder, ignore_errors=True)
            _print_synthetic(report["synthetic"])
        if a.default:
            report["default"] = _default_model(a, work)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))


def _run_child_make(folder: Path, depth: int) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, __file__, "--child-make", str(folder), str(depth)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"making the {depth}-layer model failed:\n{r.stderr[-3000:]}")


def _print_synthetic(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    ref = rows[0]["streamed_peak"]
    print()
    print("| layers | weights on disk | in-memory peak RSS | streamed peak RSS | streamed vs first | "
          "plan in-memory | plan streamed | same alphas / log |")
    print("|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['shard_bytes'] / MiB:.0f} MiB | {r['in_memory_peak'] / MiB:.0f} MiB | "
              f"{r['streamed_peak'] / MiB:.0f} MiB | {100 * (r['streamed_peak'] / ref - 1):+.1f} % | "
              f"{r['plan_in_memory'] / MiB:.0f} MiB | {r['plan_streamed'] / MiB:.0f} MiB | "
              f"{'yes' if r['same_alphas'] else 'NO'} / {'yes' if r['same_log'] else 'NO'} |")
    print(f"(process RSS after imports, before any weights: {rows[0]['base'] / MiB:.0f} MiB; included above)")


def _default_model(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from harp.engine.text import DEFAULT_CALIB, calibration_windows, load_text, tokenize
    from harp.model.load import default_model_dir

    folder = default_model_dir()
    n, s = _parse_calib(a.default_calib)
    tok = AutoTokenizer.from_pretrained(str(folder))
    windows = calibration_windows(tokenize(tok, load_text(None, DEFAULT_CALIB)), n, s, 0)
    windows_file = work / "default-windows.pt"
    torch.save(windows, windows_file)
    print(f"\ndefault model ({folder}): k={a.default_k}, calibration {n}x{s} (WikiText-2 valid), grid "
          f"{a.default_grid}", flush=True)
    pair = _search_pair(folder, windows_file, a.default_k, a.default_grid, a.batch_size, a.chunk_tokens, a.threads,
                        a.activations)
    cfg = AutoConfig.from_pretrained(str(folder))
    out = {"folder": str(folder), "k": a.default_k, "calib": [n, s], "grid": a.default_grid}
    for mode, streamed in (("in-memory", False), ("streamed", True)):
        plan = _plan(cfg, a.default_k, n, s, a.batch_size, a.chunk_tokens, streamed)
        measured = pair[mode]["peak"]
        out[mode] = {"peak": measured, "plan": plan, "alphas": pair[mode]["alphas"],
                     "final_ppl": min(e["ppl"] for e in pair[mode]["log"] if e["layer"] == pair[mode]["layers"][-1]),
                     "seconds": pair[mode]["seconds"]}
        print(f"  {mode:<9}  measured peak {measured / MiB:6.0f} MiB   plan {plan / MiB:6.0f} MiB   "
              f"plan/measured {plan / measured:.2f}")
    same = pair["in-memory"]["alphas"] == pair["streamed"]["alphas"]
    out["same_alphas"] = same
    out["same_log"] = pair["in-memory"]["log"] == pair["streamed"]["log"]
    print(f"  alphas in-memory {pair['in-memory']['alphas']}")
    print(f"  alphas streamed  {pair['streamed']['alphas']}")
    print(f"  identical alphas: {same}; identical perplexity log: {out['same_log']}")
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-make":
        child_make(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--child-search":
        m, f, w, k, g, b, c, t, act = sys.argv[2:11]
        child_search(m, f, w, int(k), g, int(b), int(c), int(t), act)
    else:
        main()
