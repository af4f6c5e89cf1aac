"""DeciLM layout -> a GGUF file of llama.cpp's `deci` architecture.

Follows what llama.cpp's own converter writes for `DeciLMForCausalLM` checkpoints with
`block_configs`: per-layer arrays `deci.attention.head_count`, `deci.attention.head_count_kv` and
`deci.feed_forward_length`; a layer with `head_count_kv = 0` and `head_count > 0` is a linear layer
whose matrix is `blk.N.attn_output`; `head_count = 0` marks an attention-free layer. q/k rows are
permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one.

Known llama.cpp quirk handled here: llama.cpp derives the head size from layer 0's head count, so an
attention-free layer 0 fails to load. Layer 0 with alpha = 0 is written as a linear layer whose matrix
is zero, which computes the same thing (x + 0) at the cost of one hidden x hidden matrix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from harp.export import vocab
from harp.export.deci import DeciModel
from harp.util.fsio import atomic_file, check_output
from harp.util.problems import Collector

ARCH = "deci"
DTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


def _permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (or bias): rotate-half pairs (i, i + d/2) -> adjacent pairs (2i, 2i+1)."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.x RoPE scaling (llama.cpp reads them from `rope_freqs`)."""
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


class _Tensors:
    def __init__(self, writer: gguf.GGUFWriter, qtype: gguf.GGMLQuantizationType) -> None:
        self.writer = writer
        self.qtype = qtype

    def add(self, name: str, t: torch.Tensor | np.ndarray) -> None:
        a = t.detach().to(torch.float32).cpu().numpy() if isinstance(t, torch.Tensor) else t
        a = np.ascontiguousarray(a, dtype=np.float32)
        qtype = self.qtype if a.ndim >= 2 else gguf.GGMLQuantizationType.F32  # norms, biases stay f32
        if qtype == gguf.GGMLQuantizationType.Q8_0 and a.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = gguf.GGMLQuantizationType.F16  # rows not a whole number of blocks
        if qtype == gguf.GGMLQuantizationType.F32:
            self.writer.add_tensor(name, a)
        elif qtype == gguf.GGMLQuantizationType.F16:
            self.writer.add_tensor(name, a.astype(np.float16))
        else:
            self.writer.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)


def check_gguf_out(
    out: str | os.PathLike[str], overwrite: bool, inputs: Iterable[Path | None] = (), problems: Collector | None = None
) -> Path:
    """`out` can take a GGUF: a file name ending in .gguf that `harp.util.fsio.check_output` accepts as a file
    (not a folder, not an existing file unless `overwrite`, not the input). Problems go to `problems`, or
    are raised without one. Returns `out` resolved."""
    collect = Collector() if problems is None else problems
    if Path(out).suffix != ".gguf":
        collect.add(f"`out={out}` should be a file name ending in .gguf for `fmt=gguf`.")
    p = check_output(out, overwrite, inputs, collect, is_file=True)
    if problems is None:
        collect.raise_if_any()
    assert p is not None
    return p


