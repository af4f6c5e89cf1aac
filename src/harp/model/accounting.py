"""Counting what HARP removes and what it saves, from the config alone and measured on a model.

Parameters (per attention sub-layer, removed by a plan, of a whole model), KV-cache bytes (expected
from the config, measured on a cache object), and the FLOP and bytes model behind HARP's speed-up
bound (docs/method.md, "Speed bounds"). `layer_kinds` is the one vocabulary of what each decoder
layer's attention sub-layer is.

Counting conventions (all per sequence, batch 1):

* A linear map with ``P`` parameters (weights + bias) costs ``2·P`` FLOPs per token (multiply-add).
* Causal self-attention of one layer (``d = heads·head_dim``): a query that sees ``m`` keys costs
  ``2·m·d`` for ``QKᵀ`` plus ``2·m·d`` for ``AV``. A prefill of ``n`` tokens therefore costs
  ``Σ_{i=1..n} 4·d·i = 2·d·n·(n+1)``, about ``2·n·d`` per token, as docs/method.md states. A layer with a
  sliding window ``w`` sees at most ``w`` keys per query.
* Every supported family has a gated MLP: three ``hidden × intermediate`` maps.
* The LM head (``hidden × vocab``) runs only on the tokens whose logits are needed: a prefill for
  generation needs the last one (``logits_to_keep=1``, as ``generate`` does), and that is what the
  benchmark measures.
* Not counted: norms, rotary, softmax, activations, residual adds, the embedding lookup. They are
  element-wise, ``O(n·hidden)``, and small next to the terms above.

A HARP layer with ``alpha != 0`` keeps ``v_proj`` and the folded ``hidden × kv_dim`` ``o_proj`` and
has no attention term; with ``alpha == 0`` it has no attention sub-layer at all (docs/method.md).

Decode at batch 1 is memory-bound, so its bound is a ratio of bytes read per generated token: every
weight once (the LM head included; of an untied embedding only one row) plus the keys and values of
every layer that still has a KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from harp.modeling import HarpBlock, HarpBlockError, arch_for, attention_geometry
from harp.util.dtypes import dtype_bytes

ATTENTION = "attention"  # an original attention sub-layer
LINEAR = "linear"  # HARP identity attention, alpha != 0: v_proj + folded o_proj
NONE = "none"  # HARP alpha == 0: no attention sub-layer


def attention_parameters(config: Any) -> dict[str, int]:
    """Parameter counts of one original attention sub-layer, by part."""
    arch = arch_for(config)
    g = attention_geometry(config)
    hidden, heads, kv, hd = g["hidden"], g["heads"], g["kv_heads"], g["head_dim"]
    if arch.bias == "qkv":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
    return {
        "q": hidden * heads * hd + (heads * hd if qkv_bias else 0),
        "k": hidden * kv * hd + (kv * hd if qkv_bias else 0),
        "v": hidden * kv * hd + (kv * hd if qkv_bias else 0),
        "o": heads * hd * hidden + (hidden if o_bias else 0),
        "o_folded": kv * hd * hidden + (hidden if o_bias else 0),
        "qk_norms": 2 * hd if arch.qk_extra else 0,
        "norms": hidden * (2 if arch.attn_out_norm else 1),
    }


def removed_parameters(config: Any, layers: list[int], alphas: list[float]) -> int:
    """How many parameters `harp.prune(model, layers, alphas)` removes (docs/method.md, "The fold").

    alpha != 0: q, k (+ q/k norms) deleted; o shrinks from hidden x heads*hd to hidden x kv*hd.
    alpha == 0: the whole attention sub-layer goes, with the norm(s) that only it used.
    """
    p = attention_parameters(config)
    total = 0
    for a in alphas:
        if float(a) == 0.0:
            total += p["q"] + p["k"] + p["v"] + p["o"] + p["qk_norms"] + p["norms"]
        else:
            total += p["q"] + p["k"] + p["qk_norms"] + (p["o"] - p["o_folded"])
    return total


def count_parameters(model: Any) -> int:
    """Distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    n = 0
    for prm in model.parameters():
        if id(prm) not in seen:
            seen.add(id(prm))
            n += prm.numel()
    return n


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by the key/value tensors of a transformers Cache object."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


