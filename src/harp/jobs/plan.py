"""`harp plan`: what a HARP alpha search will need, and what its result saves, from the config alone.

No weights are read. The peak of the search is the largest of its phases, each the sum of:

* weights resident: the whole model (in-memory search); for the streamed search the embedding + one
  decoder layer while the bottom of the model is streamed, then the searched layers + final norm +
  LM head (an untied embedding is dropped by then). Plus the folded `o_proj` a candidate adds to each
  pruned layer (`temporarily_pruned` keeps the original to restore it).
* calibration activations: the cached residual stream entering the lowest searched layer and the
  stream entering the layer being searched, `2 * N * S * hidden` elements (one copy while caching);
  rotary tables; `N * S * S` masks with eager attention (none with SDPA, which builds no mask here).
* workspace of one batch: a decoder layer's largest live tensors (MLP: input, normed input, the
  activation, the up projection and their product; eager attention adds heads x S x S scores), or
  the LM head's: the final hidden states twice (normed, flattened) and a chunk of `chunk_tokens`
  logits in the model dtype, again in float32, and their float32 log-softmax.
* runtime: Python + torch + transformers on the CPU (measured on the development machine: ~0.39 GiB
  RSS before any weight); on a GPU, an estimate of the CUDA context (~0.5 GiB, not measured here).

The formulas count tensors, not allocator behaviour: on the CPU, glibc keeps some freed memory, which
the benchmark (benchmarks/bench_streamed_memory.py) measures against these figures.
"""

from __future__ import annotations

import math
import re
from typing import Any

from harp.model.accounting import (
    attention_parameters,
    kv_cache_bytes_expected,
    kv_contexts,
    kv_savings,
    parameter_count,
    removed_parameters,
)
from harp.model.prune import check_k, check_window_plan
from harp.modeling import arch_for, attention_geometry
from harp.util.dtypes import dtype_bytes

GiB = 2**30
MiB = 2**20
CPU_RUNTIME_BYTES = 400 * MiB  # RSS of `import torch, transformers, harp` + model code, no weights (measured)
CUDA_RUNTIME_BYTES = 512 * MiB  # typical CUDA context + allocator slack (an estimate; no GPU here)







def parse_calib(spec: str) -> tuple[int, int]:
    """'16x512' (also 16×512, 16*512) -> (windows, seq_len)."""
    m = re.fullmatch(r"\s*(\d+)\s*[x×X*]\s*(\d+)\s*", str(spec))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 2:
        raise ValueError(f"`calib={spec!r}`: give windows x tokens, e.g. 16x512 (at least 1 x 2).")
    return int(m.group(1)), int(m.group(2))


def _uses_eager(config: Any, attn_implementation: str | None) -> bool:
    impl = attn_implementation or getattr(config, "_attn_implementation", None)
    return impl == "eager"


def _mask_kinds(config: Any) -> int:
    types = getattr(config, "layer_types", None)
    return len(set(types)) if types else 1


def layer_parameters(config: Any) -> int:
    """Parameters of one original decoder layer."""
    hidden, vocab = config.hidden_size, config.vocab_size
    outside = vocab * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2) + hidden
    return (parameter_count(config) - outside) // config.num_hidden_layers


def search_memory(
    config: Any,
    k: int,
    windows: int,
    seq_len: int,
    *,
    dtype: Any = "float32",
    batch_size: int = 4,
    chunk_tokens: int = 1024,
    streamed: bool = True,
    activations: str = "device",
    device: str = "cpu",
    attn_implementation: str | None = None,
) -> dict[str, int]:
    """Peak memory of the alpha search over the top `k` layers with `windows` x `seq_len` calibration
    tokens, by component (bytes): 'weights', 'activations', 'workspace', 'runtime', 'total' (on the
    compute device; for a CPU run, the process RSS), 'host_activations' (kept off the device), and the
    peak phase ('phase': 'cache' or 'search', as an int flag 0/1)."""
    arch_for(config)
    layers = config.num_hidden_layers
    check_k(k, layers)
    if batch_size < 1 or chunk_tokens < 1:
        raise ValueError("batch size and chunk tokens must be positive.")
    if activations not in ("device", "cpu", "disk"):
        raise ValueError(f"Unknown activations place {activations!r}: use device, cpu or disk.")
    b = dtype_bytes(dtype)
    g = attention_geometry(config)
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    n, s = windows, seq_len
    bs = min(batch_size, n)
    p_layer = layer_parameters(config)
    embed = vocab * hidden

    # weights (elements)
    pruned_extra = k * hidden * g["kv_heads"] * g["head_dim"]  # folded o_proj per pruned layer (+ original kept)
    if streamed:
        w_cache = embed + p_layer
        w_search = k * p_layer + hidden + embed + pruned_extra  # head (= the embedding when tied)
    else:
        w_cache = w_search = parameter_count(config) + pruned_extra
    # activations (elements): cached stream(s), rotary tables, masks
    stream = n * s * hidden
    batches = math.ceil(n / bs)
    rotary = batches * 2 * s * g["head_dim"]
    masks = n * s * s * _mask_kinds(config) if _uses_eager(config, attn_implementation) else 0
    a_cache, a_search = stream + rotary + masks, 2 * stream + rotary + masks
    # workspace of one batch (bytes)
    q_dim, kv_dim = g["heads"] * g["head_dim"], g["kv_heads"] * g["head_dim"]
    tok = bs * s
    layer_ws = tok * b * max(3 * hidden + 3 * inter, 3 * hidden + 2 * q_dim + 4 * kv_dim)
    if _uses_eager(config, attn_implementation):
        layer_ws += bs * g["heads"] * s * s * (2 * b + 4)
    rows = min(chunk_tokens, bs * (s - 1))
    head_ws = 2 * tok * hidden * b + rows * vocab * (b + 4 + (4 if b != 4 else 0))
    ws_cache = layer_ws + tok * hidden * b
    ws_search = max(layer_ws, head_ws) + tok * hidden * b

    off_device = streamed and activations != "device" and not str(device).startswith("cpu")
    on_dev = (lambda x: 0) if off_device else (lambda x: x)
    cache_total = w_cache * b + on_dev(a_cache * b) + ws_cache
    search_total = w_search * b + on_dev(a_search * b) + ws_search
    search_phase = search_total >= cache_total
    runtime = CPU_RUNTIME_BYTES if str(device).startswith("cpu") else CUDA_RUNTIME_BYTES
    return {
        "weights": (w_search if search_phase else w_cache) * b,
        "activations": on_dev((a_search if search_phase else a_cache) * b),
        "workspace": ws_search if search_phase else ws_cache,
        "runtime": runtime,
        "total": max(cache_total, search_total) + runtime,
        "host_activations": (a_search * b) if off_device and activations == "cpu" else 0,
        "phase": int(search_phase),
    }


