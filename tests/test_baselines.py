"""Baselines' selection rules against brute-force references, on tiny models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model

import harp
from harp.engine.perplexity import perplexity
from harp.methods.autok import auto_k, parse_ppl_increase
from harp.methods.blocks import layers_removed, remove_layers
from harp.methods.refine import refine_alphas
from harp.methods.registry import METHODS, MethodSpec, Selection, parse_methods, register
from harp.methods.scores import attention_drop_scores, block_influence, pick
from harp.methods.search import search_alphas
from harp.methods.selector import Plan, Selector, applied
from harp.methods.sleb import sleb
from harp.model.prune import temporarily_pruned
from harp.modeling import arch_for, decoder_layers, get_module


def _windows(n=4, s=24, seed=0, vocab=128):
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))


class _Zero(torch.nn.Module):
    def forward(self, x, *a, **k):
        return torch.zeros_like(x)


def _stream(model, ids, n_layers, zero_mlp_of=None):
    """Residual stream after the first `n_layers` layers, by truncating a copy of the model (the
    model's own forward, nothing of harp's): final norm removed, optionally one MLP zeroed."""
    m = copy.deepcopy(model)
    arch = arch_for(m.config)
    m.config.num_hidden_layers = n_layers
    parent, attr = arch.final_norm.rsplit(".", 1)
    setattr(get_module(m, parent), attr, torch.nn.Identity())
    if zero_mlp_of is not None:
        decoder_layers(m)[zero_mlp_of].mlp = _Zero()
    with torch.no_grad():
        return get_module(m, arch.backbone)(input_ids=ids, use_cache=False).last_hidden_state


def _mean_cos(a, b):
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_attention_drop_scores_equal_direct_cosine(family):
    model = tiny_model(family)
    ids = _windows()
    scores = attention_drop_scores(model, ids, batch_size=3)  # batches of 3 + 1: the mean must not care
    n = len(decoder_layers(model))
    expected = [_mean_cos(_stream(model, ids, i), _stream(model, ids, i + 1, zero_mlp_of=i)) for i in range(n)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == n  # the scores really differ between layers
    top2 = sorted(range(n), key=lambda i: -expected[i])[:2]
    assert sorted(pick(scores, 2, highest=True)) == sorted(top2)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_block_influence_equals_direct_cosine(family):
    model = tiny_model(family)
    ids = _windows(seed=1)
    bi = block_influence(model, ids)
    n = len(decoder_layers(model))
    expected = [1 - _mean_cos(_stream(model, ids, i), _stream(model, ids, i + 1)) for i in range(n)]
    assert bi == pytest.approx(expected, abs=1e-5)
    sel = Selector(model, ids).select("shortgpt", 2)
    assert sel.kind == "blocks" and sorted(sel.layers) == sorted(sorted(range(n), key=lambda i: expected[i])[:2])


def _delete_layer(model, idx):
    """Reference whole-layer removal, by hand: a copy with the layer deleted from the ModuleList."""
    m = copy.deepcopy(model)
    layers = decoder_layers(m)
    del layers[idx]
    m.config.num_hidden_layers -= 1
    if getattr(m.config, "layer_types", None) is not None:
        m.config.layer_types = [t for i, t in enumerate(m.config.layer_types) if i != idx]
    for j, layer in enumerate(layers):
        layer.self_attn.layer_idx = j
    return m


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sleb_first_pick_is_exhaustive_argmin(family):
    model = tiny_model(family, num_hidden_layers=5)
    ids = _windows(n=3, s=20, seed=2)
    ppl = {i: perplexity(_delete_layer(model, i), ids).ppl for i in range(5)}
    best = min(ppl, key=ppl.get)
    res = sleb(model, ids, 1)
    assert res.removed == [best]
    assert res.ppl[0] == pytest.approx(ppl[best], rel=1e-5)
    first_step = {e["layer"]: e["ppl"] for e in res.log if e["step"] == 0}
    assert first_step == pytest.approx(ppl, rel=1e-5)


def test_sleb_cached_equals_naive_over_several_steps():
    model = tiny_model("qwen2", num_hidden_layers=6)
    ids = _windows(n=2, s=16, seed=3)
    a = sleb(model, ids, 3, method="cached")
    b = sleb(model, ids, 3, method="naive")
    assert a.removed == b.removed
    assert a.ppl == pytest.approx(b.ppl, rel=1e-5)
    # greedy: each step's pick is no worse than any other candidate of that step
    for step in range(3):
        cands = [e["ppl"] for e in a.log if e["step"] == step]
        assert a.ppl[step] == pytest.approx(min(cands))


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_layers_removed_matches_manual_deletion_and_restores(family):
    model = tiny_model(family)
    ids = _windows(n=2, s=12, seed=4)
    with torch.no_grad():
        before = model(ids).logits
    ref = _delete_layer(_delete_layer(model, 4), 1)  # layers 1 and 4 of the original
    with torch.no_grad():
        want = ref(ids).logits
    with layers_removed(model, [4, 1]):
        assert len(decoder_layers(model)) == 4 and model.config.num_hidden_layers == 4
        with torch.no_grad():
            got = model(ids).logits
            g1 = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
            g2 = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
        assert torch.equal(g1, g2)
    torch.testing.assert_close(got, want)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    assert len(decoder_layers(model)) == 6 and model.config.num_hidden_layers == 6
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == list(range(6))


def test_remove_layers_rejects_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        remove_layers(model, [6])
    with pytest.raises(ValueError, match="distinct"):
        remove_layers(model, [1, 1])
    with pytest.raises(ValueError, match="all 6"):
        remove_layers(model, list(range(6)))
    remove_layers(model, [0])
    assert len(decoder_layers(model)) == 5


def test_attention_plans_use_equal_kv_reduction_and_the_right_layers():
    model = tiny_model("llama", num_hidden_layers=8)
    ids = _windows(n=2, s=16, seed=5)
    sel = Selector(model, ids, grid="0:1:0.25")
    plans = {m: sel.select(m, 3) for m in parse_methods("all")}  # the fitted-sink ones: test_fitted_sinks
    for p in plans.values():
        assert p.k == 3 and len(set(p.layers)) == 3
    assert sorted(plans["harp"].layers) == [5, 6, 7]
    assert sorted(plans["harp-low"].layers) == [0, 1, 2]
    assert plans["no-rescale"].alphas == [1.0] * 3 and plans["attn-drop-top"].alphas == [0.0] * 3
    assert plans["attention-drop"].alphas == [0.0] * 3
    ref = search_alphas(model, ids, 3, grid="0:1:0.25")
    assert plans["harp"].alphas == ref.alphas
    low = search_alphas(model, ids, [0, 1, 2], grid="0:1:0.25")
    assert plans["harp-low"].alphas == low.alphas
    # harp-any: Attention Drop's layers, HARP's search over them (top first)
    assert sorted(plans["harp-any"].layers) == sorted(plans["attention-drop"].layers)
    anyd = search_alphas(model, ids, sorted(plans["attention-drop"].layers, reverse=True), grid="0:1:0.25")
    assert plans["harp-any"].layers == anyd.layers and plans["harp-any"].alphas == anyd.alphas
    with applied(model, plans["harp-any"]):
        assert perplexity(model, ids).ppl == pytest.approx(plans["harp-any"].calib_ppl, rel=1e-5)
    # the calibration perplexity a plan reports is the pruned model's
    with applied(model, plans["harp"]):
        assert perplexity(model, ids).ppl == pytest.approx(plans["harp"].calib_ppl, rel=1e-5)
    with applied(model, plans["sleb"]):
        assert perplexity(model, ids).ppl == pytest.approx(plans["sleb"].calib_ppl, rel=1e-5)
    assert not getattr(model.config, "harp", None) and len(decoder_layers(model)) == 8


def test_selector_prefix_reuse_equals_fresh_search():
    model = tiny_model("mistral", num_hidden_layers=6)
    ids = _windows(n=2, s=16, seed=6)
    sel = Selector(model, ids, grid="0:1:0.5")
    big = sel.select("harp", 4)
    small = sel.select("harp", 2)
    fresh = search_alphas(model, ids, 2, grid="0:1:0.5")
    assert small.layers == fresh.layers and small.alphas == fresh.alphas
    assert small.alphas == big.alphas[:2] and small.search_seconds <= big.search_seconds
    s4 = sel.select("sleb", 3)
    s2 = sel.select("sleb", 2)
    assert s2.layers == s4.layers[:2] == sleb(model, ids, 2).removed


def test_refine_never_worse_and_coordinatewise_optimal():
    model = tiny_model("llama", num_hidden_layers=5, seed=3)
    ids = _windows(n=3, s=20, seed=7)
    grid = [0.0, 0.5, 1.0]
    greedy = search_alphas(model, ids, 2, grid=grid)
    r = refine_alphas(model, ids, greedy.layers, greedy.alphas, grid=grid, fine=False, max_passes=10)
    assert r.start_ppl == pytest.approx(greedy.final_ppl, rel=1e-6)
    assert r.final_ppl <= r.start_ppl
    # the reported perplexity is the real one of the refined model
    with temporarily_pruned(model, r.layers, r.alphas):
        assert perplexity(model, ids).ppl == pytest.approx(r.final_ppl, rel=1e-5)
    # converged coordinate descent: no single-coordinate grid change helps (brute force, full forwards)
    for i in range(len(r.layers)):
        for a in grid:
            trial = list(r.alphas)
            trial[i] = a
            with temporarily_pruned(model, r.layers, trial):
                assert perplexity(model, ids).ppl >= r.final_ppl * (1 - 1e-6)
    assert not getattr(model.config, "harp", None)


def test_refine_fine_grid_moves_off_the_coarse_grid_when_that_helps():
    model = tiny_model("qwen2", num_hidden_layers=4, seed=1)
    ids = _windows(n=2, s=16, seed=8)
    greedy = search_alphas(model, ids, 2)
    r = refine_alphas(model, ids, greedy.layers, greedy.alphas, max_passes=8)
    assert r.final_ppl <= r.start_ppl
    assert [p["grid"] for p in r.passes][0] == "coarse"
    fine_tried = [e["alpha"] for e in r.log if round(e["alpha"] * 10, 6) % 1]
    assert fine_tried  # the fine phase evaluated off-grid alphas
    with temporarily_pruned(model, r.layers, r.alphas):
        assert perplexity(model, ids).ppl == pytest.approx(r.final_ppl, rel=1e-5)


def test_auto_k_picks_the_longest_prefix_within_budget():
    model = tiny_model("llama", num_hidden_layers=6, seed=1)
    ids = _windows(n=2, s=16, seed=9)
    base = perplexity(model, ids).ppl
    full = search_alphas(model, ids, 6, grid="0:1:0.5")  # the independent reference: one full search
    per_k = [min(e["ppl"] for e in full.log if e["layer"] == layer) for layer in full.layers]
    # a budget strictly between the worst of the first j and the j-th: the answer must be k = j
    for j in range(1, 6):
        prev = max(per_k[:j] + [base])
        if per_k[j] > prev:
            budget = (prev + per_k[j]) / 2
            break
    else:
        raise AssertionError(f"this tiny model never gets worse when pruned deeper: {per_k}")
    r = auto_k(model, ids, budget / base - 1, grid="0:1:0.5")
    assert r.k == j and r.stopped_early
    assert r.alphas == full.alphas[:j] and r.layers == full.layers[:j]
    with temporarily_pruned(model, r.layers, r.alphas):
        assert perplexity(model, ids).ppl <= r.budget_ppl
    with temporarily_pruned(model, full.layers[: j + 1], full.alphas[: j + 1]):
        assert perplexity(model, ids).ppl > r.budget_ppl
    generous = auto_k(model, ids, 10.0, grid="0:1:0.5", max_k=4)
    assert generous.k == 4 and not generous.stopped_early


def test_parse_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="Valid methods: harp, harp-refine"):
        parse_methods("harp,magic")
    assert parse_methods("HARP, sleb,harp") == ["harp", "sleb"]
    # 'all' is every method but the fitted-sink windows, which are named (they fit on longer windows of their own)
    fit = ["window-256-fit", "window-1024-fit"]
    assert parse_methods("all") == [m for m in METHODS if m not in fit] and set(fit) <= set(METHODS)
    assert parse_methods("all,window-1024-fit,harp") == [*parse_methods("all"), "window-1024-fit"]
    assert parse_methods("harp-ls,window-1024-fit") == ["harp-ls", "window-1024-fit"]
    assert parse_ppl_increase("10%") == pytest.approx(0.10)
    assert parse_ppl_increase(5) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="percentage"):
        parse_ppl_increase("lots")
    with pytest.raises(ValueError, match="choose between 1 and 5"):
        Selector(tiny_model("llama"), _windows()).select("harp", 6)


def test_plan_describe_and_original():
    assert Plan is Selection  # the earlier name stays importable
    p = Plan("sleb", "blocks", [3, 7])
    assert p.describe() == "layers 7,3 removed"
    q = Plan("harp", "attention", [7, 6], [0.5, 0.0])
    assert q.describe() == "7:0.5, 6:0"
    assert math.isfinite(q.k)


def test_a_registered_method_is_selectable_by_name():
    """Adding a method is one `@register` block: it joins METHODS (after the others), parse_methods and
    Selector.select, with no other edit; a second registration under the same name is refused."""
    assert all(spec.select is not None for spec in METHODS.values())
    before = list(METHODS)
    try:
        @register(MethodSpec("bottom-drop", "attention", "bottom k layers, alpha = 0", "test"))
        def _bottom(sel: Selector, k: int) -> Selection:
            return Selection("bottom-drop", "attention", list(range(k)), [0.0] * k)

        assert list(METHODS) == [*before, "bottom-drop"]
        assert parse_methods("bottom_drop, harp") == ["bottom-drop", "harp"]
        chosen = Selector(tiny_model("llama"), _windows()).select("bottom-drop", 2)
        assert (chosen.layers, chosen.alphas) == ([0, 1], [0.0, 0.0])
        with pytest.raises(ValueError, match="registered twice"):
            register(MethodSpec("harp", "attention", "again", "test"))(_bottom)
    finally:
        METHODS.pop("bottom-drop", None)
    assert list(METHODS) == before


def test_methods_refuse_a_pruned_model():
    model = tiny_model("llama")
    harp.prune(model, [5], [0.5])
    with pytest.raises(ValueError, match="original model"):
        Selector(model, _windows())