def output_cache(output: Any) -> Any:
    """The KV cache object of a model output (`cache` in transformers >= 5.2x, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


@torch.no_grad()
def kv_bytes_after_prefill(model: nn.Module, tokens: int = 16) -> int:
    """Bytes in the KV cache after a prefill of `tokens` tokens (a real cache object, measured)."""
    ids = torch.arange(1, tokens + 1).unsqueeze(0).to(next(model.parameters()).device)
    return kv_cache_bytes(output_cache(model(input_ids=ids, use_cache=True)))


def _block(config: Any, harp: Mapping[str, Any] | None) -> HarpBlock:
    """The plan `harp` ({'layers', 'alphas'} and optionally {'window_layers', 'windows'}) as a HarpBlock;
    `harp=None` reads `config.harp` (absent: none)."""
    if harp is None:
        return HarpBlock.from_config(config)
    if not harp:
        return HarpBlock()
    block = {**harp, "layers": list(harp.get("layers", [])), "alphas": list(harp.get("alphas", [])),
             "window_layers": list(harp.get("window_layers", [])), "windows": list(harp.get("windows", [])),
             **({"sinks": list(harp["sinks"])} if harp.get("sinks") else {})}
    return HarpBlock.from_dict(block, config.num_hidden_layers)


def _plan(config: Any, harp: Mapping[str, Any] | None) -> dict[int, float]:
    """{layer index: alpha} of the bypassed layers."""
    return _block(config, harp).plan


def layer_kinds(config: Any, harp: Mapping[str, Any] | None = None) -> list[str]:
    """What the attention sub-layer of each decoder layer is: 'attention', 'linear' or 'none'."""
    arch_for(config)
    plan = _plan(config, harp)
    kinds = []
    for i in range(config.num_hidden_layers):
        if i not in plan:
            kinds.append(ATTENTION)
        else:
            kinds.append(NONE if plan[i] == 0.0 else LINEAR)
    return kinds


def attention_windows(config: Any, harp: Mapping[str, Any] | None = {}) -> list[int | None]:  # noqa: B006
    """Per layer, the sliding window (max keys a query sees), or None for full attention: the model's own
    (`sliding_window`, `layer_types`, as before harp), capped by the window layers of `harp` (None: the
    config's own block; the default `{}`: the model as its family defines it, without harp window layers)."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or None
    types = getattr(config, "layer_types", None)
    if types:
        own = [window if t == "sliding_attention" and window else None for t in types[:n]]
    elif window and getattr(config, "use_sliding_window", True):
        own = [window] * n
    else:
        own = [None] * n
    # A saved checkpoint may say its window layers in the family's own layer_types too
    # (checkpoint.family_window_fields): a window layer whose own window equals harp's was full attention
    # before harp (harp only ever narrows a layer that is already local), so the original is counted so.
    try:
        stored = HarpBlock.from_config(config)
    except HarpBlockError:  # a damaged block: the caller that reads it says so; the family's own windows stand
        stored = HarpBlock()
    for i, w in stored.windows_plan.items():
        if own[i] == w and not stored.sinks_plan[i]:
            own[i] = None
    for i, w in _block(config, harp).windows_plan.items():
        own[i] = w if own[i] is None else min(w, own[i])
    return own


def attention_sinks(config: Any, harp: Mapping[str, Any] | None = {}) -> list[int]:  # noqa: B006
    """Per layer, how many first positions a window layer of `harp` also sees (0 elsewhere)."""
    sinks = [0] * config.num_hidden_layers
    for i, s in _block(config, harp).sinks_plan.items():
        sinks[i] = s
    return sinks


def _layers(config: Any, harp: Mapping[str, Any] | None) -> list[tuple[str, int | None, int]]:
    """(kind, window, sinks) per decoder layer."""
    return list(zip(layer_kinds(config, harp), attention_windows(config, harp), attention_sinks(config, harp),
                    strict=True))


def _mlp_parameters(config: Any) -> int:
    hidden, inter = config.hidden_size, config.intermediate_size
    bias = bool(getattr(config, "mlp_bias", False))
    return 3 * hidden * inter + ((2 * inter + hidden) if bias else 0)


def _layer_linear_parameters(config: Any, kind: str) -> int:
    """Parameters of the linear maps of one decoder layer (norms excluded)."""
    p = attention_parameters(config)
    attn = {ATTENTION: p["q"] + p["k"] + p["v"] + p["o"], LINEAR: p["v"] + p["o_folded"], NONE: 0}[kind]
    return attn + _mlp_parameters(config)


def _layer_norm_parameters(config: Any, kind: str) -> int:
    arch = arch_for(config)
    p = attention_parameters(config)
    mlp_norms = config.hidden_size * (2 if arch.attn_out_norm else 1)  # Gemma: pre- and post-FFN norms
    attn_norms = {ATTENTION: p["norms"] + p["qk_norms"], LINEAR: p["norms"], NONE: 0}[kind]
    return attn_norms + mlp_norms


def parameter_count(config: Any, harp: Mapping[str, Any] | None = None) -> int:
    """Parameters of the whole model (tied embeddings counted once), from the config and the plan.

    Equals `count_parameters(model)` for every supported family; the tests check that,
    which is what makes the FLOP and bytes counts below trustworthy.
    """
    hidden, vocab = config.hidden_size, config.vocab_size
    total = vocab * hidden + hidden  # embedding + final norm
    if not getattr(config, "tie_word_embeddings", False):
        total += vocab * hidden
    for kind in layer_kinds(config, harp):
        total += _layer_linear_parameters(config, kind) + _layer_norm_parameters(config, kind)
    return total


def _keys_prefill(n: int, window: int | None, sinks: int = 0) -> int:
    """Σ_{i=1..n} keys(i): keys seen by all queries of a causal prefill of n tokens, where query i sees
    min(i, window) keys and, past the window, also the first min(sinks, i - window) positions."""
    if window is None or n <= window:
        return n * (n + 1) // 2
    past = n - window  # queries whose window has moved past position 0
    extra = past * (past + 1) // 2 if past <= sinks else sinks * (sinks + 1) // 2 + (past - sinks) * sinks
    return window * (window + 1) // 2 + past * window + extra


def _keys(n: int, window: int | None, sinks: int = 0) -> int:
    """Keys the n-th token attends to (and holds after it, with `held`: one fewer in the window)."""
    return n if window is None else min(n, window + sinks)


def _check_context(n: int) -> int:
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"Context length must be a positive integer, got {n!r}.")
    return int(n)


