"""HARP runtime: the architecture table, the modules a pruned layer is made of, and the code that
gives a model the pruned structure.

This file is deliberately self-contained (it imports only the standard library, torch and
transformers): `harp.save` copies it verbatim next to every checkpoint as `harp_modeling.py`, so that
`transformers.AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` rebuilds a pruned
model on a machine where harp is not installed. Keep it that way: no imports from the harp package.

What a pruned layer computes (HARP, Liu & Liu 2025):

    h = x + alpha * o_proj(repeat_kv(v_proj(norm(x))))            (LLaMA, Mistral, Qwen2, Qwen3)
    h = x + alpha * post_attn_norm(o_proj(repeat_kv(v_proj(norm(x)))))   (Gemma 2 / 3)

q/k projections, rotary embedding, mask and softmax are gone, and so is the layer's KV cache. The
GQA repeat and alpha are folded into one `hidden x kv_dim` output matrix (for Gemma alpha is folded
into the output norm, which would cancel any scale of its input). `alpha == 0` removes the whole
attention sub-layer.

A window layer (`harp.prune(..., windows={i: w})`) keeps its attention and weights but each token sees
only itself and the w - 1 tokens before it; its KV cache holds at most w - 1 past tokens. It may also see
the first s positions (sink tokens, cached), or instead carry a fitted sink (`FittedSink`): a per-head
logit b, one more softmax column with no value (what vLLM's attention calls `sinks`), and a constant added
to the attention output (`o_proj` of the sinks' mean share of output), standing in for sink tokens
without caching any.
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicSlidingWindowLayer as _SlidingWindowLayer

FORMAT_VERSION = 3  # 2 adds window layers, 3 fitted sinks; a block is written with the lowest that holds it


@dataclass(frozen=True)
class Arch:
    """Where the pieces HARP touches live in a `transformers` model of one family."""

    family: str
    layers: str = "model.layers"
    attn: str = "self_attn"
    attn_norm: str = "input_layernorm"  # normalises the attention input, used by nothing else
    attn_out_norm: str | None = None  # normalises the attention output before the residual (Gemma)
    unit_offset_norm: bool = False  # RMSNorm multiplies by (1 + w) instead of w (Gemma)
    qk_extra: tuple[str, ...] = ()  # modules inside attention that only q/k use (deleted with them)
    bias: str = "config"  # "config": q/k/v/o biases follow config.attention_bias; "qkv": q/k/v only
    backbone: str = "model"  # the base model: returns the final-normed hidden states
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    embed: str = "model.embed_tokens"


# model_type -> Arch. The one place that says how a supported family is laid out.
ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("LLaMA"),
    "mistral": Arch("Mistral"),
    "qwen2": Arch("Qwen2", bias="qkv"),
    "qwen3": Arch("Qwen3", qk_extra=("q_norm", "k_norm")),
    "gemma": Arch("Gemma", unit_offset_norm=True),
    "gemma2": Arch("Gemma2", attn_out_norm="post_attention_layernorm", unit_offset_norm=True),
    "gemma3_text": Arch(
        "Gemma3", attn_out_norm="post_attention_layernorm", unit_offset_norm=True, qk_extra=("q_norm", "k_norm")
    ),
}


def supported_families() -> str:
    return ", ".join(f"{a.family} ({t})" for t, a in ARCHITECTURES.items())


def arch_for(config: Any) -> Arch:
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    hint = ""
    if model_type == "gemma3":
        hint = " For Gemma 3, load the text-only model (Gemma3ForCausalLM, model_type 'gemma3_text')."
    raise ValueError(
        f"harp does not support model_type {model_type!r}. Supported families: {supported_families()}.{hint}"
    )


def get_module(root: nn.Module, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_module(model, arch_for(model.config).layers)


def attention_geometry(config: Any) -> dict[str, int]:
    """hidden size, head counts and head dim, as the attention modules of this config use them."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {"hidden": hidden, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}


# --------------------------------------------------------------------------------------------
# KV cache: a pruned layer reads no other position, so its cache slot must never hold tensors.
# --------------------------------------------------------------------------------------------


def _release_cache_slot(cache: Any, layer_idx: int) -> None:
    """Make `cache.layers[layer_idx]` a layer that stores nothing (transformers' DummyLayer).

    Caches built from a config pre-create one layer object per decoder layer; caches built without
    one grow lazily. Either way the slot of a pruned layer becomes a DummyLayer the first time the
    layer runs, before anything was stored in it, so no bytes are ever allocated for it. Asked for its
    length or mask sizes (5.0 and 5.25 ask `layers[0]` whatever it is), the slot answers with those of
    the cache's first real attention layer (`_RealLayerLengths`).
    """
    layers = getattr(cache, "layers", None)
    if layers is None:  # a cache type harp does not know: store nothing, touch nothing
        return
    if layer_idx < len(layers) and isinstance(layers[layer_idx], _NO_STORAGE):
        return
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while len(layers) <= layer_idx:
        layers.append(replicate() if replicate is not None else _dummy(cache))
    layers[layer_idx] = _dummy(cache)


try:
    from transformers.cache_utils import CacheLayerMixin as _CacheLayerBase
except ImportError:  # pragma: no cover - not a transformers 5 release
    _CacheLayerBase = object  # type: ignore[misc, assignment]


