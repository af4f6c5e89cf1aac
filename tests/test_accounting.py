"""The counts of harp.model.accounting (parameters, KV bytes, FLOPs, bytes read) against hand counts and real models."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tiny import FAMILIES, tiny_model

import harp
from harp.model import accounting
from harp.model.accounting import count_parameters, kv_cache_bytes
from harp.modeling import cache_kwarg

# A config small enough to count by hand: hidden 8, 2 query heads, 1 KV head, head_dim 4,
# MLP 12, 3 layers, vocab 10, untied embeddings, no biases.
HAND = dict(
    vocab_size=10,
    hidden_size=8,
    intermediate_size=12,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
# layer 2: alpha 0.5 (v + folded o stay), layer 1: alpha 0 (no attention sub-layer), layer 0 original
PLAN = {"layers": [2, 1], "alphas": [0.5, 0.0]}


def hand_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**HAND)


def test_prefill_flops_match_hand_count():
    cfg = hand_config()
    # Per layer, per token: q 8*8=64, k 8*4=32, v 32, o 64 -> attention linears 192 params;
    # MLP 3*8*12 = 288 params. A linear map costs 2 FLOPs per parameter per token.
    # Prefill of n=4 tokens, per original layer: linear 2*4*(192+288) = 3840,
    # attention (QK^T + AV, d = 2*4 = 8): sum_{i=1..4} 4*8*i = 32*10 = 320.
    # LM head on the last token: 2*8*10 = 160.
    f = accounting.prefill_flops(cfg, 4, {"layers": [], "alphas": []})
    assert f == {"linear": 3 * 3840, "attention": 3 * 320, "lm_head": 160, "total": 11520 + 960 + 160}
    # Pruned: layer 0 as above; layer 2 (alpha 0.5) keeps v (32) + folded o (8x4 = 32) + MLP 288 = 352
    # params and no attention term; layer 1 (alpha 0) keeps the MLP only (288).
    p = accounting.prefill_flops(cfg, 4, PLAN)
    assert p == {
        "linear": 2 * 4 * (480 + 288 + 352),
        "attention": 320,
        "lm_head": 160,
        "total": 8960 + 320 + 160,
    }
    # all logits instead of the last one: 4x the LM head
    assert accounting.prefill_flops(cfg, 4, PLAN, logits_tokens=4)["lm_head"] == 4 * 160
    row = accounting.speedup_bounds(cfg, [4], PLAN)[0]
    assert row["prefill_bound"] == pytest.approx(12640 / 9440)
    assert row["ideal_saving"] == pytest.approx(1 - 9440 / 12640)


def test_decode_flops_and_bytes_match_hand_count():
    cfg = hand_config()
    # one new token after 4 cached ones sees 5 keys: attention 4*8*5 = 160 per original layer
    d = accounting.decode_flops(cfg, 4, {"layers": [], "alphas": []})
    assert d == {"linear": 2 * 3 * 480, "attention": 3 * 160, "lm_head": 160, "total": 2880 + 480 + 160}
    # bytes (float32): parameters = embedding 80 + LM head 80 + final norm 8 + 3 x (480 linear + 2x8 norms)
    # = 1656, of which the untied embedding is read one row only (8 of 80) -> 1584 params read.
    # KV of 5 tokens: 3 layers x 2 (k, v) x 1 head x 4 dims x 5 tokens x 4 bytes = 480.
    b = accounting.decode_bytes(cfg, 4, {"layers": [], "alphas": []}, dtype=torch.float32)
    assert b == {"weights": 1584 * 4, "kv": 480, "total": 1584 * 4 + 480}
    # pruned: layer 2 loses q, k (96) and half of o (32); layer 1 loses 192 + its input norm 8;
    # 2 of 3 layers lose their KV.
    bp = accounting.decode_bytes(cfg, 4, PLAN, dtype="bfloat16")
    assert bp == {"weights": (1584 - 128 - 200) * 2, "kv": 80, "total": (1584 - 328) * 2 + 80}
    assert accounting.kv_cache_bytes_expected(cfg, 4, PLAN, dtype=torch.float32) == 4 * 32


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_matches_real_model(family, tie):
    """The per-layer counts the FLOP model uses add up to the real parameter count, pruned or not."""
    model = tiny_model(family, tie_word_embeddings=tie)
    assert accounting.parameter_count(model.config) == count_parameters(model)
    harp.prune(model, layers=[5, 3, 2], alphas=[0.7, 0.0, 1.0])
    assert accounting.parameter_count(model.config) == count_parameters(model)
    assert accounting.layer_kinds(model.config) == ["attention"] * 2 + ["linear", "none", "attention", "linear"]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_kv_bytes_expected_match_cache(family):
    model = tiny_model(family)
    pruned = copy.deepcopy(model)
    harp.prune(pruned, layers=[5, 4], alphas=[0.3, 0.0])
    n = 6 if family == "gemma2" else 20  # within gemma2's sliding window of 8: exact
    ids = torch.randint(0, 128, (1, n))
    for m in (model, pruned):
        cache = transformers.DynamicCache(config=m.config)
        with torch.no_grad():
            m(ids, use_cache=True, **{cache_kwarg(m): cache})
        assert kv_cache_bytes(cache) == accounting.kv_cache_bytes_expected(m.config, n, dtype=torch.float32)


def test_bound_grows_with_context_and_is_one_without_pruning():
    cfg = hand_config()
    rows = accounting.speedup_bounds(cfg, [1, 16, 64, 256], PLAN)
    bounds = [r["prefill_bound"] for r in rows]
    assert bounds == sorted(bounds) and bounds[0] > 1.0
    assert all(r["decode_bytes_bound"] > 1.0 for r in rows)
    same = accounting.speedup_bounds(cfg, [16], PLAN, original=PLAN)[0]
    assert same["prefill_bound"] == 1.0 and same["decode_bytes_bound"] == 1.0


def test_sliding_window_caps_attention():
    cfg = transformers.MistralConfig(**HAND, sliding_window=3)
    assert accounting.attention_windows(cfg) == [3, 3, 3]
    # keys per query: 1, 2, 3, 3 -> 9 (full attention would be 10)
    assert accounting.prefill_flops(cfg, 4, {"layers": [], "alphas": []})["attention"] == 3 * 4 * 8 * 9
    assert accounting.decode_flops(cfg, 10, {"layers": [], "alphas": []})["attention"] == 3 * 4 * 8 * 3
    gemma = tiny_model("gemma2").config
    assert accounting.attention_windows(gemma) == [8, None] * 3


def test_bad_inputs():
    cfg = hand_config()
    with pytest.raises(ValueError, match="positive integer"):
        accounting.prefill_flops(cfg, 0)
    with pytest.raises(ValueError, match="layers 0..2"):
        accounting.layer_kinds(cfg, {"layers": [3], "alphas": [0.1]})
    with pytest.raises(ValueError, match="Unknown dtype"):
        accounting.decode_bytes(cfg, 1, dtype="int3")