def prefill_flops(
    config: Any, n: int, harp: Mapping[str, Any] | None = None, logits_tokens: int = 1
) -> dict[str, int]:
    """FLOPs of a prefill of `n` tokens from an empty cache, by part, and their total.

    Parts: 'linear' (all decoder-layer linear maps), 'attention' (QKᵀ and AV), 'lm_head' (on
    `logits_tokens` tokens; 1 for generation), 'total'.
    """
    n = _check_context(n)
    g = attention_geometry(config)
    d = g["heads"] * g["head_dim"]
    linear = attention = 0
    for kind, window, sinks in _layers(config, harp):
        linear += 2 * n * _layer_linear_parameters(config, kind)
        if kind == ATTENTION:
            attention += 4 * d * _keys_prefill(n, window, sinks)
    lm_head = 2 * config.hidden_size * config.vocab_size * min(int(logits_tokens), n)
    return {
        "linear": linear,
        "attention": attention,
        "lm_head": lm_head,
        "total": linear + attention + lm_head,
    }


def decode_flops(config: Any, past: int, harp: Mapping[str, Any] | None = None) -> dict[str, int]:
    """FLOPs of generating one token with `past` tokens already in the cache (it sees past+1 keys)."""
    if isinstance(past, bool) or int(past) != past or past < 0:
        raise ValueError(f"Past length must be a non-negative integer, got {past!r}.")
    g = attention_geometry(config)
    d = g["heads"] * g["head_dim"]
    linear = attention = 0
    for kind, window, sinks in _layers(config, harp):
        linear += 2 * _layer_linear_parameters(config, kind)
        if kind == ATTENTION:
            attention += 4 * d * _keys(past + 1, window, sinks)
    lm_head = 2 * config.hidden_size * config.vocab_size
    return {
        "linear": linear,
        "attention": attention,
        "lm_head": lm_head,
        "total": linear + attention + lm_head,
    }




def kv_cache_bytes_expected(
    config: Any, n: int, harp: Mapping[str, Any] | None = None, dtype: Any = 4, *, attended: bool = False
) -> int:
    """Bytes of keys and values a cache holds after `n` tokens: layers with attention only.

    Full-attention layers hold n tokens; sliding-window layers (the model's own and harp's window layers)
    hold the last min(n, w - 1): the query that comes next brings the w-th, as transformers' caches keep
    them. `attended=True` counts instead the keys the n-th token attends to: min(n, w).
    """
    b = dtype if isinstance(dtype, int) else dtype_bytes(dtype)
    g = attention_geometry(config)
    per_token = 2 * g["kv_heads"] * g["head_dim"] * b
    total = 0
    for kind, window, sinks in _layers(config, harp):
        if kind == ATTENTION:
            total += per_token * (_keys(n, window, sinks) if attended or window is None
                                  else min(n, window - 1 + sinks))
    return total


