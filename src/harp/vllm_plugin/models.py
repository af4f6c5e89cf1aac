"""HARP models for vLLM, built from vLLM's own parallel layers.

- An unpruned layer is vLLM's decoder layer of the family (``LlamaDecoderLayer``,
  ``MistralDecoderLayer``, ``Qwen2DecoderLayer``, ``Qwen3DecoderLayer``): its norms, rotary embedding,
  fused QKV projection and ``Attention`` module, exactly as vLLM runs the original model.
- A pruned layer with alpha != 0 computes ``o_proj(v_proj(input_layernorm(x)))``: ``v_proj`` is a
  column-parallel linear (hidden -> kv_dim, Qwen2's v bias included) and the folded ``o_proj`` a
  row-parallel linear (kv_dim -> hidden) — each rank holds a slice of kv_dim, one all-reduce per
  layer, exact under any tensor-parallel size that divides kv_dim. It has no ``Attention`` module.
- A pruned layer with alpha = 0 has no attention sub-layer and no input norm at all.
- A window layer (format version 2) is vLLM's own decoder layer of the family whose ``Attention`` has a
  sliding window of w positions (the token itself and the w - 1 before it; a layer the family already
  makes local keeps the smaller of the two windows), built from the family's own code: a copy of the HF
  config whose ``sliding_window`` (and, for LLaMA / Mistral, ``layer_types``) says so, or, where the
  family's layer takes the model-wide window, a copy of the cache config with ``sliding_window = w``. So
  Gemma 3 keeps each layer's own RoPE base (a windowed global layer keeps the global one).
- A window layer with a fitted sink (format version 3) is the same layer whose ``Attention`` also takes
  the per-head sink logits (vLLM's ``sinks``, gpt-oss's ``s_aux``: one more softmax column with no value;
  each tensor-parallel rank holds its heads' slice) and whose attention output gets the fitted bias.

vLLM sizes its KV cache from the ``Attention`` modules it finds, so pruned layers get no KV cache:
the number of cache blocks at a given KV memory grows by L / (L - k). A window layer's cache is vLLM's
sliding-window spec: per sequence it holds the last w - 1 tokens plus those being computed (whole blocks).

The checkpoint is the one ``harp.save`` writes (see harp/modeling.py for what each tensor is); a
refit layer is just another folded ``o_proj`` of the same shape.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any, ClassVar

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models import gemma, gemma2, gemma3, llama, mistral, qwen2, qwen3
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    extract_layer_index,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from harp.modeling import FORMAT_VERSION, HarpBlock, HarpBlockError

# The HARP checkpoint formats this plugin knows how to build. Its own list, not modeling.FORMAT_VERSION: a
# new checkpoint format must be taught to the plugin before it serves it (the test suite checks they agree).
SERVED_FORMAT_VERSIONS = (1, 2, 3)

# --------------------------------------------------------------------------------------------
# The checkpoint's HARP block
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """How vLLM builds one supported family."""

    name: str
    model_types: tuple[str, ...]
    harp_class: str
    # (vllm_config, hf_config, prefix, cache_config) -> vLLM's own decoder layer (cache_config None: the
    # engine's; LLaMA / Mistral ignore it, their window comes through the HF config's layer_types)
    decoder_layer: Callable[[VllmConfig, Any, str, Any], nn.Module]
    # (hf_config, quant_config, prefix) -> vLLM's own MLP of that family
    mlp: Callable[[Any, Any, str], nn.Module]
    v_bias: Callable[[Any], bool]
    o_bias: Callable[[Any], bool]
    gemma: bool = False  # Gemma: (1 + w) RMS norms, embeddings scaled by sqrt(hidden)
    sandwich: bool = False  # Gemma 2/3: attention output norm, and pre/post-MLP norms
    # how vLLM's layer of the family picks its sliding window: "layer_types" (config.layer_types[i] ==
    # "sliding_attention" -> config.sliding_window, LLaMA / Mistral: a window layer is marked so in a copy of
    # the config), "local" (the same for the family's own local layers, the cache config's window for the
    # others, Gemma 2/3) or "cache" (the cache config's model-wide window: Qwen2, Qwen3, Gemma)
    window_by: str = "cache"


def _llama_qkv_bias(c: Any) -> bool:
    bias = bool(getattr(c, "attention_bias", False) or getattr(c, "bias", False))
    return bool(c.qkv_bias) if hasattr(c, "qkv_bias") else bias


def _llama_o_bias(c: Any) -> bool:
    return bool(getattr(c, "attention_bias", False) or getattr(c, "bias", False))


def _mlp(cls: Any, bias: bool) -> Callable[[Any, Any, str], nn.Module]:
    """A builder of the family's vLLM MLP (`cls`); `bias`: whether the family's config may ask for an
    MLP bias (LLaMA's `mlp_bias`; Qwen2's MLP has none)."""

    def build(c: Any, q: Any, prefix: str) -> nn.Module:
        extra = {"bias": getattr(c, "mlp_bias", False)} if bias else {}
        return cls(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, hidden_act=c.hidden_act,
                   quant_config=q, prefix=prefix, **extra)

    return build


def _gemma_mlp(cls: type) -> Callable[[Any, Any, str], nn.Module]:
    def build(c: Any, q: Any, prefix: str) -> nn.Module:
        kw: dict[str, Any] = {"hidden_activation": getattr(c, "hidden_activation", None)}
        if cls is gemma.GemmaMLP:
            kw["hidden_act"] = getattr(c, "hidden_act", None)
        return cls(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, quant_config=q, prefix=prefix,
                   **kw)

    return build


def _attention_bias(c: Any) -> bool:
    return bool(getattr(c, "attention_bias", False))


def _qwen_layer(cls: type) -> Callable[[VllmConfig, Any, str, Any], nn.Module]:
    def build(vllm_config: VllmConfig, config: Any, prefix: str, cache_config: Any = None) -> nn.Module:
        return cls(config=config, cache_config=cache_config or vllm_config.cache_config,
                   quant_config=vllm_config.quant_config, prefix=prefix)

    return build


FAMILIES: dict[str, Family] = {
    "llama": Family(
        "LLaMA",
        ("llama",),
        "HarpLlamaForCausalLM",
        lambda v, c, p, _=None: llama.LlamaDecoderLayer(vllm_config=v, prefix=p, config=c),
        _mlp(llama.LlamaMLP, bias=True),
        _llama_qkv_bias,
        _llama_o_bias,
        window_by="layer_types",
    ),
    "mistral": Family(
        "Mistral",
        ("mistral",),
        "HarpMistralForCausalLM",
        lambda v, c, p, _=None: mistral.MistralDecoderLayer(vllm_config=v, prefix=p, config=c),
        _mlp(llama.LlamaMLP, bias=True),
        _llama_qkv_bias,
        _llama_o_bias,
        window_by="layer_types",
    ),
    "qwen2": Family(
        "Qwen2",
        ("qwen2",),
        "HarpQwen2ForCausalLM",
        _qwen_layer(qwen2.Qwen2DecoderLayer),
        _mlp(qwen2.Qwen2MLP, bias=False),
        lambda c: True,
        lambda c: False,
    ),
    "qwen3": Family(
        "Qwen3",
        ("qwen3",),
        "HarpQwen3ForCausalLM",
        _qwen_layer(qwen3.Qwen3DecoderLayer),
        _mlp(qwen2.Qwen2MLP, bias=False),
        _attention_bias,
        _attention_bias,
    ),
    "gemma": Family(
        "Gemma", ("gemma",), "HarpGemmaForCausalLM", _qwen_layer(gemma.GemmaDecoderLayer),
        _gemma_mlp(gemma.GemmaMLP), _attention_bias, _attention_bias, gemma=True,
    ),
    "gemma2": Family(
        "Gemma2", ("gemma2",), "HarpGemma2ForCausalLM", _qwen_layer(gemma2.Gemma2DecoderLayer),
        _gemma_mlp(gemma2.Gemma2MLP), _attention_bias, _attention_bias, gemma=True, sandwich=True,
        window_by="local",
    ),
    "gemma3": Family(
        "Gemma3", ("gemma3_text",), "HarpGemma3ForCausalLM", _qwen_layer(gemma3.Gemma3DecoderLayer),
        _gemma_mlp(gemma3.Gemma3MLP), _attention_bias, _attention_bias, gemma=True, sandwich=True,
        window_by="local",
    ),
}


def supported_summary() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())


def _family_of(config: Any) -> Family | None:
    mt = getattr(config, "model_type", None)
    for fam in FAMILIES.values():
        if mt in fam.model_types:
            return fam
    return None


def _stored_block(config: Any) -> dict[str, Any] | None:
    harp = getattr(config, "harp", None)
    if harp is None and hasattr(config, "to_dict"):
        harp = config.to_dict().get("harp")
    return harp or None


def harp_block(config: Any) -> HarpBlock:
    """The pruned layers (`plan`: layer -> alpha) and window layers (`windows_plan`: layer -> w) of
    `config.harp` (an empty, falsy block for an unpruned model).

    Raises ValueError for a HARP block this plugin cannot serve: an unknown format version, an
    unsupported family, or a malformed plan — before vLLM builds anything.
    """
    harp = _stored_block(config)
    if not harp:
        return HarpBlock()
    if not isinstance(harp, dict):
        raise ValueError(f"harp vLLM plugin: config.json's 'harp' block must be an object, got {type(harp).__name__}.")
    try:
        version = int(harp.get("format_version", 1))
    except (TypeError, ValueError):
        version = -1
    if version not in SERVED_FORMAT_VERSIONS:
        raise ValueError(
            f"harp vLLM plugin: this checkpoint uses HARP format version {harp.get('format_version')!r}; the "
            f"installed harp-prune serves versions {list(SERVED_FORMAT_VERSIONS)} in vLLM (it writes version "
            f"{FORMAT_VERSION}). Upgrade harp-prune in the vLLM "
            "environment (pip install -U 'harp-prune[vllm]'), or load the folder with transformers "
            "(harp.load / trust_remote_code=True)."
        )
    layers = list(harp.get("layers") or [])
    alphas = list(harp.get("alphas") or [])
    if len(layers) != len(alphas):
        raise ValueError(f"harp vLLM plugin: the 'harp' block has {len(layers)} layers but {len(alphas)} alphas.")
    # window layers as harp.load reads them (HarpBlock), whatever the version says
    stored = {"layers": layers, "alphas": alphas,
              **{k: harp[k] for k in ("window_layers", "windows", "sinks", "fitted_sinks") if k in harp}}
    if not layers and not stored.get("window_layers"):
        return HarpBlock()
    mt = getattr(config, "model_type", None)
    if _family_of(config) is None:
        raise ValueError(
            f"harp vLLM plugin: this is a HARP checkpoint of model_type {mt!r}, which the vLLM plugin does not "
            f"serve. It serves HARP checkpoints of {supported_summary()}. Alternatives for this model: "
            "transformers (harp.load(DIR) or AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)), "
            "or a GGUF export (`harp export`, `fmt=gguf`) for llama.cpp where the family allows it (docs/serving.md)."
        )
    n = int(config.num_hidden_layers)
    try:  # the format version was checked above, against the versions this plugin serves
        block = HarpBlock.from_dict(stored, n)
    except HarpBlockError as e:
        problems = "; ".join(e.problems)
        raise ValueError(f"harp vLLM plugin: bad 'harp' block ({problems}; model has {n} layers).") from None
    if any(block.sinks):
        raise ValueError(
            f"harp vLLM plugin: window layers {block.windows_text()} (layer:window+sinks) keep sink tokens, which "
            "vLLM's sliding-window attention cannot (it would drop the first tokens). Prune with `sinks=0` or "
            "`sinks='fit'` (a fitted sink in their place) to serve the windows in vLLM, or serve this checkpoint "
            "with transformers (harp.load(DIR))."
        )
    return block


def harp_plan(config: Any) -> dict[int, float]:
    """layer index -> alpha of the bypassed layers in `config.harp` ({} for an unpruned model; window
    layers are in `harp_block(config).windows_plan`). Raises ValueError as `harp_block`."""
    return harp_block(config).plan


def has_pruned_layers(vllm_config: VllmConfig) -> bool:
    """Whether the config has bypassed or window layers (the HARP model serves it, not vLLM's own)."""
    return bool(harp_block(vllm_config.model_config.hf_config))


# --------------------------------------------------------------------------------------------
# Pruned layers
# --------------------------------------------------------------------------------------------


class HarpLinearAttention(nn.Module):
    """`o_proj(v_proj(x))`: v column-parallel, folded o row-parallel (one all-reduce)."""

    def __init__(self, hidden: int, kv_dim: int, v_bias: bool, o_bias: bool, quant_config: Any, prefix: str) -> None:
        super().__init__()
        self.v_proj = ColumnParallelLinear(
            hidden, kv_dim, bias=v_bias, gather_output=False, quant_config=quant_config, prefix=f"{prefix}.v_proj"
        )
        self.o_proj = RowParallelLinear(
            kv_dim, hidden, bias=o_bias, input_is_parallel=True, quant_config=quant_config, prefix=f"{prefix}.o_proj"
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        v, _ = self.v_proj(hidden_states)
        out, _ = self.o_proj(v)
        return out


class HarpDecoderLayer(nn.Module):
    """A pruned decoder layer: linear attention (alpha != 0) or none (alpha = 0), then the unchanged MLP."""

    def __init__(self, vllm_config: VllmConfig, config: Any, family: Family, alpha: float, prefix: str) -> None:
        super().__init__()
        quant_config = vllm_config.quant_config
        hidden = config.hidden_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        norm = GemmaRMSNorm if family.gemma else RMSNorm
        eps = config.rms_norm_eps
        self.layer_idx = extract_layer_index(prefix)
        self.alpha = alpha
        self.sandwich = family.sandwich
        self.input_layernorm = self.self_attn = self.post_attention_layernorm = None
        if alpha != 0.0:
            self.input_layernorm = norm(hidden, eps=eps)
            self.self_attn = HarpLinearAttention(
                hidden, kv_heads * head_dim, family.v_bias(config), family.o_bias(config), quant_config,
                f"{prefix}.self_attn",
            )
        if family.sandwich:
            # Gemma 2/3: post_attention_layernorm norms the attention output (alpha is folded into its
            # weight; gone with the attention when alpha = 0); the MLP has its own pre and post norms
            if alpha != 0.0:
                self.post_attention_layernorm = norm(hidden, eps=eps)
            self.pre_feedforward_layernorm = norm(hidden, eps=eps)
            self.post_feedforward_layernorm = norm(hidden, eps=eps)
        else:  # post_attention_layernorm is the MLP's input norm
            self.post_attention_layernorm = norm(hidden, eps=eps)
        self.mlp = family.mlp(config, quant_config, f"{prefix}.mlp")

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.self_attn is not None:
            if residual is None:
                residual = hidden_states
                hidden_states = self.input_layernorm(hidden_states)
            else:
                hidden_states, residual = self.input_layernorm(hidden_states, residual)
            hidden_states = self.self_attn(hidden_states)
            if self.sandwich:
                hidden_states = self.post_attention_layernorm(hidden_states)
        # alpha = 0: the attention sub-layer adds nothing; (hidden_states, residual) are still the stream
        pre_mlp = self.pre_feedforward_layernorm if self.sandwich else self.post_attention_layernorm
        if residual is None:
            residual = hidden_states
            hidden_states = pre_mlp(hidden_states)
        else:
            hidden_states, residual = pre_mlp(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        if self.sandwich:
            hidden_states = self.post_feedforward_layernorm(hidden_states)
        return hidden_states, residual


# --------------------------------------------------------------------------------------------
# Window layers: the family's own layer, its attention limited to the last w positions
# --------------------------------------------------------------------------------------------


def _is_local(config: Any, idx: int) -> bool:
    types = getattr(config, "layer_types", None) or []
    return idx < len(types) and types[idx] == "sliding_attention"


def window_decoder_layer(vllm_config: VllmConfig, config: Any, family: Family, window: int, prefix: str) -> nn.Module:
    """vLLM's own decoder layer of `family` for window layer `prefix`: its attention sees the token and the
    `window` - 1 before it (or fewer, where the family already makes the layer local with a smaller window)."""
    idx = extract_layer_index(prefix)
    cache_config = vllm_config.cache_config
    per_layer = family.window_by != "cache" and _is_local(config, idx)  # the family's own per-layer window
    own = config.sliding_window if per_layer else cache_config.sliding_window
    w = min(window, own) if own else window
    if per_layer or family.window_by == "layer_types":
        # a copy of the HF config that makes this layer local with window w (Gemma 2/3: only their own local
        # layers come here, so each keeps its own RoPE base)
        config = copy.copy(config)
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
        types[idx] = "sliding_attention"
        config.layer_types, config.sliding_window = types, w
        layer = family.decoder_layer(vllm_config, config, prefix, None)
    else:  # the layer takes the model-wide window from its cache config (Gemma 2/3: a global layer)
        cache_config = copy.copy(cache_config)
        cache_config.sliding_window = w
        layer = family.decoder_layer(vllm_config, config, prefix, cache_config)
    got = [m.sliding_window for m in layer.modules() if isinstance(m, Attention)]
    if got != [w]:  # a vLLM whose layer picks its window another way: refuse rather than attend past w
        raise ValueError(
            f"harp vLLM plugin: window layer {idx} should attend over {w} positions, but this vLLM's "
            f"{type(layer).__name__} built attention with sliding windows {got}; serve the checkpoint with "
            "transformers (harp.load) instead."
        )
    return layer


_SINK_CLASSES: dict[type, type] = {}


def _with_output_bias(base: type) -> type:
    """The family's vLLM attention class whose output gets `harp_sink_bias` added (after o_proj's
    all-reduce: every rank adds the whole bias to the whole output)."""
    if base not in _SINK_CLASSES:
        def forward(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            return base.forward(self, *args, **kwargs) + self.harp_sink_bias

        _SINK_CLASSES[base] = type(f"HarpSink{base.__name__}", (base,), {"forward": forward, "__module__": __name__})
    return _SINK_CLASSES[base]


def fit_sink(layer: nn.Module, hidden: int) -> None:
    """Give window layer `layer` (vLLM's own) its fitted sink: `self_attn.harp_sink_logit` (this rank's
    heads; the checkpoint's tensor holds all of them) as its Attention's sinks, `self_attn.harp_sink_bias`
    added to the attention output. The checkpoint's weights fill both."""
    attn = next(m for m in layer.modules() if isinstance(m, Attention))
    heads, rank = attn.num_heads, get_tensor_model_parallel_rank()

    def load_slice(param: torch.Tensor, loaded: torch.Tensor) -> None:
        param.data.copy_(loaded.narrow(0, rank * heads, heads))

    logit = nn.Parameter(torch.zeros(heads), requires_grad=False)
    logit.weight_loader = load_slice  # type: ignore[attr-defined]
    self_attn = layer.self_attn
    self_attn.harp_sink_logit = logit
    self_attn.harp_sink_bias = nn.Parameter(torch.zeros(hidden), requires_grad=False)
    self_attn.__class__ = _with_output_bias(type(self_attn))
    attn.impl.sinks = logit


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": {0: "b"},
        "positions": {0: "b"},
        "intermediate_tensors": {0: "b"},
        "inputs_embeds": {0: "b"},
    },
)
class HarpModel(nn.Module):
    family_key: ClassVar[str] = "llama"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        family = FAMILIES[self.family_key]
        block = harp_block(config)
        plan, windows = block.plan, block.windows_plan
        self.config = config
        self.plan = plan
        self.windows = windows
        self.vocab_size = config.vocab_size
        if get_pp_group().is_first_rank or (config.tie_word_embeddings and get_pp_group().is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                prefix=f"{prefix}.embed_tokens",
            )
        else:
            self.embed_tokens = PPMissingLayer()

        def build(prefix: str) -> nn.Module:
            idx = extract_layer_index(prefix)
            if idx in plan:
                return HarpDecoderLayer(vllm_config, config, family, plan[idx], prefix)
            if idx in windows:
                layer = window_decoder_layer(vllm_config, config, family, windows[idx], prefix)
                if idx in block.fitted_sinks:
                    fit_sink(layer, config.hidden_size)
                return layer
            return family.decoder_layer(vllm_config, config, prefix, None)

        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, build, prefix=f"{prefix}.layers"
        )
        if get_pp_group().is_last_rank:
            self.norm = (GemmaRMSNorm if family.gemma else RMSNorm)(config.hidden_size, eps=config.rms_norm_eps)
        else:
            self.norm = PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )
        self.scale_embeddings = family.gemma
        if family.gemma:  # as vLLM's Gemma models: sqrt(hidden) in the model's dtype
            self.register_buffer("normalizer", torch.tensor(config.hidden_size**0.5), persistent=False)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.scale_embeddings:
            return self.embed_tokens(input_ids) * self.normalizer
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