def write_gguf(
    d: DeciModel,
    out: str | os.PathLike[str],
    *,
    dtype: str = "f16",
    tokenizer: Any = None,
    tokenizer_gguf: str | os.PathLike[str] | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `d` as a llama.cpp `deci` GGUF, atomically (temp file + rename)."""

    if dtype not in DTYPES:
        raise ValueError(f"Unknown GGUF dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    out = check_gguf_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    qtype, ftype = DTYPES[dtype]

    with atomic_file(out) as tmp:  # renamed over `out` once the whole file is written
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            _add_metadata(writer, d, name or "harp-export", ftype)
            _add_tokenizer(writer, d, tokenizer, tokenizer_gguf)
            _add_tensors(writer, d, qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out


def _layer_heads(d: DeciModel) -> tuple[list[int], list[int]]:
    """Per layer, (query heads, kv heads): an attention layer has both, a linear layer only query heads (its
    matrix is `attn_output`), an attention-free layer none - except a no-op layer 0, written as a zero
    linear layer."""
    heads, kv = [], []
    for i, layer in enumerate(d.layers):
        if layer.kind == "attention":
            heads.append(d.heads)
            kv.append(d.kv_heads)
        elif layer.kind == "linear" or i == 0:  # no-op layer 0: written as a zero linear layer
            heads.append(d.heads)
            kv.append(0)
        else:
            heads.append(0)
            kv.append(0)
    return heads, kv


def _add_metadata(writer: gguf.GGUFWriter, d: DeciModel, name: str, ftype: Any) -> None:
    """The `deci` architecture's keys: shapes, per-layer head counts and FFN widths, RoPE, the HARP block."""
    heads, kv = _layer_heads(d)
    writer.add_name(name)
    writer.add_block_count(len(d.layers))
    writer.add_context_length(d.max_positions)
    writer.add_embedding_length(d.hidden)
    writer.add_feed_forward_length([layer.intermediate for layer in d.layers])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(float(d.rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(d.rms_eps)
    writer.add_key_length(d.head_dim)
    writer.add_value_length(d.head_dim)
    writer.add_rope_dimension_count(d.head_dim)
    writer.add_vocab_size(d.vocab_size)
    writer.add_file_type(int(ftype))
    if d.rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(d.rope["factor"]))
    if d.harp:
        writer.add_array("harp.layers", [int(x) for x in d.harp.get("layers", [])])
        writer.add_array("harp.alphas", [float(x) for x in d.harp.get("alphas", [])])


def _add_tokenizer(
    writer: gguf.GGUFWriter, d: DeciModel, tokenizer: Any, tokenizer_gguf: str | os.PathLike[str] | None
) -> None:
    """The vocabulary: copied from `tokenizer_gguf`, else built from the HF `tokenizer`, else none."""
    if tokenizer_gguf is not None:
        vocab.copy_tokenizer_metadata(writer, tokenizer_gguf, d.vocab_size)
    elif tokenizer is not None:
        vocab.hf_tokenizer_metadata(writer, tokenizer, d.vocab_size)
    else:
        vocab.no_vocab_metadata(writer)


def _add_tensors(writer: gguf.GGUFWriter, d: DeciModel, qtype: Any) -> None:
    """Embedding, RoPE factors (llama3), each layer, final norm and (untied) head, under llama.cpp's names."""
    t = d.tensors
    add = _Tensors(writer, qtype).add
    add("token_embd.weight", t["model.embed_tokens.weight"])
    if d.rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(d.rope, d.head_dim))
    for i in range(len(d.layers)):
        _add_layer(add, d, i)
    add("output_norm.weight", t["model.norm.weight"])
    if not d.tied:
        add("output.weight", t["lm_head.weight"])


def _add_layer(add: Callable[[str, Any], None], d: DeciModel, i: int) -> None:
    """Layer `i`: its attention as its kind writes it (q/k rows permuted to llama.cpp's RoPE layout), then the MLP."""
    t, layer = d.tensors, d.layers[i]
    p, b = f"model.layers.{i}.", f"blk.{i}."
    if layer.kind == "attention":
        add(b + "attn_norm.weight", t[p + "input_layernorm.weight"])
        add(b + "attn_q.weight", _permute_rope(t[p + "self_attn.q_proj.weight"], d.heads))
        add(b + "attn_k.weight", _permute_rope(t[p + "self_attn.k_proj.weight"], d.kv_heads))
        add(b + "attn_v.weight", t[p + "self_attn.v_proj.weight"])
        add(b + "attn_output.weight", t[p + "self_attn.o_proj.weight"])
        if d.attention_bias:
            add(b + "attn_q.bias", _permute_rope(t[p + "self_attn.q_proj.bias"], d.heads))
            add(b + "attn_k.bias", _permute_rope(t[p + "self_attn.k_proj.bias"], d.kv_heads))
            add(b + "attn_v.bias", t[p + "self_attn.v_proj.bias"])
            add(b + "attn_output.bias", t[p + "self_attn.o_proj.bias"])
    elif layer.kind == "linear":
        add(b + "attn_norm.weight", t[p + "input_layernorm.weight"])
        add(b + "attn_output.weight", t[p + "self_attn.linear_attn.weight"])
    elif i == 0:
        add(b + "attn_norm.weight", np.ones(d.hidden, dtype=np.float32))
        add(b + "attn_output.weight", np.zeros((d.hidden, d.hidden), dtype=np.float32))
    add(b + "ffn_norm.weight", t[p + "post_attention_layernorm.weight"])
    add(b + "ffn_gate.weight", t[p + "mlp.gate_proj.weight"])
    add(b + "ffn_up.weight", t[p + "mlp.up_proj.weight"])
    add(b + "ffn_down.weight", t[p + "mlp.down_proj.weight"])
