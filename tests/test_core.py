"""HARP core: what a pruned layer computes, parameter and KV accounting, cache behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import FAMILIES, tiny_model

import harp
from harp.engine.replay import capture_inputs
from harp.model.accounting import output_cache
from harp.model.prune import refuse_pruned, temporarily_pruned
from harp.modeling import (
    HarpBlock,
    HarpBlockError,
    HarpLinearAttention,
    HarpNoAttention,
    attention_geometry,
    cache_kwarg,
    decoder_layers,
)

ALL = list(FAMILIES)


def _layer_io(model, ids, idx):
    """Input hidden state and call arguments of decoder layer `idx` for `ids`."""
    batches = capture_inputs(model, ids, idx, batch_size=len(ids))
    b = batches[0]
    rest, kw = b.kwargs[idx]
    return b.hidden, rest, kw


def _diagonal_mask_like(mask: torch.Tensor | None, seq: int, dtype: torch.dtype) -> torch.Tensor:
    eye = torch.eye(seq, dtype=torch.bool)[None, None]
    if mask is not None and mask.dtype == torch.bool:
        return eye
    m = torch.full((1, 1, seq, seq), torch.finfo(dtype).min, dtype=dtype)
    return m.masked_fill(eye, 0.0)


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("idx", [0, 3, 5])
def test_alpha_one_equals_diagonal_mask_attention(family, idx):
    model = tiny_model(family, attn="eager")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(idx))
    hidden, rest, kw = _layer_io(model, ids, idx)
    layer = decoder_layers(model)[idx]
    kw_diag = dict(kw, attention_mask=_diagonal_mask_like(kw.get("attention_mask"), 10, hidden.dtype))
    with torch.no_grad():
        expected = layer(hidden, *rest, **kw_diag)
        normal = layer(hidden, *rest, **kw)
    pruned = copy.deepcopy(model)
    harp.prune(pruned, layers=[idx], alphas=[1.0])
    with torch.no_grad():
        got = decoder_layers(pruned)[idx](hidden, *rest, **kw)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, normal, atol=1e-3)  # the diagonal mask really changed something


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("where", [[5, 4], [2, 3], [0], [0, 2, 5]])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_with_cache_equals_without(family, where, attn):
    if family.startswith("gemma2") and attn == "sdpa":
        attn = "eager"  # Gemma2 soft-capping needs eager attention in transformers
    model = tiny_model(family, attn=attn)
    alphas = [0.7 if i % 2 else 0.0 for i in range(len(where))]
    harp.prune(model, layers=where, alphas=alphas)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
        b = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


def _expected_removed(config, alphas, qkv_bias, o_bias, qk_norm, out_norm):
    """Hand count from docs/method.md ("The fold"): written out here independently of harp.model.accounting."""
    g = attention_geometry(config)
    h, nh, kv, d = g["hidden"], g["heads"], g["kv_heads"], g["head_dim"]
    total = 0
    for a in alphas:
        q = h * nh * d + (nh * d if qkv_bias else 0)
        k = h * kv * d + (kv * d if qkv_bias else 0)
        v = h * kv * d + (kv * d if qkv_bias else 0)
        o = nh * d * h + (h if o_bias else 0)
        norms = 2 * d if qk_norm else 0
        if a == 0:
            total += q + k + v + o + norms + h + (h if out_norm else 0)
        else:
            total += q + k + norms + (nh - kv) * d * h  # o: hidden x heads*d -> hidden x kv*d
    return total


@pytest.mark.parametrize(
    "family,qkv_bias,o_bias,qk_norm,out_norm",
    [
        ("llama", False, False, False, False),  # GQA
        ("llama_mha", True, True, False, False),  # no GQA, with biases
        ("mistral", False, False, False, False),
        ("qwen2", True, False, False, False),
        ("qwen3", False, False, True, False),
        ("gemma2", False, False, False, True),
        ("gemma3", False, False, True, True),
    ],
)
@pytest.mark.parametrize("alphas", [[0.5, 0.3], [0.0, 0.0], [0.0, 0.9]])
def test_parameter_count_falls_by_prediction(family, qkv_bias, o_bias, qk_norm, out_norm, alphas):
    model = tiny_model(family)
    before = harp.count_parameters(model)
    harp.prune(model, layers=[5, 1], alphas=alphas)
    removed = before - harp.count_parameters(model)
    expected = _expected_removed(model.config, alphas, qkv_bias, o_bias, qk_norm, out_norm)
    assert removed == expected
    assert harp.removed_parameters(model.config, [5, 1], alphas) == expected
    # q/k really are gone from the module tree
    for idx, a in zip([5, 1], alphas, strict=True):
        attn = decoder_layers(model)[idx].self_attn
        assert isinstance(attn, HarpNoAttention if a == 0 else HarpLinearAttention)
        assert not hasattr(attn, "q_proj") and not hasattr(attn, "k_proj")
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(("model.layers.5.self_attn.q", "model.layers.5.self_attn.k")) for n in names)


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("where", [[5, 4, 3], [0, 1], [2]])
def test_kv_cache_bytes_fall_by_pruned_fraction(family, where):
    model = tiny_model(family, max_position_embeddings=512)
    ids = torch.randint(1, 128, (2, 6))  # shorter than Gemma's sliding window: every layer holds 6 tokens
    with torch.no_grad():
        full = harp.kv_cache_bytes(output_cache(model(ids, use_cache=True)))
        harp.prune(model, layers=where, alphas=[0.5] * (len(where) - 1) + [0.0])
        cache = output_cache(model(ids, use_cache=True))
        pruned = harp.kv_cache_bytes(cache)
        assert cache.get_seq_length() == 6
        # and decoding continues from that cache at the right position
        model(ids[:, :1], use_cache=True, **{cache_kwarg(model): cache})  # `cache` from 5.2x, before: past_key_values
    num = model.config.num_hidden_layers
    assert full > 0
    assert pruned * num == full * (num - len(where))
    assert cache.get_seq_length() == 7


@pytest.mark.parametrize("family", ALL)
def test_pruning_nothing_is_identity(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        before = model(ids).logits
        harp.prune(model, layers=[], alphas=[])
        after = model(ids).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("family", ALL)
def test_alpha_fold_equals_runtime_scaling(family):
    """Folded alpha (in o_proj, or in Gemma's output norm) == alpha applied to the layer's update."""
    alphas = {5: 0.37, 2: 1.6}
    model = tiny_model(family)
    ids = torch.randint(0, 128, (2, 8))
    folded = copy.deepcopy(model)
    harp.prune(folded, layers=list(alphas), alphas=list(alphas.values()))

    runtime = copy.deepcopy(model)
    harp.prune(runtime, layers=list(alphas), alphas=[1.0] * len(alphas))
    hooks = []
    for idx, a in alphas.items():
        layer = decoder_layers(runtime)[idx]
        # the attention update that enters the residual: after Gemma's output norm, else the attention output
        target = layer.post_attention_layernorm if family.startswith("gemma") else layer.self_attn

        def scale(mod, args, out, a=a):
            return (out[0] * a, *out[1:]) if isinstance(out, tuple) else out * a

        hooks.append(target.register_forward_hook(scale))
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, runtime(ids).logits, rtol=1e-5, atol=1e-5)
        # and it is not trivially the same as alpha = 1
        plain = copy.deepcopy(model)
        harp.prune(plain, layers=list(alphas), alphas=[1.0] * len(alphas))
        assert not torch.allclose(folded(ids).logits, plain(ids).logits, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2"])
def test_temporarily_pruned_restores_exactly(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (1, 8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(ids).logits
        with temporarily_pruned(model, [4, 2], [0.3, 0.0]):
            assert not torch.equal(model(ids).logits, before)
            assert model.config.harp["layers"] == [2, 4]
        after = model(ids).logits
    assert torch.equal(before, after)
    assert not hasattr(model.config, "harp") or not model.config.harp
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_prune_is_cumulative_and_refuses_repeats():
    model = tiny_model("llama")
    harp.prune(model, layers=[5], alphas=[0.5])
    harp.prune(model, layers=[3], alphas=[0.0])
    assert model.config.harp["layers"] == [3, 5] and model.config.harp["alphas"] == [0.0, 0.5]
    with pytest.raises(ValueError, match="already pruned"):
        harp.prune(model, layers=[5], alphas=[0.2])


@pytest.mark.parametrize(
    "layers,alphas,match",
    [
        ([6], [0.5], "out of range"),
        ([-1], [0.5], "out of range"),
        ([2, 2], [0.5, 0.5], "distinct"),
        ([2], [float("nan")], "not finite"),
        ([2], [float("inf")], "not finite"),
        ([2, 3], [0.5], "one alpha per layer"),
        ([2.5], [0.5], "not an integer"),
        ([2], ["x"], "not a number"),
    ],
)
def test_bad_plans_are_clear_errors_and_change_nothing(layers, alphas, match):
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        harp.prune(model, layers=layers, alphas=alphas)
    assert set(model.state_dict()) == set(state)
    assert not getattr(model.config, "harp", None)


def test_harp_block_is_read_checked_and_printed_in_one_place():
    model = tiny_model("llama")
    assert not HarpBlock.from_config(model) and harp.pruned_plan(model) == {"format_version": 1, "layers": [],
                                                                            "alphas": []}
    refuse_pruned(model, "never raised: the model is not pruned")
    harp.prune(model, layers=[2, 5], alphas=[0.5, 1.0])
    block = HarpBlock.from_config(model)
    assert block == HarpBlock.from_config(model.config) == HarpBlock.from_config(model.config.to_dict())
    assert block.plan == {2: 0.5, 5: 1.0} and block.to_dict() == harp.pruned_plan(model) == model.config.harp
    assert block.describe() == "layers (top first) 5, 2, alphas 1, 0.5"
    with pytest.raises(ValueError, match=r"^m is pruned \(layers \[2, 5\]\)$"):
        refuse_pruned(model, lambda b: f"m is pruned (layers {list(b.layers)})")
    with pytest.raises(HarpBlockError) as e:
        HarpBlock.from_dict({"format_version": 9, "layers": [7, 1, 1], "alphas": [float("nan"), True]}, 6)
    assert e.value.newer is not None and e.value.newer in e.value.problems
    assert [p.split(" ")[:3] for p in e.value.problems] == [["HARP", "format", "version"], ["harp", "layers", "[7]"],
                                                            ["harp", "layers", "repeat"], ["harp", "alpha", "nan"],
                                                            ["harp", "alpha", "True"], ["harp", "block", "has"]]


def test_unsupported_architecture_names_supported_families():
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(ValueError, match="does not support model_type 'gpt2'.*LLaMA.*Gemma2"):
        harp.prune(model, layers=[0], alphas=[0.5])
