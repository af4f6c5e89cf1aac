"""The range of transformers releases pyproject admits: a pruned model's KV cache on releases with and
without `cache_utils.DummyLayer` (CI runs the fast suite on the lowest admitted release too)."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny import tiny_model

import harp
from harp import modeling
from harp.model.accounting import kv_cache_bytes, output_cache


def _generate_matches_no_cache(family: str, where: list[int]) -> None:
    model = tiny_model(family, attn="eager")
    harp.prune(model, layers=where, alphas=[0.7 if i % 2 else 0.0 for i in range(len(where))])
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
        b = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


@pytest.fixture
def fallback_layer():
    """Use harp's own no-storage cache layer even where transformers has DummyLayer."""
    previous = modeling.use_fallback_cache_layer(True)
    yield modeling.pruned_cache_layer_class()
    modeling.use_fallback_cache_layer(previous)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
@pytest.mark.parametrize("where", [[0], [0, 2, 5], [5, 4]])
def test_fallback_cache_layer_generates_like_no_cache(fallback_layer, family, where):
    _generate_matches_no_cache(family, where)


def test_fallback_layer_stores_nothing_and_answers_length_queries(fallback_layer):
    model = tiny_model("llama")
    harp.prune(model, layers=[0, 3], alphas=[0.5, 0.0])
    ids = torch.randint(1, 128, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids, use_cache=True))
    assert modeling.uses_fallback_cache_layer()
    assert isinstance(cache.layers[0], fallback_layer)
    assert isinstance(cache.layers[3], fallback_layer)
    # the pruned layer 0 reports what the cache holds (5.0 reads layers[0] for the length), not 0
    assert cache.layers[0].get_seq_length() == cache.layers[1].get_seq_length() == 11
    assert cache.get_seq_length() == 11
    per_layer = cache.layers[1].keys.numel() * cache.layers[1].keys.element_size() * 2
    assert kv_cache_bytes(cache) == 4 * per_layer  # 6 layers, 2 keep nothing
    for name in ("is_compileable", "is_croppable", "supports_early_init", "is_sliding"):
        assert hasattr(cache.layers[0], name), name
    assert cache.is_compileable in (True, False)  # the 5.19 AttributeError came from this property


@pytest.mark.parametrize("fallback", [False, True])
def test_a_copied_cache_answers_for_the_copy(fallback):
    """`copy.deepcopy(cache)` (a prompt's cache reused for several continuations): the copy's pruned and
    window slots report what the copy holds as it grows, and the original stays as it was."""
    import copy

    previous = modeling.use_fallback_cache_layer(fallback)
    try:
        model = tiny_model("llama")
        harp.prune(model, layers=[0, 3], alphas=[0.5, 0.0], windows={4: 6}, sinks=1)
        ids = torch.randint(1, 128, (1, 15), generator=torch.Generator().manual_seed(0))
        kw = modeling.cache_kwarg(model)
        with torch.no_grad():
            cache = output_cache(model(input_ids=ids[:, :10], use_cache=True))
            copied = copy.deepcopy(cache)
            model(input_ids=ids[:, 10:], use_cache=True, **{kw: copied})
        assert [copied.layers[i].get_seq_length() for i in (0, 1, 3, 4)] == [15] * 4
        assert [cache.layers[i].get_seq_length() for i in (0, 1, 3, 4)] == [10] * 4
        assert copied.layers[4].keys.shape[-2] == 1 + 5 and cache.layers[1].keys.shape[-2] == 10  # sink + w - 1
    finally:
        modeling.use_fallback_cache_layer(previous)


def test_generate_on_the_installed_transformers():
    """What the user runs: whichever cache layer this transformers gives (CI: newest and lowest)."""
    _generate_matches_no_cache("llama", [0, 2, 5])
    _generate_matches_no_cache("gemma2", [1, 5])
    uses_fallback = modeling.uses_fallback_cache_layer()
    assert uses_fallback == (not hasattr(__import__("transformers.cache_utils").cache_utils, "DummyLayer")), \
        transformers.__version__
