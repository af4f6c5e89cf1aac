"""Issue 23: do window layers need sink tokens? SmolLM2-135M, the top 8 layers as window layers of 64 or 256
tokens, with 0, 4 or 16 sink tokens (the first positions kept visible, as StreamingLLM's attention sinks);
perplexity on 4 x 1024 tokens of WikiText-2-raw test and of Tiny Shakespeare (nothing is fitted: window
layers have no calibration). About 4 minutes on 2 CPU cores.

    python benchmarks/window_sinks.py   # -> benchmarks/results/window_sinks_smollm2_k8.json
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import harp  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "window_sinks_smollm2_k8.json"


def main() -> None:
    torch.set_num_threads(2)
    model, tok = harp.load_model()
    top = list(range(22, 30))
    res: dict[str, float] = {}
    for name in ("wikitext2-raw-test", "tinyshakespeare"):
        windows = harp.evaluation_windows(harp.tokenize(tok, harp.load_text(name)), 1024, 4 * 1024)
        res[f"{name} original"] = harp.perplexity(model, windows).ppl
        for w, s in ((64, 0), (64, 4), (64, 16), (256, 0), (256, 4)):
            t = time.time()
            with harp.temporarily_pruned(model, [], [], windows={i: w for i in top}, sinks=s):
                res[f"{name} w{w} s{s}"] = harp.perplexity(model, windows).ppl
            print(f"{name}: window {w}, sinks {s}: ppl {res[f'{name} w{w} s{s}']:.3f} ({time.time() - t:.0f} s)",
                  flush=True)
        print(f"{name}: original {res[f'{name} original']:.3f}", flush=True)
    OUT.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