def decode_bytes(
    config: Any, past: int, harp: Mapping[str, Any] | None = None, dtype: Any = 4
) -> dict[str, int]:
    """Bytes read to generate one token with `past` tokens in the cache: weights and KV cache.

    Weights: every parameter once, except an untied input embedding, of which one row is read.
    KV: the keys and values the new token attends to (past + 1, capped by a sliding window).
    """
    b = dtype if isinstance(dtype, int) else dtype_bytes(dtype)
    params = parameter_count(config, harp)
    if not getattr(config, "tie_word_embeddings", False):
        params -= (config.vocab_size - 1) * config.hidden_size
    weights = params * b
    kv = kv_cache_bytes_expected(config, past + 1, harp, b, attended=True)
    return {"weights": weights, "kv": kv, "total": weights + kv}


def speedup_bounds(
    config: Any,
    contexts: Iterable[int],
    pruned: Mapping[str, Any],
    original: Mapping[str, Any] | None = None,
    dtype: Any = 4,
    logits_tokens: int = 1,
) -> list[dict[str, Any]]:
    """Per context length n, the ideal (FLOP / bytes) speed-ups of `pruned` over `original`.

    `pruned` and `original` are HARP plans ({'layers', 'alphas'}); `original=None` means the unpruned
    model. Each row: context, prefill FLOPs both ways, `prefill_bound` (FLOPs ratio), `ideal_saving`
    (1 - 1/bound, the largest fraction of prefill time pruning can save), decode FLOPs and bytes per
    token after n tokens, `decode_flop_bound`, `decode_bytes_bound` and KV-cache bytes both ways.
    """
    orig_plan: Mapping[str, Any] = original if original is not None else {"layers": [], "alphas": []}
    rows = []
    for n in contexts:
        n = _check_context(n)
        fo = prefill_flops(config, n, orig_plan, logits_tokens)
        fp = prefill_flops(config, n, pruned, logits_tokens)
        do = decode_flops(config, n, orig_plan)
        dp = decode_flops(config, n, pruned)
        bo = decode_bytes(config, n, orig_plan, dtype)
        bp = decode_bytes(config, n, pruned, dtype)
        bound = fo["total"] / fp["total"]
        rows.append(
            {
                "context": n,
                "prefill_flops_original": fo["total"],
                "prefill_flops_pruned": fp["total"],
                "prefill_attention_share_original": fo["attention"] / fo["total"],
                "prefill_bound": bound,
                "ideal_saving": 1.0 - 1.0 / bound,
                "decode_flops_original": do["total"],
                "decode_flops_pruned": dp["total"],
                "decode_flop_bound": do["total"] / dp["total"],
                "decode_bytes_original": bo["total"],
                "decode_bytes_pruned": bp["total"],
                "decode_bytes_bound": bo["total"] / bp["total"],
                "kv_cache_bytes_original": kv_cache_bytes_expected(config, n, orig_plan, dtype),
                "kv_cache_bytes_pruned": kv_cache_bytes_expected(config, n, pruned, dtype),
            }
        )
    return rows


KV_CONTEXT = 2048  # the context every command states the KV saving at, beside the model's maximum


def kv_contexts(config: Any) -> list[int]:
    """The contexts KV savings are reported at, the same in every command: 2,048 tokens and the model's
    maximum (`max_position_embeddings`). On sliding-window models the saving depends on the context."""
    top = getattr(config, "max_position_embeddings", None)
    if not isinstance(top, int) or top < 1:
        return [KV_CONTEXT]
    return sorted({min(KV_CONTEXT, top), top})


def kv_savings(config: Any, harp: Mapping[str, Any] | None, dtype: Any = 4,
               contexts: list[int] | None = None) -> list[dict[str, Any]]:
    """KV cache bytes before and after pruning (`harp` = {'layers', 'alphas'}; None: the config's own `harp`
    block) at each context, from the config: [{'context', 'before', 'after', 'saving', 'is_max'}]."""
    top = getattr(config, "max_position_embeddings", None)
    rows = []
    for n in contexts or kv_contexts(config):
        before = kv_cache_bytes_expected(config, n, {"layers": [], "alphas": []}, dtype)
        after = kv_cache_bytes_expected(config, n, harp, dtype)
        rows.append({"context": n, "before": before, "after": after,
                     "saving": 1 - after / before if before else 0.0, "is_max": n == top})
    return rows


def kv_savings_text(rows: list[dict[str, Any]]) -> str:
    """'-25.0 % at 2,048 tokens (45.0 -> 33.8 MiB), -30.2 % at 8,192 (the model's maximum; ...)'."""
    def mib(b: int) -> str:
        return f"{b / 2**20:,.1f} MiB"

    parts = []
    for i, r in enumerate(rows):
        where = f"{r['context']:,}" + (" tokens" if i == 0 else "") + (" (the model's maximum)" if r["is_max"] else "")
        parts.append(f"-{100 * r['saving']:.1f} % at {where}: {mib(r['before'])} -> {mib(r['after'])}")
    return "; ".join(parts)