def cache_kwarg(model: nn.Module) -> str:
    """The name `model.forward` (and `generate`) takes its KV cache under: `cache` (transformers >= 5.2x) or
    `past_key_values` (before)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


class _RealLayerLengths:
    """What a pruned layer's cache slot answers when asked for the sequence length or mask sizes: those of
    the first real full-attention layer of the same cache (any real layer if none is full), so the
    answer is what the cache holds, not zero, whichever layer index the cache asks.

    transformers reads `layers[0]` for the length in 5.0 and again in 5.25 (`Cache.get_seq_length`),
    whose DummyLayer has no `get_seq_length` at all: a model with layer 0 pruned would fail at its first
    cached decode step.
    """

    _cache: Any = None

    def _bind(self, cache: Any) -> None:
        self._cache = weakref.ref(cache) if cache is not None else None

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        """A copy bound to the copy of its cache (`copy.deepcopy(cache)`, e.g. a prompt's cache reused for
        several continuations), not to the original: a weak reference is copied as it is."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name != "_cache":
                setattr(new, name, copy.deepcopy(value, memo))
        cache = self._cache() if self._cache is not None else None
        new._bind(memo.get(id(cache), cache))
        return new

    def _real(self) -> Any:
        cache = self._cache() if self._cache is not None else None
        others = [la for la in getattr(cache, "layers", []) if not isinstance(la, (*_NO_STORAGE, _WindowCacheLayer))]
        same = [la for la in others if not getattr(la, "is_sliding", False)]
        return (same or others or [None])[0]

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        real = self._real()
        return real.get_seq_length() if real is not None else 0

    def get_mask_sizes(self, query: Any, *args: Any, **kwargs: Any) -> tuple[int, int]:
        real = self._real()
        if real is not None:
            return real.get_mask_sizes(query, *args, **kwargs)
        q = query if isinstance(query, int) else int(query.shape[0])  # 5.0 passes cache_position
        return q, 0


class _FallbackDummyLayer(_RealLayerLengths, _CacheLayerBase):  # type: ignore[misc, valid-type]
    """A cache layer that stores nothing, for transformers releases without `cache_utils.DummyLayer`
    (5.0 .. 5.19): every attribute and method a `Cache` asks of its layers, as no-ops.

    Those releases' caches do not skip such a layer when asked for the sequence length or mask sizes:
    5.0 reads `layers[0]` whatever it is, 5.19 refuses a non-attention layer at an index other than 0,
    and both pick the first non-sliding layer to size the full-attention mask, pruned or not. So this
    layer is an ordinary attention cache layer to them, with the lengths of `_RealLayerLengths`. Like
    transformers' DummyLayer it is never sliding, so sliding-window masks are sized by a real sliding
    layer.
    """

    is_compileable = True
    is_croppable = True
    supports_early_init = False
    is_sliding = False

    def __init__(self, cache: Any = None, **kwargs: Any) -> None:
        if _CacheLayerBase is not object:
            super().__init__()
        self.is_initialized = True
        self.keys = None
        self.values = None
        self._bind(cache)

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if key_states is None and value_states is None:
            return None, None
        raise NotImplementedError("A pruned HARP layer has no KV cache: it cannot be updated.")

    def lazy_initialization(self, *args: Any, **kwargs: Any) -> None: ...
    def offload(self) -> None: ...
    def prefetch(self) -> None: ...
    def reset(self) -> None: ...
    def crop(self, *args: Any, **kwargs: Any) -> None: ...
    def reorder_cache(self, *args: Any, **kwargs: Any) -> None: ...
    def batch_repeat_interleave(self, *args: Any, **kwargs: Any) -> None: ...
    def batch_select_indices(self, *args: Any, **kwargs: Any) -> None: ...

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1


