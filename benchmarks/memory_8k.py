"""Issue 22's memory check: does an 8k-token forward of a 1.5B model fit in this machine's 24 GiB on CPU?

    python benchmarks/memory_8k.py                     # Qwen2.5-1.5B shape, 8,192 tokens, float32
    python benchmarks/memory_8k.py --context 4096 --window 1024   # also with the top 7 layers windowed

Memory does not depend on the weights' values, so the model is Qwen2.5-(Coder-)1.5B's published shape
(28 layers, hidden 1536, 12 heads / 2 KV heads, MLP 8960, vocabulary 151,936, tied embeddings) with random
weights: nothing to download. Peak resident memory (getrusage) is printed after each phase, in one process:
building the model, `harp.position_losses` over one window (what `harp eval --eval-seq-len 8192` runs: sdpa,
no cache, the LM head in 1,024-row chunks), and a greedy generation of 8 tokens after an 8k prompt (what the
passkey / niah scoring runs, KV cache included). Writes benchmarks/results/memory_8k_qwen1.5b.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QWEN_1_5B = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True, rms_norm_eps=1e-6,
)


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--window", type=int, default=None, help="also make the top 7 layers window layers of W tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/memory_8k_qwen1.5b.json")
    a = ap.parse_args(argv)

    import torch
    import transformers

    import harp

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows: list[dict[str, object]] = []

    def phase(name: str, t0: float) -> None:
        rows.append({"phase": name, "seconds": round(time.time() - t0, 1), "peak_rss_gib": round(peak_gib(), 2)})
        print(f"{name}: {rows[-1]['seconds']} s, peak RSS {rows[-1]['peak_rss_gib']} GiB", flush=True)

    t0 = time.time()
    cfg = transformers.Qwen2Config(**QWEN_1_5B, attn_implementation="sdpa")
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    if a.window:
        harp.prune(model, [], [], windows={i: a.window for i in range(21, 28)}, sinks=4)
    params = sum(p.numel() for p in model.parameters())
    phase(f"build ({params / 1e9:.2f} B parameters, float32)", t0)
    ids = torch.randint(0, cfg.vocab_size, (1, a.context))
    t0 = time.time()
    with torch.no_grad():
        losses = harp.position_losses(model, ids)
    phase(f"position_losses at {a.context} tokens (ppl {losses.ppl:.0f}, random weights)", t0)
    t0 = time.time()
    with torch.no_grad():
        model.generate(ids[:, :-8], max_new_tokens=8, do_sample=False)
    phase(f"greedy generation of 8 tokens after {a.context - 8}", t0)
    result = {
        "model": "Qwen2.5-1.5B shape, random weights, float32, sdpa",
        "context": a.context,
        "window_layers": {"layers": list(range(21, 28)), "window": a.window, "sinks": 4} if a.window else None,
        "threads": a.threads,
        "machine_ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "phases": rows,
        "command": "python benchmarks/memory_8k.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
