"""HARP model -> NVIDIA's heterogeneous DeciLM / Nemotron-NAS layout ("deci").

The format (`DeciLMForCausalLM`, `model_type: nemotron-nas`) is LLaMA with one `block_configs`
entry per decoder layer. Its attention sub-layer is one of:

- normal GQA attention (`n_heads_in_group = heads / kv_heads`), tensors `self_attn.{q,k,v,o}_proj`;
- `replace_with_linear`: one bias-free `hidden x hidden` matrix applied to the normed input,
  tensor `self_attn.linear_attn.weight`. A HARP layer with alpha != 0 is exactly that, with
  weight `alpha * W_O R W_V` (the folded o_proj times v_proj);
- `no_op`: no attention and no input norm at all (a HARP layer with alpha = 0).

The FFN keeps its width, stored as `ffn_mult` (width = `int(2 * ffn_mult * hidden / 3)` rounded up to a
multiple of 256). Everything here only reads the model; nothing is written until validation passed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harp.model.accounting import ATTENTION, LINEAR, NONE, layer_kinds
from harp.modeling import HarpBlock

DECI_ARCHITECTURE = "DeciLMForCausalLM"
DECI_MODEL_TYPE = "nemotron-nas"
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# What to do instead, quoted by the errors below.
_USE_TRANSFORMERS = (
    "serve the HARP checkpoint itself with transformers "
    "(AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True), or harp.load(DIR))"
)


class ExportError(ValueError):
    """The model (or a feature of it) cannot be held by the target format. The message says why and
    what to do instead; nothing was written."""


@dataclass
class DeciLayer:
    kind: str  # "attention" | "linear" | "no_op"
    intermediate: int


@dataclass
class DeciModel:
    """A model in DeciLM layout: HF-named tensors plus the numbers every writer needs."""

    layers: list[DeciLayer]
    tensors: dict[str, torch.Tensor]
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    rms_eps: float
    rope: dict[str, Any]  # {"rope_type", "rope_theta", ...} as in transformers' rope_parameters
    tied: bool
    attention_bias: bool
    special_ids: dict[str, Any] = field(default_factory=dict)
    harp: dict[str, Any] = field(default_factory=dict)


# DeciLM's name for each kind of attention sub-layer (`harp.accounting.layer_kinds`): a pruned layer with
# alpha = 0 is DeciLM's `no_op`
DECI_KINDS = {ATTENTION: "attention", LINEAR: "linear", NONE: "no_op"}


def deci_kinds(config: Any) -> list[str]:
    """Per decoder layer, its DeciLM attention kind ("attention", "linear" or "no_op")."""
    return [DECI_KINDS[k] for k in layer_kinds(config)]


def rope_parameters(config: Any) -> dict[str, Any]:
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_type" in rp and isinstance(rp.get("rope_theta"), int | float):
        return dict(rp)
    if isinstance(rp, dict) and "full_attention" in rp:  # per-layer-type parameters
        return dict(rp["full_attention"])
    # transformers 4.x style
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    return {"rope_type": rope_type, "rope_theta": float(getattr(config, "rope_theta", 10000.0)), **scaling}


def _family_problems(config: Any) -> list[str]:
    mt = getattr(config, "model_type", None)
    if mt in ("gemma", "gemma2", "gemma3", "gemma3_text"):
        return [
            f"{mt}: the DeciLM format is LLaMA-shaped and cannot hold Gemma's extra norms "
            "(post_attention_layernorm / post_feedforward_layernorm and (1 + w) RMS norms), its "
            "sqrt(hidden)-scaled embeddings, GeLU MLP or logit soft-capping. Alternative: "
            + _USE_TRANSFORMERS
            + "."
        ]
    if mt in ("qwen3",):
        return [
            "qwen3: attention layers use per-head q/k RMS norms (q_norm, k_norm), which the DeciLM "
            "format has no place for. Alternative: " + _USE_TRANSFORMERS + "."
        ]
    if mt not in ("llama", "mistral", "qwen2"):
        return [
            f"model_type {mt!r}: harp exports only LLaMA-shaped families (llama, mistral, qwen2) to the "
            "DeciLM format. Alternative: " + _USE_TRANSFORMERS + "."
        ]
    return []


def window_problems(config: Any) -> list[str]:
    """harp window layers: the DeciLM layout (and llama.cpp's `deci`) has only full causal attention, so an
    export would silently attend past the window. `config` may be a config object or a config.json dict."""
    block = HarpBlock.from_config(config)
    if not block.window_layers:
        return []
    return [f"harp window layers ({block.windows_text()}, layer:window): the DeciLM format has only full causal "
            "attention, so the exported model would attend past the window and differ from this one. "
            "Alternative: " + _USE_TRANSFORMERS + ", or prune with `kind=bypass` (no window layers) to export."]


def _config_problems(config: Any) -> list[str]:
    problems: list[str] = window_problems(config)
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if hidden % heads or head_dim != hidden // heads:
        problems.append(
            f"head_dim {head_dim} != hidden_size / num_attention_heads ({hidden} / {heads}): the DeciLM "
            "format derives head_dim from hidden_size, so attention layers would be read with the wrong "
            "shape. Alternative: " + _USE_TRANSFORMERS + "."
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        problems.append(
            f"hidden_act {act!r}: the DeciLM FFN is SwiGLU (silu). Alternative: {_USE_TRANSFORMERS}."
        )
    if getattr(config, "mlp_bias", False):
        problems.append(
            "mlp_bias=True: harp does not export MLP biases to the DeciLM format. Alternative: "
            + _USE_TRANSFORMERS
            + "."
        )
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in SUPPORTED_ROPE_TYPES:
        problems.append(
            f"rope_type {rope.get('rope_type')!r}: harp exports rope types {', '.join(SUPPORTED_ROPE_TYPES)} "
            "only. Alternative: " + _USE_TRANSFORMERS + "."
        )
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append("partial_rotary_factor != 1: the DeciLM format rotates whole heads.")
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and (
        getattr(config, "use_sliding_window", True) and window < getattr(config, "max_position_embeddings", 0)
    )
    layer_types = getattr(config, "layer_types", None) or []
    if uses_window or any(t != "full_attention" for t in layer_types):
        problems.append(
            f"sliding-window attention (sliding_window={window}): the DeciLM format has only full causal "
            "attention, which differs from this model beyond the window. Alternative: "
            + _USE_TRANSFORMERS
            + " (or, if you only ever use contexts up to the window, set config.sliding_window = None "
            "on a copy first; the models are then identical)."
        )
    return problems


def check_exportable(model: nn.Module, *, ffn_multiple_of_256: bool = True) -> None:
    """Raise ExportError listing every reason `model` cannot be written as a DeciLM model."""
    problems = _family_problems(model.config)
    if not problems:
        problems = _config_problems(model.config)
    if not problems:
        problems = _layer_problems(model, ffn_multiple_of_256)
    if problems:
        if ffn_multiple_of_256:  # `fmt=deci`
            head = "Cannot export to the DeciLM/nemotron-nas layout (nothing was written)"
        else:  # `fmt=gguf`: the same limits, as llama.cpp's `deci` architecture has them
            head = "Cannot export to GGUF for llama.cpp's `deci` architecture (nothing was written)"
            problems = [p.replace("the DeciLM format", "a llama.cpp GGUF")
                        .replace("a DeciLM replace_with_linear layer", "a llama.cpp linear-attention layer")
                        .replace("the DeciLM FFN", "llama.cpp's deci FFN")
                        .replace("to the DeciLM format", "to GGUF") for p in problems]
        raise ExportError(head + ":\n  - " + "\n  - ".join(problems))


def _nonzero(t: torch.Tensor | None) -> bool:
    return t is not None and bool(torch.any(t != 0))


def _linear_bias(attn: nn.Module) -> torch.Tensor | None:
    """Output bias of a HARP linear layer: W_O' b_v + b_O' (None if neither bias exists)."""
    bias = None
    if attn.v_proj.bias is not None:
        bias = attn.o_proj.weight.detach().double() @ attn.v_proj.bias.detach().double()
    if attn.o_proj.bias is not None:
        ob = attn.o_proj.bias.detach().double()
        bias = ob if bias is None else bias + ob
    return bias


def _layer_problems(model: nn.Module, ffn_multiple_of_256: bool) -> list[str]:
    problems: list[str] = []
    layers = model.model.layers
    for i, (layer, kind) in enumerate(zip(layers, deci_kinds(model.config), strict=True)):
        attn = layer.self_attn
        if kind == "attention":
            extra = [n for n in ("q_norm", "k_norm") if isinstance(getattr(attn, n, None), nn.Module)]
            if extra:
                problems.append(
                    f"layer {i}: attention has {'/'.join(extra)}, which the DeciLM format cannot hold."
                )
        elif kind == "linear" and _nonzero(_linear_bias(attn)):
            src = " and ".join(f"{n} bias" for n in ("v_proj", "o_proj") if getattr(attn, n).bias is not None)
            problems.append(
                f"layer {i}: this HARP linear layer has an output bias (alpha * W_O R b_v + b_O, from its "
                f"{src}), but a DeciLM replace_with_linear layer is bias-free (llama.cpp ignores a bias "
                "there). "
                f"Alternatives: keep layer {i} as attention (do not prune it), or prune it with alpha = 0 "
                "(no_op, no bias involved)."
            )
    if ffn_multiple_of_256:
        inter = model.config.intermediate_size
        if inter % 256:
            problems.append(
                f"intermediate_size {inter} is not a multiple of 256: the DeciLM config stores FFN width as "
                "ffn_mult and readers round int(2 * ffn_mult * hidden / 3) up to a multiple of 256, so this "
                "width cannot be expressed. Alternative: export `fmt=gguf` (stores the width exactly)."
            )
    return problems


def ffn_mult(intermediate: int, hidden: int) -> float:
    """An ffn_mult that readers turn back into exactly `intermediate`.

    Readers compute `int(2 * m * hidden / 3)` and round up to a multiple of 256 (some first round m to
    6 decimals), so any m landing in (intermediate - 256, intermediate] works; prefer the exact ratio.
    """
    if intermediate % 256:
        raise ExportError(
            f"FFN width {intermediate} is not a multiple of 256; the DeciLM format cannot hold it."
        )

    def width(m: float) -> int:
        n = int(2 * m * hidden / 3)
        return n if n % 256 == 0 else n + 256 - n % 256

    exact = intermediate * 3 / (2 * hidden)
    for m in (exact, round(exact, 6), round((intermediate - 128) * 3 / (2 * hidden), 6)):
        if width(m) == intermediate and width(round(m, 6)) == intermediate:
            return m
    raise ExportError(
        f"No ffn_mult reproduces FFN width {intermediate} at hidden size {hidden}."
    )  # unreachable


def to_deci(model: nn.Module, *, ffn_multiple_of_256: bool = True) -> DeciModel:
    """Validate `model` (a harp-pruned or unpruned transformers causal LM) and describe it in DeciLM
    layout. Tensors are the model's own where possible (no copies); the linear-layer matrices are
    computed in float64 and cast to the model's dtype."""
    check_exportable(model, ffn_multiple_of_256=ffn_multiple_of_256)
    cfg = model.config
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    base = model.model
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": base.embed_tokens.weight.detach()}
    layers: list[DeciLayer] = []
    attention_bias = False
    kinds = deci_kinds(cfg)
    for i, (layer, kind) in enumerate(zip(base.layers, kinds, strict=True)):
        p = f"model.layers.{i}."
        attn = layer.self_attn
        if kind != "no_op":
            t[p + "input_layernorm.weight"] = layer.input_layernorm.weight.detach()
        if kind == "attention":
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                lin = getattr(attn, n)
                t[p + f"self_attn.{n}.weight"] = lin.weight.detach()
                if lin.bias is not None:
                    attention_bias = True
        elif kind == "linear":
            w = attn.o_proj.weight.detach().double() @ attn.v_proj.weight.detach().double()
            t[p + "self_attn.linear_attn.weight"] = w.to(attn.o_proj.weight.dtype)
        mlp = layer.mlp
        t[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight.detach()
        for n in ("gate_proj", "up_proj", "down_proj"):
            t[p + f"mlp.{n}.weight"] = getattr(mlp, n).weight.detach()
        layers.append(DeciLayer(kind, mlp.gate_proj.weight.shape[0]))
    if attention_bias:  # the format has one switch for q/k/v/o biases: give missing ones zeros
        for i, (layer, kind) in enumerate(zip(base.layers, kinds, strict=True)):
            attn = layer.self_attn
            if kind != "attention":
                continue
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                lin = getattr(attn, n)
                b = lin.bias.detach() if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])
                t[f"model.layers.{i}.self_attn.{n}.bias"] = b
    t["model.norm.weight"] = base.norm.weight.detach()
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    if not tied:
        t["lm_head.weight"] = model.lm_head.weight.detach()
    special = {k: getattr(cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    harp = dict(getattr(cfg, "harp", None) or {})
    return DeciModel(
        layers=layers,
        tensors=t,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=hidden // heads,
        vocab_size=cfg.vocab_size,
        max_positions=cfg.max_position_embeddings,
        rms_eps=float(cfg.rms_norm_eps),
        rope=rope_parameters(cfg),
        tied=tied,
        attention_bias=attention_bias,
        special_ids=special,
        harp=harp,
    )


def _rope_scaling_4x(rope: dict[str, Any]) -> dict[str, Any] | None:
    """transformers-4.x style `rope_scaling` (what DeciLM readers look for), or None."""
    if rope.get("rope_type", "default") == "default":
        return None
    return {k: v for k, v in rope.items() if k != "rope_theta"}


def deci_config(d: DeciModel, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the DeciLM checkpoint."""
    blocks = []
    group = d.heads // d.kv_heads
    for layer in d.layers:
        attention = {
            "no_op": layer.kind == "no_op",
            "replace_with_linear": layer.kind == "linear",
            "n_heads_in_group": group if layer.kind == "attention" else None,
            "sparsify": None,
            "window_length": None,
            "num_sink_tokens": None,
            "use_prefill_window_in_sink_attention": False,
            "unshifted_sink": False,
        }
        ffn = {
            "no_op": False,
            "replace_with_linear": False,
            "sparsify": None,
            "ffn_mult": ffn_mult(layer.intermediate, d.hidden),
        }
        blocks.append({"attention": attention, "ffn": ffn})
    cfg: dict[str, Any] = {
        "architectures": [DECI_ARCHITECTURE],
        "model_type": DECI_MODEL_TYPE,
        "block_configs": blocks,
        "hidden_size": d.hidden,
        "num_hidden_layers": len(d.layers),
        "num_attention_heads": d.heads,
        "num_key_value_heads": None,  # per layer: num_attention_heads // n_heads_in_group
        "intermediate_size": None,  # per layer: from ffn_mult
        "vocab_size": d.vocab_size,
        "max_position_embeddings": d.max_positions,
        "rms_norm_eps": d.rms_eps,
        "hidden_act": "silu",
        "attention_bias": d.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "rope_theta": float(d.rope.get("rope_theta", 10000.0)),
        "rope_scaling": _rope_scaling_4x(d.rope),
        "tie_word_embeddings": d.tied,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    for k, v in d.special_ids.items():
        if v is not None:
            cfg[k] = v
    if d.harp:
        cfg["harp"] = {"layers": d.harp.get("layers", []), "alphas": d.harp.get("alphas", [])}
    return cfg


def _ffn_width(ffn_mult: float, hidden: int) -> int:
    width = int(2 * ffn_mult * hidden / 3)  # DeciLM's rule (vLLM's _ffn_mult_to_intermediate_size)
    return width if width % 256 == 0 else width + 256 - width % 256


def vllm_check(folder: str | Path, tensor_parallel_size: int = 1) -> dict[str, Any]:
    """What vLLM's `DeciLMForCausalLM` will make of a deci export folder (`harp.export.export`, `fmt=deci`), from its
    config.json alone (vLLM itself needs a GPU and is not run here).

    Mirrors the rules of vLLM's nemotron_nas model: attention layers are normal (`n_heads_in_group`) or
    `no_op`; `replace_with_linear` is not implemented there (HARP layers with alpha != 0). The KV head count
    is read from the first layer with attention; tensor parallelism splits query heads, KV heads (or
    replicates them when tp > kv heads), and each FFN. vLLM reads `block_configs` as objects, through the
    DeciLM config class of NVIDIA's remote code (`--trust-remote-code` and an `auto_map` in config.json).

    Returns {'problems': [...], 'layers', 'kv_layers' (layers vLLM keeps a KV cache for), 'kv_heads'}.
    """
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: pass the folder of a deci export (`fmt=deci`).")
    cfg = json.loads(cfg_path.read_text())
    tp = int(tensor_parallel_size)
    if tp < 1:
        raise ValueError(f"tensor parallel size {tensor_parallel_size!r}: must be >= 1.")
    problems: list[str] = []
    if cfg.get("model_type") != "nemotron-nas" or "DeciLMForCausalLM" not in (cfg.get("architectures") or []):
        problems.append("config.json is not a DeciLM / nemotron-nas checkpoint: export it with `fmt=deci`.")
        return {"problems": problems, "layers": cfg.get("num_hidden_layers"), "kv_layers": None, "kv_heads": None}
    blocks = cfg.get("block_configs") or []
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    linear = [i for i, b in enumerate(blocks) if b["attention"].get("replace_with_linear")]
    if linear:
        problems.append(
            f"layers {linear} are replace_with_linear (HARP alpha != 0), which vLLM does not implement: "
            "prune those layers with alpha = 0 (`alphas=0,...`) for this route, or serve the HARP checkpoint "
            "itself with harp's vLLM plugin (pip install 'harp-prune[vllm]'; vllm serve DIR), or llama.cpp."
        )
    attn = [b for b in blocks if not b["attention"].get("no_op") and not b["attention"].get("replace_with_linear")]
    kv_heads = heads // attn[0]["attention"]["n_heads_in_group"] if attn else None
    if kv_heads is None:
        problems.append("no layer keeps attention: vLLM cannot determine the number of KV heads.")
    if heads % tp:
        problems.append(f"{heads} attention heads do not split over tensor parallel size {tp}.")
    if kv_heads and kv_heads % tp and tp % kv_heads:
        problems.append(f"{kv_heads} KV heads neither split over nor replicate to tensor parallel size {tp}.")
    widths = sorted({_ffn_width(b["ffn"]["ffn_mult"], hidden) for b in blocks if not b["ffn"].get("no_op")})
    bad = [w for w in widths if w % tp]
    if bad:
        problems.append(f"FFN widths {bad} do not split over tensor parallel size {tp}.")
    if "auto_map" not in cfg or not any(folder.glob("configuration_*.py")):
        problems.append(
            "vLLM reads block_configs through NVIDIA's DeciLM config class: copy configuration_decilm.py and "
            "block_config.py from an NVIDIA Nemotron-NAS model repository into the folder, add "
            '"auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig"} to config.json, and pass '
            "--trust-remote-code."
        )
    return {"problems": problems, "layers": len(blocks), "kv_layers": len(attn), "kv_heads": kv_heads}