def result_summary(config: Any, k: int, *, dtype: Any = "bfloat16", context: int = 8192) -> dict[str, Any]:
    """Size and KV cache of the model before and after pruning its top k layers. The alphas are not known
    before the search, so the parameter count is a range: all alpha != 0 (q, k deleted, o folded) to all
    alpha = 0 (whole attention sub-layers removed). The KV saving does not depend on the alphas."""
    b = dtype_bytes(dtype)
    layers_n = config.num_hidden_layers
    top = list(range(layers_n - 1, layers_n - 1 - k, -1))
    before = parameter_count(config)
    least = removed_parameters(config, top, [1.0] * k)
    most = removed_parameters(config, top, [0.0] * k)
    plan = {"layers": top, "alphas": [1.0] * k}
    kv_before = kv_cache_bytes_expected(config, context, None, b)
    kv_after = kv_cache_bytes_expected(config, context, plan, b)
    attn = attention_parameters(config)
    return {
        "layers": top,
        "params_before": before,
        "params_after_max": before - least,
        "params_after_min": before - most,
        "bytes_before": before * b,
        "bytes_after_max": (before - least) * b,
        "bytes_after_min": (before - most) * b,
        "context": context,
        "kv_before": kv_before,
        "kv_after": kv_after,
        "kv_saving": 1 - kv_after / kv_before if kv_before else 0.0,
        "attention_params_per_layer": attn["q"] + attn["k"] + attn["v"] + attn["o"],
    }


def plan(
    config: Any,
    k: int,
    windows: int,
    seq_len: int,
    *,
    dtype: Any = "float32",
    device: str = "cpu",
    batch_size: int = 4,
    chunk_tokens: int = 1024,
    activations: str = "device",
    context: int = 8192,
) -> dict[str, Any]:
    """Everything `harp plan` prints, as a dict."""
    kw = dict(dtype=dtype, batch_size=batch_size, chunk_tokens=chunk_tokens, activations=activations, device=device)
    return {
        "model": {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
                  "params": parameter_count(config), "model_type": config.model_type},
        "settings": {"k": k, "calib": [windows, seq_len], "dtype": str(dtype), "device": device,
                     "batch_size": batch_size, "chunk_tokens": chunk_tokens, "activations": activations},
        "streamed": search_memory(config, k, windows, seq_len, streamed=True, **kw),
        "in_memory": search_memory(config, k, windows, seq_len, streamed=False, **kw),
        "result": result_summary(config, k, dtype=dtype, context=context),
    }


def full_plan(cfg: Any, k: int, windows: int, seq_len: int, context: int | None = None,
              window: int | None = None, **kw: Any) -> dict[str, Any]:
    """`plan` plus the KV saving at the contexts every command states it at (2,048 tokens and the
    model's maximum; `context` adds one); with `window`, also the saving if the same layers become window
    layers of that many tokens (`kv_window`)."""
    contexts = sorted(set(kv_contexts(cfg) + ([context] if context else [])))
    p = plan(cfg, k, windows, seq_len, context=context or contexts[-1], **kw)
    top = p["result"]["layers"]
    dtype = kw.get("dtype", "float32")
    p["kv"] = kv_savings(cfg, {"layers": top, "alphas": [1.0] * len(top)}, dtype, contexts)
    if window is not None:
        check_window_plan(cfg, {i: window for i in top})
        p["window"] = window
        p["kv_window"] = kv_savings(cfg, {"layers": [], "alphas": [], "window_layers": top,
                                          "windows": [window] * len(top)}, dtype, contexts)
    return p


def human(nbytes: float) -> str:
    if abs(nbytes) >= GiB:
        return f"{nbytes / GiB:.2f} GiB"
    return f"{nbytes / MiB:.0f} MiB"


# ------------------------------------------------------------------------------------------------
# Handing a pruned model to vLLM with tensor parallelism
# ------------------------------------------------------------------------------------------------




