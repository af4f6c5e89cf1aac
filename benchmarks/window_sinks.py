"""Issue 23: do window layers need sink tokens? The top k layers as window layers of 64 or 256 tokens, with
0, 4 or 16 sink tokens (the first positions kept visible, as StreamingLLM's attention sinks); perplexity on
4 x 1024 tokens of WikiText-2-raw test and of Tiny Shakespeare (nothing is fitted: window layers have no
calibration, so both texts are held out). SmolLM2-135M (k = 8 of 30) takes about 4 minutes on 2 CPU cores;
Qwen2.5-Coder-1.5B (the second family, k = 7 of 28) about 15.

    python benchmarks/window_sinks.py             # -> benchmarks/results/window_sinks_smollm2_k8.json
    python benchmarks/window_sinks.py --qwen      # -> benchmarks/results/window_sinks_qwen_k7.json
                                                  #    (the GGUF as benchmarks/qwen_coder.py caches it)

Every cell is written as soon as it is measured (atomic replace); a rerun measures only what is missing.

`--fitted` adds a question for serving: vLLM's sliding window drops the first tokens, so it cannot keep sink
tokens, but its attention takes a per-head sink *logit* (gpt-oss's `sinks`: one more softmax column with no
value). Can fitted constants stand in for 4 sink tokens in the top k windows of 256? Per head, on 4 x 1024
tokens of WikiText-2 *validation* with 4 real sinks: b = the mean log of the sinks' unnormalised attention mass
(at positions the window has left them), v = their mean output, p = the mean share b takes beside the window.
Cells: `logit` (the column b alone), `logit+value` (the column b with value v: exact share, needs the value
in the kernel) and `logit+const` (the column b and the constant p * v added to the attention output, which an
engine folds into o_proj's bias: what vLLM could serve). They run in a probe attention function of this
script (eager, 1024 x 1024 logits per head), not in harp; WikiText-2 test and Shakespeare stay held out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import harp  # noqa: E402
from harp.util.fsio import write_json_atomic  # noqa: E402

SINKS = 4  # the sink tokens the fitted constants stand in for
FITTED = ("logit", "logit+value", "logit+const")

RESULTS = Path(__file__).resolve().parent / "results"
# (window, sinks), the question first: does a window of 256 need its sinks? 16 sinks last
CELLS = ((256, 4), (256, 0), (64, 4), (64, 0), (64, 16), (256, 16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qwen", action="store_true", help="Qwen2.5-Coder-1.5B-Instruct (k = 7) instead of SmolLM2")
    ap.add_argument("--k", type=int, default=None, help="top layers windowed (default 8 for SmolLM2, 7 for Qwen)")
    ap.add_argument("--windows", type=int, default=4, help="1024-token windows per text")
    ap.add_argument("--fitted", action="store_true", help="also the fitted sink constants, window 256 (see above)")
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
    if a.fitted:
        todo = [(m, x) for m in FITTED for x in texts if f"{x} w256 {m}" not in res]
        if todo:
            probe = SinkProbe(model, set(top), 256)
            calib = harp.evaluation_windows(harp.tokenize(tok, harp.load_text("wikitext2-valid")), 1024,
                                            a.windows * 1024)
            t = time.time()
            fit = probe.fit(calib)
            res[f"fit w256 {name}"] = {str(i): {"b": f["b"].tolist(), "share": f["share"].tolist()}
                                        for i, f in fit.items()}
            print(f"fitted sink constants of layers {sorted(fit)} on {calib.numel():,} validation tokens "
                  f"({time.time() - t:.0f} s); mean share {torch.stack([f['share'] for f in fit.values()]).mean():.2f}",
                  flush=True)
            for mode, text in todo:
                t = time.time()
                with probe.mode(mode):
                    res[f"{text} w256 {mode}"] = harp.perplexity(model, windows[text]).ppl
                save()
                print(f"{text}: window 256, fitted sink {mode}: ppl {res[f'{text} w256 {mode}']:.3f} "
                      f"({time.time() - t:.0f} s)", flush=True)
        for x in texts:
            print(x, ", ".join(f"{c}: {res[f'{x} w256 {c}']:.2f}" for c in ("s0", "s4", *FITTED)), flush=True)


class SinkProbe:
    """The top k layers as windows of `w` through an attention function of this script (registered with
    transformers' AttentionInterface, eager: full logits, then the band mask): `fit` measures the constants
    with 4 real sink tokens, `mode(m)` evaluates one fitted form (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, layers: set[int], window: int) -> None:
        from transformers import AttentionInterface

        self.model, self.layers, self.window = model, layers, window
        self.current: str | None = None
        self.stats: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.fitted: dict[int, dict[str, torch.Tensor]] = {}
        AttentionInterface.register("harp_sink_probe", self.attention)

    def attention(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

        i = module.layer_idx
        if i not in self.layers or self.current is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kw)
        k = repeat_kv(key, module.num_key_value_groups)
        v = repeat_kv(value, module.num_key_value_groups)
        s = query.shape[2]
        logits = (query @ k.transpose(-1, -2)) * scaling  # (B, H, S, S), batch 1 here
        pos = torch.arange(s)
        causal = pos[None, :] <= pos[:, None]
        band = causal & (pos[:, None] - pos[None, :] < self.window)
        if self.current == "fit":  # 4 real sinks, and their statistics where the window has left them
            far = pos >= self.window + SINKS
            sink_lse = torch.logsumexp(logits[..., :SINKS], -1)
            window_lse = torch.logsumexp(logits.masked_fill(~band, float("-inf")), -1)
            sink_out = torch.softmax(logits[..., :SINKS], -1) @ v[..., :SINKS, :]
            self.stats.setdefault(i, []).append((sink_lse[0][:, far], window_lse[0][:, far], sink_out[0][:, far]))
            p = torch.softmax(logits.masked_fill(~(band | (causal & (pos[None, :] < SINKS))), float("-inf")), -1)
            return (p @ v).transpose(1, 2).contiguous(), None
        f = self.fitted[i]
        b = f["b"].view(1, -1, 1, 1).expand(logits.shape[0], -1, s, 1)
        p = torch.softmax(torch.cat([logits.masked_fill(~band, float("-inf")), b], -1), -1)
        out = p[..., :-1] @ v
        if self.current == "logit+value":
            out = out + p[..., -1:] * f["value"].view(1, -1, 1, v.shape[-1])
        elif self.current == "logit+const":
            out = out + (f["share"][:, None] * f["value"]).view(1, -1, 1, v.shape[-1])
        return out.transpose(1, 2).contiguous(), None

    def _use(self, impl: str) -> None:
        for m in self.model.modules():
            if getattr(m, "config", None) is not None:
                m.config._attn_implementation = impl

    @contextmanager
    def mode(self, mode: str):
        before = self.model.config._attn_implementation
        self.current = mode
        self._use("harp_sink_probe")
        try:
            yield
        finally:
            self.current = None
            self._use(before)

    @torch.no_grad()
    def fit(self, calib: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
        with self.mode("fit"):
            for w in calib:
                self.model(w[None])
        for i, rows in self.stats.items():
            sink_lse = torch.cat([r[0] for r in rows], 1)  # (H, N)
            window_lse = torch.cat([r[1] for r in rows], 1)
            b = sink_lse.mean(1)
            self.fitted[i] = {"b": b, "value": torch.cat([r[2] for r in rows], 1).mean(1),
                              "share": torch.sigmoid(b[:, None] - window_lse).mean(1)}
        return self.fitted


if __name__ == "__main__":
    main()