try:  # transformers >= 5.2x
    from transformers.cache_utils import DummyLayer as _DummyLayer

    class _PrunedCacheLayer(_RealLayerLengths, _DummyLayer):  # type: ignore[misc, valid-type]
        """transformers' DummyLayer (skipped as such by the caches that know it), answering length
        queries too (`_RealLayerLengths`)."""

        def __init__(self, cache: Any = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._bind(cache)

    _HAS_DUMMY_LAYER = True
except ImportError:  # transformers 5.0 .. 5.19 (tested in CI on the lowest supported release)
    _DummyLayer = _FallbackDummyLayer  # type: ignore[misc, assignment]
    _PrunedCacheLayer = _FallbackDummyLayer  # type: ignore[misc, assignment]
    _HAS_DUMMY_LAYER = False

_NO_STORAGE = (_DummyLayer, _FallbackDummyLayer)  # cache layers that hold nothing (a pruned slot)
_use_fallback = not _HAS_DUMMY_LAYER


def use_fallback_cache_layer(enabled: bool) -> bool:
    """Give pruned layers harp's own no-storage cache layer (`enabled`), as on transformers releases without
    `cache_utils.DummyLayer`, or transformers' DummyLayer where this release has one (the default).
    Lets tests run the old releases' code path on a new one. Returns the previous setting."""
    global _use_fallback
    previous = _use_fallback
    _use_fallback = bool(enabled) or not _HAS_DUMMY_LAYER
    return previous


def uses_fallback_cache_layer() -> bool:
    """Whether pruned layers get harp's own no-storage cache layer rather than transformers' DummyLayer."""
    return _use_fallback


def pruned_cache_layer_class() -> type:
    """The class of the cache layer a pruned layer's slot becomes."""
    return _FallbackDummyLayer if _use_fallback else _PrunedCacheLayer


def _dummy(cache: Any) -> Any:
    return pruned_cache_layer_class()(cache)


def _cache_from(kwargs: dict[str, Any]) -> Any:
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


class HarpLinearAttention(nn.Module):
    """Identity attention of a HARP layer: `o_proj(v_proj(x))`, with repeat_kv and alpha folded into
    `o_proj` (shape hidden x kv_dim). Drop-in for the `self_attn` module of a decoder layer."""

    def __init__(
        self,
        hidden: int,
        kv_dim: int,
        layer_idx: int,
        v_bias: bool = False,
        o_bias: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.v_proj = nn.Linear(hidden, kv_dim, bias=v_bias, device=device, dtype=dtype)
        self.o_proj = nn.Linear(kv_dim, hidden, bias=o_bias, device=device, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = _cache_from(kwargs)
        if cache is not None:
            _release_cache_slot(cache, self.layer_idx)
        return self.o_proj(self.v_proj(hidden_states)), None


class HarpNoAttention(nn.Module):
    """A removed attention sub-layer (alpha = 0): contributes nothing to the residual stream."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = _cache_from(kwargs)
        if cache is not None:
            _release_cache_slot(cache, self.layer_idx)
        # A 0-d zero broadcasts against the residual: no n x hidden tensor is materialised.
        return hidden_states.new_zeros(()), None


# --------------------------------------------------------------------------------------------
# Window layers: the layer's own attention, over the last w positions only
# --------------------------------------------------------------------------------------------

class _WindowCacheLayer(_RealLayerLengths, _SlidingWindowLayer):  # type: ignore[misc, valid-type]
    """The cache slot of a window layer: the first `sinks` tokens and the last w - 1 others (transformers'
    sliding-window cache layer keeps only the latter, and for w = 1 its slice `[-0:]` would keep all).
    `update` returns the held keys/values with the new ones; `positions` are the held tokens' positions.

    With `column` (a layer with a fitted sink) `update` also puts one all-zero key and value first, held
    nowhere: the sink logit's softmax column (the mask gives it its logit; its value adds nothing).

    It must not size the masks the model builds for its other layers, so it reports itself not sliding
    and answers mask-size queries with those of the first real attention layer (`_RealLayerLengths`); its
    sequence length is its own (every token seen)."""

    is_sliding = False

    def __init__(self, window: int, sinks: int, cache: Any, column: bool = False) -> None:
        _SlidingWindowLayer.__init__(self, window)
        self.sinks = sinks
        self.column = column
        self.positions = torch.zeros(0, dtype=torch.long)
        self._bind(cache)

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return _SlidingWindowLayer.get_seq_length(self)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past, new = self.cumulative_length, key_states.shape[-2]
        self.cumulative_length += new
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        positions = torch.cat([self.positions, torch.arange(past, past + new)])
        keep = (positions < self.sinks) | (positions >= past + new - (self.sliding_window - 1))
        idx = keep.nonzero().flatten().to(keys.device)
        self.keys, self.values = keys.index_select(-2, idx), values.index_select(-2, idx)
        self.positions = positions[keep]
        if self.column:
            k0 = keys.new_zeros((*keys.shape[:-2], 1, keys.shape[-1]))
            v0 = values.new_zeros((*values.shape[:-2], 1, values.shape[-1]))
            return torch.cat([k0, keys], dim=-2), torch.cat([v0, values], dim=-2)
        return keys, values


def _window_cache_slot(cache: Any, layer_idx: int, window: int, sinks: int, column: bool = False) -> Any:
    """The cache layer of window layer `layer_idx`, made a `_WindowCacheLayer` the first time it runs."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"Window layer {layer_idx}: harp window layers need a transformers DynamicCache, "
                        f"got {type(cache).__name__}. Use the default cache (no cache_implementation).")
    slot = layers[layer_idx] if layer_idx < len(layers) else None
    if (isinstance(slot, _WindowCacheLayer) and slot.sliding_window == window and slot.sinks == sinks
            and slot.column == column):
        return slot
    if slot is not None and getattr(slot, "is_initialized", False) and slot.get_seq_length() > 0:
        raise RuntimeError(f"Window layer {layer_idx}: its cache slot already holds tokens from another kind of "
                           "layer; start generation with a new cache.")
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while len(layers) <= layer_idx:
        layers.append(replicate() if replicate is not None else _dummy(cache))
    layers[layer_idx] = _WindowCacheLayer(window, sinks, cache, column)
    return layers[layer_idx]


def window_mask(mask: torch.Tensor | None, queries: torch.Tensor, keys: torch.Tensor, window: int, sinks: int = 0,
                *, dtype: torch.dtype, additive: bool) -> torch.Tensor:
    """The attention mask of a window layer. `queries` and `keys` are absolute positions (1-D): query q
    sees key k iff k <= q and (q - k < window or k < sinks), and-ed with `mask`, the model's own mask for
    this layer (padding), whose columns are the positions up to the last query, the last ones last (a key
    before its first column keeps only the band). Boolean (True = attend) unless `additive` or `mask` is
    additive (0 / dtype min, eager attention)."""
    q, k = queries.view(-1, 1), keys.view(1, -1)
    band = (k <= q) & ((q - k < window) | (k < sinks))
    if mask is None:
        if not additive:
            return band[None, None]
        zeros = torch.zeros(band.shape, dtype=dtype, device=band.device)
        return zeros.masked_fill(~band, torch.finfo(dtype).min)[None, None]
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"harp window layers work with sdpa or eager attention (a tensor mask), not a "
                        f"{type(mask).__name__}: load the model with attn_implementation='sdpa'.")
    band = band.to(mask.device)
    column = (keys - (int(queries[-1]) + 1 - mask.shape[-1])).to(mask.device)  # the key's column in `mask`
    known = column >= 0
    picked = mask.index_select(-1, column.clamp(min=0))
    if mask.dtype == torch.bool:
        return (picked | ~known) & band
    picked = picked.masked_fill(~known, 0.0)
    return picked.masked_fill(~band, torch.finfo(mask.dtype).min)


def sink_column_mask(mask: torch.Tensor, logit: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A window mask (boolean or additive, batch x 1 x queries x keys) as an additive mask of `dtype`
    with one more column first, per head: the sink logit `logit` (heads,) on the all-zero key the cache
    slot puts first (q . 0 = 0, so the column's logit is b; its zero value adds nothing to the output)."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    mask = mask.to(dtype)
    b, _, q, _ = mask.shape
    column = logit.to(device=mask.device, dtype=dtype).view(1, -1, 1, 1).expand(b, -1, q, 1)
    return torch.cat([column, mask.expand(b, column.shape[1], q, mask.shape[-1])], dim=-1)


WINDOW_CHUNK = 512  # a window layer's forward over more new tokens than this runs in chunks of this size


class _ChunkCache:
    """The cache of one chunked window forward run without a model cache: the layer's slot alone,
    discarded when the forward returns."""

    def __init__(self, window: int, sinks: int, column: bool = False) -> None:
        self.slot = _WindowCacheLayer(window, sinks, None, column)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.slot.update(key_states, value_states)


def _chunk_kwargs(kwargs: dict[str, Any], start: int, end: int, n: int) -> dict[str, Any]:
    """The attention kwargs of new tokens start..end-1 of n: the model's mask keeps those query rows and the
    key columns up to the last of them; rotary embeddings and positions keep those positions."""
    def cut(x: Any) -> Any:
        return x[..., start:end, :] if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[-2] == n else x

    out = dict(kwargs)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        rows = mask[..., start:end, :] if mask.shape[-2] == n else mask
        out["attention_mask"] = rows[..., : mask.shape[-1] - n + end]
    if isinstance(kwargs.get("position_embeddings"), tuple):
        out["position_embeddings"] = tuple(cut(x) for x in kwargs["position_embeddings"])
    for name in ("position_ids", "cache_position"):
        x = kwargs.get(name)
        if isinstance(x, torch.Tensor) and x.shape[-1] == n:
            out[name] = x[..., start:end]
    return out


class _WindowedAttention:
    """Mixed into a family's own attention class (so the parameters and their names stay): the module
    attends over the last `harp_window` positions only and caches at most `harp_window - 1` past ones.

    A long forward (a prefill, a perplexity window) runs in chunks of WINDOW_CHUNK tokens through the
    layer's window cache slot, so its attention costs O(n * (w + WINDOW_CHUNK)), not O(n^2) behind a mask;
    tokens that all see each other (the first w of a sequence) keep the model's own (causal) mask.

    A fitted sink (parameters `harp_sink_logit`, heads, and `harp_sink_bias`, hidden) adds the softmax column
    b to every query (through a zero key the cache slot puts first) and the bias to the output."""

    harp_window: int
    harp_sinks: int = 0
    layer_idx: int

    @property
    def harp_sink_fitted(self) -> bool:
        return "harp_sink_logit" in self._parameters

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        n, size = hidden_states.shape[-2], WINDOW_CHUNK
        if not args and _cache_from(kwargs) is None and (n > size or self.harp_sink_fitted):
            # a forward without a model cache: its chunks share a throw-away one (so does a fitted sink's
            # zero key, which the slot adds)
            key = "cache" if "cache" in kwargs else "past_key_values"
            kwargs[key] = _ChunkCache(self.harp_window, self.harp_sinks, self.harp_sink_fitted)
        if args or n <= size:
            return self._window_forward(hidden_states, *args, **kwargs)
        parts = [self._window_forward(hidden_states[..., s:s + size, :], **_chunk_kwargs(kwargs, s, s + size, n))[0]
                 for s in range(0, n, size)]
        return torch.cat(parts, dim=-2), None

    def _window_forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        window, sinks, fitted = self.harp_window, self.harp_sinks, self.harp_sink_fitted
        cache = _cache_from(kwargs)
        held = torch.zeros(0, dtype=torch.long)
        past = 0
        if cache is not None:
            slot = cache.slot if isinstance(cache, _ChunkCache) else _window_cache_slot(cache, self.layer_idx,
                                                                                          window, sinks, fitted)
            held, past = slot.positions, slot.get_seq_length()
        elif fitted:
            raise TypeError(f"Window layer {self.layer_idx}: a fitted sink needs its cache slot; call the "
                            "attention with keyword arguments.")
        if past == 0 and hidden_states.shape[-2] <= window and not fitted:  # the band is the model's causal mask
            return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        queries = torch.arange(past, past + hidden_states.shape[-2])
        keys = torch.cat([held, queries])  # what the cache slot returns with the new keys
        eager = getattr(getattr(self, "config", None), "_attn_implementation", None) == "eager"
        mask = window_mask(kwargs.get("attention_mask"), queries, keys, window, sinks, dtype=hidden_states.dtype,
                           additive=eager)
        if fitted:
            mask = sink_column_mask(mask, self.harp_sink_logit, hidden_states.dtype)
        kwargs["attention_mask"] = mask.to(hidden_states.device)
        probe = self.__dict__.get("harp_probe")
        if probe is not None:  # harp.methods.sinks: the positions of this call's queries and keys
            probe.positions = (queries, keys)
        out = super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        if fitted:
            out = (out[0] + self.harp_sink_bias.to(out[0].dtype), *out[1:])
        return out


_WINDOWED_CLASSES: dict[type, type] = {}


def _windowed_class(base: type) -> type:
    if issubclass(base, _WindowedAttention):
        return base
    if base not in _WINDOWED_CLASSES:
        _WINDOWED_CLASSES[base] = type(f"HarpWindow{base.__name__}", (_WindowedAttention, base),
                                       {"__module__": __name__})
    return _WINDOWED_CLASSES[base]


@dataclass(frozen=True)
class FittedSink:
    """A window layer's fitted sink: `logit` (heads,) the softmax column each head adds beside its window,
    `bias` (hidden,) what is added to the attention's output (after o_proj)."""

    logit: torch.Tensor
    bias: torch.Tensor


def check_fitted_sink(config: Any, layer_idx: int, fitted: Any) -> None:
    """Raise ValueError unless `fitted` is a FittedSink of `config`'s shapes (one logit per head, a bias of
    the hidden size), finite."""
    g = attention_geometry(config)
    if not isinstance(fitted, FittedSink):
        raise ValueError(f"Layer {layer_idx}: a fitted sink is a harp FittedSink, got {type(fitted).__name__}.")
    if tuple(fitted.logit.shape) != (g["heads"],) or tuple(fitted.bias.shape) != (g["hidden"],):
        raise ValueError(f"Layer {layer_idx}: a fitted sink has one logit per head ({g['heads']}) and a bias of "
                         f"the hidden size ({g['hidden']}); got {tuple(fitted.logit.shape)} and "
                         f"{tuple(fitted.bias.shape)}.")
    if not (torch.isfinite(fitted.logit).all() and torch.isfinite(fitted.bias).all()):
        raise ValueError(f"Layer {layer_idx}: a fitted sink's logits and bias must be finite.")


def window_layer(model: nn.Module, layer_idx: int, window: int, sinks: int = 0,
                 fitted: FittedSink | bool = False) -> None:
    """Make decoder layer `layer_idx` a window layer of `window` positions, plus the first `sinks` ones
    (its weights untouched), or with a fitted sink (`fitted`: its values, or True for zeros that a
    checkpoint's weights fill)."""
    arch = arch_for(model.config)
    attn = getattr(get_module(model, arch.layers)[layer_idx], arch.attn)
    if not hasattr(attn, "q_proj"):
        raise ValueError(f"Layer {layer_idx} has no attention left to window (it is pruned).")
    if fitted is not False and sinks:
        raise ValueError(f"Layer {layer_idx}: a fitted sink stands in for sink tokens; give one or the other.")
    attn.__class__ = _windowed_class(type(attn))
    attn.harp_window = int(window)
    attn.harp_sinks = int(sinks)
    for name in ("harp_sink_logit", "harp_sink_bias"):
        attn._parameters.pop(name, None)
    if fitted is not False:
        g, ref = attention_geometry(model.config), attn.o_proj.weight
        if fitted is True:  # the structure only (on the meta device while a checkpoint loads)
            logit, bias = torch.zeros(g["heads"]), torch.zeros(g["hidden"])
        else:
            check_fitted_sink(model.config, layer_idx, fitted)
            logit, bias = fitted.logit, fitted.bias
        attn.harp_sink_logit = nn.Parameter(logit.detach().to(ref.device, ref.dtype).clone(), requires_grad=False)
        attn.harp_sink_bias = nn.Parameter(bias.detach().to(ref.device, ref.dtype).clone(), requires_grad=False)


def unwindow_layer(model: nn.Module, layer_idx: int) -> None:
    """Give a window layer its full attention back (its own family's attention class)."""
    arch = arch_for(model.config)
    attn = getattr(get_module(model, arch.layers)[layer_idx], arch.attn)
    if isinstance(attn, _WindowedAttention):
        attn.__class__ = next(b for b in type(attn).__mro__[1:] if not issubclass(b, _WindowedAttention))
        del attn.harp_window
        attn.__dict__.pop("harp_sinks", None)
        for name in ("harp_sink_logit", "harp_sink_bias"):
            attn._parameters.pop(name, None)


# --------------------------------------------------------------------------------------------
# Giving a model the pruned structure
# --------------------------------------------------------------------------------------------


def _remove_attention(layer: nn.Module, arch: Arch, layer_idx: int) -> None:
    setattr(layer, arch.attn, HarpNoAttention(layer_idx))
    setattr(layer, arch.attn_norm, nn.Identity())
    if arch.attn_out_norm is not None:
        setattr(layer, arch.attn_out_norm, nn.Identity())


def _empty_linear_attention(layer: nn.Module, arch: Arch, config: Any, layer_idx: int) -> HarpLinearAttention:
    old = getattr(layer, arch.attn)
    g = attention_geometry(config)
    ref = old.v_proj.weight
    return HarpLinearAttention(
        g["hidden"],
        g["kv_heads"] * g["head_dim"],
        layer_idx,
        v_bias=old.v_proj.bias is not None,
        o_bias=old.o_proj.bias is not None,
        device=ref.device,
        dtype=ref.dtype,
    )


def apply_structure(model: nn.Module, harp: dict[str, Any]) -> None:
    """Give `model` the module structure of a HARP checkpoint (weights are loaded afterwards).

    Used when rebuilding a saved pruned model: the modules get the right shapes, not values.
    """
    version = int(harp.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise ValueError(
            f"This checkpoint uses HARP format version {version}; this code reads up to {FORMAT_VERSION}. "
            "Upgrade harp-prune."
        )
    arch = arch_for(model.config)
    layers = get_module(model, arch.layers)
    block = HarpBlock.from_dict(harp, len(layers))
    for idx, alpha in block.plan.items():
        layer = layers[idx]
        if float(alpha) == 0.0:
            _remove_attention(layer, arch, idx)
        else:
            setattr(layer, arch.attn, _empty_linear_attention(layer, arch, model.config, idx))
    for idx, window in block.windows_plan.items():
        window_layer(model, idx, window, block.sinks_plan[idx], idx in block.fitted_sinks)


@dataclass(frozen=True)
class LinearMap:
    """A pruned layer's output map in place of `W_O R`: weight (hidden x kv_dim) and the output bias when
    o_proj has one, both float64, applied to `v_proj(norm(x))` before alpha."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


def fold_output(o_weight: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """`W_O R`: sum the column blocks of W_O (hidden x heads*head_dim) that read the same KV head.

    repeat_kv maps query head h to KV head h // (heads // kv_heads), so the blocks of one group are
    adjacent. Returned in float64 (the caller scales and casts once).
    """
    hidden = o_weight.shape[0]
    rep = heads // kv_heads
    w = o_weight.detach().to(torch.float64).reshape(hidden, kv_heads, rep, head_dim)
    return w.sum(dim=2).reshape(hidden, kv_heads * head_dim)


@torch.no_grad()
def prune_layer(model: nn.Module, layer_idx: int, alpha: float, fitted: LinearMap | None = None) -> None:
    """Replace the attention of decoder layer `layer_idx` by HARP's rescaled identity attention.

    `fitted` replaces the folded `W_O R` (and the output bias) by another `hidden x kv_dim` map of the
    same shape — the closed-form refit (`harp.fit`); alpha then scales that map."""
    arch = arch_for(model.config)
    layer = get_module(model, arch.layers)[layer_idx]
    alpha = float(alpha)
    if alpha == 0.0:
        _remove_attention(layer, arch, layer_idx)
        return
    old = getattr(layer, arch.attn)
    g = attention_geometry(model.config)
    new = _empty_linear_attention(layer, arch, model.config, layer_idx)
    dtype = old.o_proj.weight.dtype
    if fitted is None:
        folded = fold_output(old.o_proj.weight, g["heads"], g["kv_heads"], g["head_dim"])
        o_bias = None if old.o_proj.bias is None else old.o_proj.bias.detach().to(torch.float64)
    else:
        folded, o_bias = fitted.weight.to(torch.float64), fitted.bias
        if tuple(folded.shape) != tuple(new.o_proj.weight.shape):
            raise ValueError(f"Layer {layer_idx}: a fitted map must be {tuple(new.o_proj.weight.shape)}, "
                             f"got {tuple(folded.shape)}.")
        if (o_bias is None) != (new.o_proj.bias is None):
            raise ValueError(f"Layer {layer_idx}: a fitted map has an output bias exactly when o_proj has one.")
    if arch.attn_out_norm is None:
        scale = alpha
    else:  # an RMS norm cancels any scale of its input: fold alpha into the norm weight instead
        scale = 1.0
        norm = getattr(layer, arch.attn_out_norm)
        w = norm.weight.detach().to(torch.float64)
        w = alpha * (1.0 + w) - 1.0 if arch.unit_offset_norm else alpha * w
        norm.weight.copy_(w.to(norm.weight.dtype))
    new.o_proj.weight.copy_((scale * folded).to(dtype))
    if o_bias is not None:
        new.o_proj.bias.copy_((scale * o_bias.to(torch.float64)).to(dtype))
    # v_proj is kept as it is (its bias, if any, passes through the fold unchanged)
    new.v_proj = old.v_proj
    setattr(layer, arch.attn, new)


def layer_indices(layers: Any, n: int) -> list[int]:
    """Distinct integer layer indices in 0..n-1, in the given order. Raises ValueError naming the problem."""
    out: list[int] = []
    for x in layers:
        i = _as_index(x)
        if i is None:
            raise ValueError(f"Layer index {x!r} is not an integer.")
        if not 0 <= i < n:
            raise ValueError(f"Layer index {i} is out of range: this model has layers 0..{n - 1}.")
        out.append(i)
    dup = sorted({i for i in out if out.count(i) > 1})
    if dup:
        raise ValueError(f"Layer indices must be distinct; repeated: {dup}.")
    return out


def validate_plan(config: Any, layers: Any, alphas: Any) -> tuple[list[int], list[float]]:
    """Check a (layers, alphas) plan against a config; return it normalised. Raises ValueError."""
    arch_for(config)
    block = HarpBlock.from_lists(layers, alphas, config.num_hidden_layers)
    return list(block.layers), list(block.alphas)


# --------------------------------------------------------------------------------------------
# The harp block: config.harp = {"format_version", "layers", "alphas"}
# --------------------------------------------------------------------------------------------


class HarpBlockError(ValueError):
    """A stored harp block that cannot be used. `problems` lists everything wrong with it, one clause each
    (no location, no remedy: the caller adds them), except `newer`: the clause saying the format version
    is newer than this code reads, if it is one of them, which carries its own remedy."""

    def __init__(self, problems: list[str], newer: str | None = None) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
        self.newer = newer


def _as_index(i: Any) -> int | None:
    """`i` as a layer index, or None if it is not an integer (a bool is not one)."""
    if isinstance(i, bool):
        return None
    try:
        return operator.index(i)
    except TypeError:
        return None


@dataclass(frozen=True)
class HarpBlock:
    """The pruned layers of a model and their alphas: `config.harp` as stored in config.json,
    `{"format_version": 1, "layers": [...], "alphas": [...]}`. The one parser and validator of it; an
    empty block (no layers) is falsy and means an unpruned model."""

    layers: tuple[int, ...] = ()
    alphas: tuple[float, ...] = ()
    format_version: int = FORMAT_VERSION
    window_layers: tuple[int, ...] = ()  # layers that keep attention over their last `windows` positions
    windows: tuple[int, ...] = ()
    sinks: tuple[int, ...] = ()  # and over the first `sinks` positions (one per window layer; () = none)
    fitted_sinks: tuple[int, ...] = ()  # window layers with a fitted sink (FittedSink) instead, sorted

    def __bool__(self) -> bool:
        return bool(self.layers or self.window_layers)

    @classmethod
    def from_dict(cls, block: Any, num_layers: int | None = None) -> HarpBlock:
        """A stored block, checked: an object, a positive format version this code reads, integer layer
        indices in 0..num_layers-1 (when known) without repeats, finite numeric alphas, one per layer.
        Raises HarpBlockError listing every problem."""
        if not isinstance(block, dict):
            raise HarpBlockError([f"the 'harp' block is {type(block).__name__}, not an object"])
        problems: list[str] = []
        newer = None
        version = block.get("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            problems.append(f"harp format_version {version!r} is not a positive integer")
        elif version > FORMAT_VERSION:
            newer = (f"HARP format version {version} is newer than this harp-prune reads (up to "
                     f"{FORMAT_VERSION}): upgrade harp-prune (pip install -U harp-prune)")
            problems.append(newer)
        layers, alphas = block.get("layers"), block.get("alphas")
        good_layers: list[int] = []
        good_alphas: list[float] = []
        if not isinstance(layers, list):
            problems.append(f"harp 'layers' is {layers!r}, not a list of layer indices")
        else:
            for i in layers:
                idx = _as_index(i)
                if idx is None:
                    problems.append(f"harp layer index {i!r} is not an integer")
                else:
                    good_layers.append(idx)
            if num_layers is not None:
                bad = [i for i in good_layers if not 0 <= i < num_layers]
                if bad:
                    problems.append(f"harp layers {bad} are out of range: the model has layers 0..{num_layers - 1}")
            dup = sorted({i for i in good_layers if good_layers.count(i) > 1})
            if dup:
                problems.append(f"harp layers repeat {dup}")
        if not isinstance(alphas, list):
            problems.append(f"harp 'alphas' is {alphas!r}, not a list of numbers")
        else:
            for a in alphas:
                if isinstance(a, bool) or not isinstance(a, int | float):
                    problems.append(f"harp alpha {a!r} is not a number")
                elif not math.isfinite(a):
                    problems.append(f"harp alpha {a} is not finite")
                else:
                    good_alphas.append(float(a))
        if isinstance(layers, list) and isinstance(alphas, list) and len(layers) != len(alphas):
            problems.append(f"harp block has {len(layers)} layers but {len(alphas)} alphas (one per layer)")
        wl, ws, sk = _read_windows(block, num_layers, set(good_layers), problems)
        sink_tokens = dict(zip(wl, sk or (0,) * len(wl), strict=True))
        fitted = _read_fitted_sinks(block.get("fitted_sinks", []), sink_tokens, problems)
        if problems:
            raise HarpBlockError(problems, newer)
        return cls(tuple(good_layers), tuple(good_alphas), version, wl, ws, sk, fitted)

    @staticmethod
    def _stored(config: Any) -> tuple[Any, Any]:
        """(the harp block, num_hidden_layers) of a config object, a model or a config.json dict, unchecked."""
        if isinstance(config, nn.Module):
            config = config.config
        if isinstance(config, dict):
            return config.get("harp"), config.get("num_hidden_layers")
        return getattr(config, "harp", None), getattr(config, "num_hidden_layers", None)

    @classmethod
    def from_config(cls, config: Any) -> HarpBlock:
        """The block of a config object, a model (its config) or a config.json dict; empty if it has none.
        Checked against the config's `num_hidden_layers` (HarpBlockError)."""
        block, n = cls._stored(config)
        if not block:
            return cls()
        return cls.from_dict(block, n if _as_index(n) is not None else None)

    @classmethod
    def is_pruned(cls, config: Any) -> bool:
        """Whether a config object, model or config.json dict carries a harp block (not checked)."""
        return bool(cls._stored(config)[0])

    @classmethod
    def from_lists(cls, layers: Any, alphas: Any, num_layers: int) -> HarpBlock:
        """A block from user arguments (`prune(model, layers, alphas)`): integer indices in
        0..num_layers-1, distinct, any order; one finite alpha per layer (anything `float` takes).
        Raises ValueError naming the first problem."""
        if layers is None or alphas is None:
            raise ValueError("prune() needs both layers=[...] and alphas=[...] (one alpha per layer).")
        layers, alphas = list(layers), list(alphas)
        if len(layers) != len(alphas):
            raise ValueError(
                f"Got {len(layers)} layer indices but {len(alphas)} alphas: pass exactly one alpha per layer."
            )
        out_layers = layer_indices(layers, num_layers)
        out_alphas: list[float] = []
        for a in alphas:
            try:
                a = float(a)
            except (TypeError, ValueError):
                raise ValueError(f"Alpha {a!r} is not a number.") from None
            if not math.isfinite(a):
                raise ValueError(f"Alpha {a} is not finite: alphas must be finite real numbers (typically 0..1).")
            out_alphas.append(a)
        return cls(tuple(out_layers), tuple(out_alphas))

    @property
    def plan(self) -> dict[int, float]:
        """{layer index: alpha} of the bypassed layers (window layers are in `windows_plan`)."""
        return dict(zip(self.layers, self.alphas, strict=True))

    @property
    def windows_plan(self) -> dict[int, int]:
        """{layer index: window} of the window layers."""
        return dict(zip(self.window_layers, self.windows, strict=True))

    @property
    def sinks_plan(self) -> dict[int, int]:
        """{layer index: sink tokens} of the window layers (0 where none)."""
        return dict(zip(self.window_layers, self.sinks or (0,) * len(self.window_layers), strict=True))

    def with_windows(self, windows: Any, num_layers: int, sinks: Any = 0, fitted: Any = ()) -> HarpBlock:
        """This block with window layers `windows` ({layer: w}, w a whole number >= 1) instead of its own,
        each also seeing the first `sinks` positions (a number for all, or {layer: s}), the layers in
        `fitted` with a fitted sink instead. Raises ValueError naming the first problem."""
        windows = dict(windows)
        per = dict(sinks) if isinstance(sinks, dict) else {i: sinks for i in windows}
        problems: list[str] = []
        wl, ws, sk = _read_windows({"window_layers": list(windows), "windows": list(windows.values()),
                                    "sinks": [per.get(i, 0) for i in windows]}, num_layers, set(self.layers), problems)
        fit = _read_fitted_sinks(list(fitted), dict(zip(wl, sk or (0,) * len(wl), strict=True)), problems)
        if problems:
            raise ValueError(problems[0][0].upper() + problems[0][1:] + ".")
        return HarpBlock(self.layers, self.alphas, self.format_version, *_sorted_windows(wl, ws, sk), fit)

    def merged(self, other: HarpBlock) -> HarpBlock:
        """This block plus the layers of `other` (none in common), sorted by layer."""
        mine, theirs = set(self.layers) | set(self.window_layers), set(other.layers) | set(other.window_layers)
        again = sorted(mine & theirs)
        if again:
            raise ValueError(f"Layers {again} are already pruned in this model; prune each layer once.")
        pairs = sorted(zip(self.layers + other.layers, self.alphas + other.alphas, strict=True))
        sinks = tuple(self.sinks_plan.values()) + tuple(other.sinks_plan.values())
        return HarpBlock(tuple(i for i, _ in pairs), tuple(a for _, a in pairs), FORMAT_VERSION,
                         *_sorted_windows(self.window_layers + other.window_layers, self.windows + other.windows,
                                          sinks), tuple(sorted(self.fitted_sinks + other.fitted_sinks)))

    def to_dict(self) -> dict[str, Any]:
        """The block as config.json stores it: format version 1 without window layers (what every harp
        release reads), 2 with them, 3 with fitted sinks (a release that cannot build them refuses the
        checkpoint); `sinks` only when a window layer has some, `fitted_sinks` only when one has that."""
        if not self.window_layers:
            return {"format_version": 1, "layers": list(self.layers), "alphas": list(self.alphas)}
        out = {"format_version": 3 if self.fitted_sinks else 2, "layers": list(self.layers),
               "alphas": list(self.alphas), "window_layers": list(self.window_layers), "windows": list(self.windows)}
        if any(self.sinks):
            out["sinks"] = list(self.sinks)
        if self.fitted_sinks:
            out["fitted_sinks"] = list(self.fitted_sinks)
        return out

    def top_first(self) -> list[tuple[int, float]]:
        """(layer, alpha) pairs, top layer first: the order harp prints them in."""
        return sorted(zip(self.layers, self.alphas, strict=True), reverse=True)

    def layers_text(self) -> str:
        """'29, 28': the pruned layers, top first."""
        return ", ".join(str(i) for i, _ in self.top_first())

    def alphas_text(self) -> str:
        """'1, 0.5': their alphas, in the same order."""
        return ", ".join(f"{a:g}" for _, a in self.top_first())

    def windows_text(self) -> str:
        """'12:256, 11:256+4, 10:256+fit': the window layers and their windows (+ sink tokens, or + a fitted
        sink), top first."""
        sinks = self.sinks_plan
        return ", ".join(f"{i}:{w}" + (f"+{sinks[i]}" if sinks[i] else "+fit" if i in self.fitted_sinks else "")
                         for i, w in sorted(self.windows_plan.items(), reverse=True))

    def describe(self) -> str:
        """'layers (top first) 29, 28, alphas 1, 0.5' (and ', windows 12:256' when there are window layers)."""
        text = f"layers (top first) {self.layers_text()}, alphas {self.alphas_text()}"
        return text + (f", windows {self.windows_text()}" if self.window_layers else "")


def _sorted_windows(layers: tuple[int, ...], windows: tuple[int, ...],
                    sinks: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    rows = sorted(zip(layers, windows, sinks or (0,) * len(layers), strict=True))
    if not any(s for _, _, s in rows):
        return tuple(r[0] for r in rows), tuple(r[1] for r in rows), ()
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows)


def _read_windows(block: dict[str, Any], num_layers: int | None, bypassed: set[int],
                  problems: list[str]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The window layers of a stored block (`window_layers`, `windows` and optionally `sinks`: parallel
    lists), checked; problems are appended to `problems`, one clause each."""
    layers, windows = block.get("window_layers", []), block.get("windows", [])
    sinks = block.get("sinks", [0] * len(layers) if isinstance(layers, list) else [])
    if not isinstance(layers, list) or not isinstance(windows, list) or not isinstance(sinks, list):
        problems.append("harp 'window_layers', 'windows' and 'sinks' must be lists (one per window layer)")
        return (), (), ()
    if not len(layers) == len(windows) == len(sinks):
        problems.append(f"harp block has {len(layers)} window layers, {len(windows)} windows and {len(sinks)} "
                        "sink counts (one of each per layer)")
        return (), (), ()
    good_l: list[int] = []
    good_w: list[int] = []
    good_s: list[int] = []
    for i, w, sk in zip(layers, windows, sinks, strict=True):
        idx, win, sink = _as_index(i), _as_index(w), _as_index(sk)
        if idx is None:
            problems.append(f"harp window layer index {i!r} is not an integer")
        elif num_layers is not None and not 0 <= idx < num_layers:
            problems.append(f"harp window layer {idx} is out of range: the model has layers 0..{num_layers - 1}")
        elif idx in bypassed:
            problems.append(f"harp layer {idx} is both bypassed and a window layer")
        elif win is None or win < 1:
            problems.append(f"harp window {w!r} of layer {idx} is not a whole number of tokens >= 1")
        elif sink is None or sink < 0:
            problems.append(f"harp sink count {sk!r} of layer {idx} is not a whole number >= 0")
        else:
            good_l.append(idx)
            good_w.append(win)
            good_s.append(sink)
    dup = sorted({i for i in good_l if good_l.count(i) > 1})
    if dup:
        problems.append(f"harp window layers repeat {dup}")
    return _sorted_windows(tuple(good_l), tuple(good_w), tuple(good_s))


def _read_fitted_sinks(fitted: Any, sinks: dict[int, int], problems: list[str]) -> tuple[int, ...]:
    """The window layers with a fitted sink (`fitted_sinks`, a list of layer indices), checked against the
    window layers' sink tokens `sinks` ({layer: s}); problems are appended, one clause each."""
    if not isinstance(fitted, list):
        problems.append("harp 'fitted_sinks' must be a list of window layer indices")
        return ()
    good: list[int] = []
    for i in fitted:
        idx = _as_index(i)
        if idx is None or idx not in sinks:
            problems.append(f"harp fitted sink layer {i!r} is not a window layer")
        elif sinks[idx]:
            problems.append(f"harp window layer {idx} has both {sinks[idx]} sink tokens and a fitted sink")
        elif idx in good:
            problems.append(f"harp fitted sink layers repeat {idx}")
        else:
            good.append(idx)
    return tuple(sorted(good))


def harp_model_class(base_cls: type) -> type:
    """A subclass of a transformers model class whose `__init__` builds the pruned structure given by
    `config.harp`, so `from_pretrained` loads a HARP checkpoint with strict key matching."""

    class HarpForCausalLM(base_cls):  # type: ignore[misc, valid-type]
        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            harp = getattr(config, "harp", None)
            if harp:
                apply_structure(self, harp)

    HarpForCausalLM.__qualname__ = HarpForCausalLM.__name__ = f"Harp{base_cls.__name__}"
    return HarpForCausalLM