# checkpoint name fragment -> (vLLM parameter fragment, shard id), for vLLM's own (unpruned) layers
_STACKED = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
)


class _HarpForCausalLM(nn.Module, SupportsPP):
    """A HARP checkpoint of one family in vLLM (see the module docstring)."""

    model_class: ClassVar[type[HarpModel]] = HarpModel

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        family = FAMILIES[self.model_class.family_key]
        if getattr(config, "model_type", None) not in family.model_types:
            raise ValueError(
                f"harp vLLM plugin: {type(self).__name__} serves {family.name} checkpoints, but this config has "
                f"model_type {config.model_type!r}. Supported: {supported_summary()}."
            )
        harp_block(config)  # validate before allocating anything
        self.config = config
        self.model = self.model_class(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
            self.logits_processor = LogitsProcessor(
                config.vocab_size, scale=getattr(config, "logit_scale", 1.0),
                soft_cap=getattr(config, "final_logit_softcapping", None),
            )
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        plan = self.model.plan
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or "rotary_emb.cos_cached" in name or "rotary_emb.sin_cached" in name:
                continue
            if self.config.tie_word_embeddings and name.startswith("lm_head."):
                continue
            idx = None
            if name.startswith("model.layers."):
                idx = int(name.split(".")[2])
            pruned = idx is not None and idx in plan
            target, shard = name, None
            if not pruned:  # vLLM's own layer: q/k/v and gate/up live in stacked parameters
                for stacked, part, shard_id in _STACKED:
                    if part in name:
                        target, shard = name.replace(part, stacked), shard_id
                        break
            elif ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
                part, shard = (".gate_proj.", 0) if ".gate_proj." in name else (".up_proj.", 1)
                target = name.replace(part, ".gate_up_proj.")
            if is_pp_missing_parameter(target, self):
                continue
            param = params.get(target)
            if param is None:
                what = f"pruned layer {idx} (alpha {plan[idx]})" if pruned else "this model"
                raise ValueError(
                    f"harp vLLM plugin: checkpoint tensor {name!r} has no place in {what}. The folder's weights do "
                    "not match its config's 'harp' block; re-save it with harp.save."
                )
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(target)
        return loaded


def _family_classes(key: str) -> tuple[type[HarpModel], type[_HarpForCausalLM]]:
    name = FAMILIES[key].harp_class
    model_cls = type(name.replace("ForCausalLM", "Model"), (HarpModel,), {"family_key": key, "__module__": __name__})
    lm_cls = type(name, (_HarpForCausalLM,), {"model_class": model_cls, "__module__": __name__})
    return model_cls, lm_cls


HarpLlamaModel, HarpLlamaForCausalLM = _family_classes("llama")
HarpMistralModel, HarpMistralForCausalLM = _family_classes("mistral")
HarpQwen2Model, HarpQwen2ForCausalLM = _family_classes("qwen2")
HarpQwen3Model, HarpQwen3ForCausalLM = _family_classes("qwen3")
HarpGemmaModel, HarpGemmaForCausalLM = _family_classes("gemma")
HarpGemma2Model, HarpGemma2ForCausalLM = _family_classes("gemma2")
HarpGemma3Model, HarpGemma3ForCausalLM = _family_classes("gemma3")


# --------------------------------------------------------------------------------------------
# vLLM's built-in names: its own model unless the config has pruned layers
# --------------------------------------------------------------------------------------------


def _dispatching(base: type[nn.Module], harp_cls: type[_HarpForCausalLM]) -> type[nn.Module]:
    class Dispatch(base):  # type: ignore[misc, valid-type]
        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            vllm_config = kwargs.get("vllm_config", args[0] if args else None)
            if vllm_config is not None and has_pruned_layers(vllm_config):
                return harp_cls(*args, **kwargs)  # not an instance of cls: __init__ below is skipped
            return super().__new__(cls)

    Dispatch.__name__ = Dispatch.__qualname__ = f"{base.__name__}OrHarp"
    Dispatch.__module__ = __name__
    return Dispatch


LlamaOrHarp = _dispatching(llama.LlamaForCausalLM, HarpLlamaForCausalLM)
MistralOrHarp = _dispatching(mistral.MistralForCausalLM, HarpMistralForCausalLM)
Qwen2OrHarp = _dispatching(qwen2.Qwen2ForCausalLM, HarpQwen2ForCausalLM)
Qwen3OrHarp = _dispatching(qwen3.Qwen3ForCausalLM, HarpQwen3ForCausalLM)
GemmaOrHarp = _dispatching(gemma.GemmaForCausalLM, HarpGemmaForCausalLM)
Gemma2OrHarp = _dispatching(gemma2.Gemma2ForCausalLM, HarpGemma2ForCausalLM)
Gemma3OrHarp = _dispatching(gemma3.Gemma3ForCausalLM, HarpGemma3ForCausalLM)
