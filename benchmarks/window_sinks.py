"""Issue 23: do window layers need sink tokens? The top k layers as window layers of 64 or 256 tokens, with
0, 4 or 16 sink tokens (the first positions kept visible, as StreamingLLM's attention sinks); perplexity on
4 x 1024 tokens of WikiText-2-raw test and of Tiny Shakespeare (nothing is fitted: window layers have no
calibration, so both texts are held out). SmolLM2-135M (k = 8 of 30) takes about 4 minutes on 2 CPU cores;
Qwen2.5-Coder-1.5B (the second family, k = 7 of 28) about 15.

    python benchmarks/window_sinks.py             # -> benchmarks/results/window_sinks_smollm2_k8.json
    python benchmarks/window_sinks.py --qwen      # -> benchmarks/results/window_sinks_qwen_k7.json
                                                  #    (the GGUF as benchmarks/qwen_coder.py caches it)

Every cell is written as soon as it is measured (atomic replace); a rerun measures only what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import harp  # noqa: E402
from harp.util.fsio import write_json_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (window, sinks), the question first: does a window of 256 need its sinks? 16 sinks last
CELLS = ((256, 4), (256, 0), (64, 4), (64, 0), (64, 16), (256, 16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qwen", action="store_true", help="Qwen2.5-Coder-1.5B-Instruct (k = 7) instead of SmolLM2")
    ap.add_argument("--k", type=int, default=None, help="top layers windowed (default 8 for SmolLM2, 7 for Qwen)")
    ap.add_argument("--windows", type=int, default=4, help="1024-token windows per text")
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.qwen:
        from qwen_coder import default_cache, ensure_gguf  # benchmarks/ is on sys.path when run as a script

        model, tok = harp.load_model(str(ensure_gguf(default_cache())))
        k, name = a.k or 7, "qwen"
    else:
        model, tok = harp.load_model()
        k, name = a.k or 8, "smollm2"
    out = RESULTS / f"window_sinks_{name}_k{k}.json"
    res: dict[str, float] = json.loads(out.read_text()) if out.is_file() else {}
    num = model.config.num_hidden_layers
    top = list(range(num - k, num))

    def save() -> None:
        write_json_atomic(out, res)

    texts = ("wikitext2-raw-test", "tinyshakespeare")
    windows = {x: harp.evaluation_windows(harp.tokenize(tok, harp.load_text(x)), 1024, a.windows * 1024)
               for x in texts}
    for cell in (None, *CELLS):  # each cell on both texts before the next: a run cut short answers on both
        for text in texts:
            key = f"{text} original" if cell is None else f"{text} w{cell[0]} s{cell[1]}"
            what = "original" if cell is None else f"window {cell[0]}, sinks {cell[1]}"
            if key in res:
                print(f"{text}: {what}: ppl {res[key]:.3f} (kept)", flush=True)
                continue
            t = time.time()
            with harp.temporarily_pruned(model, [], [], windows={i: cell[0] for i in top} if cell else None,
                                         sinks=cell[1] if cell else 0):
                res[key] = harp.perplexity(model, windows[text]).ppl
            save()
            print(f"{text}: {what}: ppl {res[key]:.3f} ({time.time() - t:.0f} s)", flush=True)

if __name__ == "__main__":
    main()
