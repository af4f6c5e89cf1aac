"""Window layers: a layer that keeps its attention over the last w positions only (`prune(..., windows=)`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from tiny import FAMILIES, HIDE_HARP, tiny_model

import harp
from harp import modeling
from harp.model import accounting
from harp.model.accounting import kv_cache_bytes, output_cache
from harp.modeling import HarpBlock, HarpBlockError, window_mask

# layer 0, a middle layer and the top one; Gemma 2/3's layers 0 and 3 are local (window 8): smaller w there
WINDOWS = {0: 3, 3: 5, 5: 4}


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_window_one_is_the_bypass_and_a_long_window_is_the_original(family):
    """w = 1: each token attends to itself only, which is HARP's bypass with alpha = 1 before the fold.
    w >= the sequence: the original layer."""
    ids = torch.randint(1, 128, (2, 12))
    base = tiny_model(family)
    original = _logits(base, ids)
    one = _logits(harp.prune(tiny_model(family), [], [], windows={3: 1}), ids)
    bypass = _logits(harp.prune(tiny_model(family), [3], [1.0]), ids)
    torch.testing.assert_close(one, bypass, rtol=1e-5, atol=1e-5)
    assert (one - original).abs().max() > 1e-3  # the layer's attention did matter
    wide_plan = {5: 12} if family.startswith("gemma") else {3: 12, 5: 100}  # Gemma's layer 3 is local (8)
    wide = _logits(harp.prune(tiny_model(family), [], [], windows=wide_plan), ids)
    torch.testing.assert_close(wide, original, rtol=1e-5, atol=1e-5)


def _qwen2(layer_types=None, window=None):
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
    if layer_types:
        kw.update(use_sliding_window=True, sliding_window=window, layer_types=layer_types, max_window_layers=0)
    else:
        kw.update(use_sliding_window=False)
    cfg = transformers.Qwen2Config(**kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_matches_transformers_own_per_layer_sliding_window(attn):
    """Qwen2 expresses per-layer windows itself (layer_types): the same weights with harp's window layers give
    the same logits, full forward and cached greedy decoding past the window."""
    layers = {0: 4, 2: 4, 5: 4}
    types = ["sliding_attention" if i in layers else "full_attention" for i in range(6)]
    native = _qwen2(types, 4)
    ours = _qwen2()
    ours.load_state_dict(native.state_dict())
    for m in (native, ours):
        m.set_attn_implementation(attn)
    harp.prune(ours, [], [], windows=layers)
    ids = torch.randint(1, 128, (2, 19))
    torch.testing.assert_close(_logits(ours, ids), _logits(native, ids), rtol=1e-5, atol=1e-5)
    assert (_logits(ours, ids) - _logits(_qwen2(), ids)).abs().max() > 1e-3
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids[:1, :6], **gen), native.generate(ids[:1, :6], **gen))


@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_decode_past_the_window_equals_a_full_forward(family, sinks):
    """Windows at layer 0, mid and top (with and without sink tokens): prefill then one token at a time, well
    past every window, gives the logits of one full forward (no cache) at every position."""
    attn = "sdpa" if family in ("llama", "qwen2") else "eager"
    # Gemma's local layers (0 and 3 here) cannot keep sinks: their own mask hides the first tokens
    windows = {5: 4} if sinks and family.startswith("gemma") else WINDOWS
    model = harp.prune(tiny_model(family, attn=attn), [1], [0.5], windows=windows, sinks=sinks)
    ids = torch.randint(1, 128, (2, 17))
    full = _logits(model, ids, use_cache=False)
    with torch.no_grad():
        out = model(ids[:, :3], use_cache=True)
        steps = [out.logits]
        cache = output_cache(out)
        for t in range(3, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = output_cache(out)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_long_forward_runs_in_chunks_and_equals_one_pass(family, monkeypatch):
    """Over more new tokens than max(w, WINDOW_CHUNK), a window layer attends chunk by chunk through its cache
    slot (O(n w)): the logits equal one masked pass, without a cache and with left padding, and a chunked
    prefill then cached greedy decoding gives the same tokens."""
    attn = "eager" if family == "gemma2" else "sdpa"
    sinks = 0 if family.startswith("gemma") else 1  # Gemma's local layers cannot keep sinks
    model = harp.prune(tiny_model(family, attn=attn), [1], [0.5], windows=WINDOWS, sinks=sinks)
    ids = torch.randint(1, 128, (2, 29))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    one_pass = _logits(model, ids, attention_mask=mask)
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    chunks = []
    real = modeling._chunk_kwargs
    monkeypatch.setattr(modeling, "_chunk_kwargs", lambda *a: chunks.append(a[1:]) or real(*a))
    monkeypatch.setattr(modeling, "WINDOW_CHUNK", 6)
    chunked = _logits(model, ids, attention_mask=mask)
    assert (0, 6, 29) in chunks and (24, 30, 29) in chunks  # the chunked path ran, last chunk short
    torch.testing.assert_close(chunked[0], one_pass[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked[1, 6:], one_pass[1, 6:], rtol=1e-5, atol=1e-5)  # padding rows are noise
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), tokens)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_kv_bytes_after_two_windows_equal_the_accounting(family):
    w = 4
    model = harp.prune(tiny_model(family), [1], [0.0], windows={0: w, 5: w})
    for n in (w - 2, 2 * w, 21):
        with torch.no_grad():
            cache = output_cache(model(torch.randint(1, 128, (1, n)), use_cache=True))
        expected = accounting.kv_cache_bytes_expected(model.config, n, dtype=torch.float32)
        assert kv_cache_bytes(cache) == expected, (family, n)
    full = accounting.kv_cache_bytes_expected(model.config, 21, {"layers": [1], "alphas": [0.0]}, dtype=4)
    assert expected < full


def test_accounting_counts_window_layers():
    cfg = tiny_model("llama").config
    plan = {"layers": [], "alphas": [], "window_layers": [4, 5], "windows": [8, 8]}
    per_token = 2 * 2 * 16 * 4  # k and v, 2 KV heads, head_dim 16, float32
    assert accounting.kv_cache_bytes_expected(cfg, 100, plan) == per_token * (4 * 100 + 2 * 7)
    assert accounting.attention_windows(cfg, plan) == [None] * 4 + [8, 8]
    assert accounting.parameter_count(cfg, plan) == accounting.parameter_count(cfg, {})
    full, win = accounting.prefill_flops(cfg, 64), accounting.prefill_flops(cfg, 64, plan)
    assert win["linear"] == full["linear"] and win["attention"] < full["attention"]
    d = 4 * 16
    keys = 64 * 65 // 2 * 4 + 2 * (8 * 9 // 2 + 56 * 8)  # four full layers, two capped at 8 keys per query
    assert win["attention"] == 4 * d * keys
    assert accounting.decode_flops(cfg, 99, plan)["attention"] == 4 * d * (4 * 100 + 2 * 8)
    saving = accounting.kv_savings(cfg, plan, contexts=[256])[0]["saving"]
    assert saving == pytest.approx(2 / 6 * (1 - 7 / 256))


def test_block_round_trip_and_format_version():
    model = harp.prune(tiny_model("llama"), [2], [0.5], windows={5: 64, 0: 16})
    block = model.config.harp
    assert block == {"format_version": 2, "layers": [2], "alphas": [0.5], "window_layers": [0, 5], "windows": [16, 64]}
    parsed = HarpBlock.from_config(model)
    assert parsed.windows_plan == {0: 16, 5: 64} and parsed.describe().endswith("windows 5:64, 0:16")
    # without window layers a block is still written as version 1 (what every harp release reads)
    assert harp.prune(tiny_model("llama"), [2], [0.5]).config.harp["format_version"] == 1
    with pytest.raises(HarpBlockError) as e:
        HarpBlock.from_dict({"format_version": 2, "layers": [2], "alphas": [1.0], "window_layers": [2, 9],
                             "windows": [8, 0]}, 6)
    text = str(e.value)
    assert "both bypassed and a window layer" in text and "out of range" in text


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_save_and_reload_exact(tmp_path, family):
    model = harp.prune(tiny_model(family, attn="sdpa"), [2], [0.7], windows=WINDOWS)
    ids = torch.randint(1, 128, (2, 17))
    out = harp.save(model, tmp_path / "ck")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["harp"]["window_layers"] == [0, 3, 5] and cfg["harp"]["windows"] == [3, 5, 4]
    loaded = harp.load(out, attn_implementation="sdpa")
    assert HarpBlock.from_config(loaded).windows_plan == WINDOWS
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


_PLAIN = HIDE_HARP + textwrap.dedent(
    """
    import torch, transformers
    for path in sys.argv[1:]:
        ids, ref = torch.load(path + "/ref.pt")
        m = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                              attn_implementation=ref["attn"])
        with torch.no_grad():
            full = m(ids, use_cache=False).logits
            gen = m.generate(ids[:1, :4], max_new_tokens=14, do_sample=False, pad_token_id=0)
        ok = torch.equal(full, ref["logits"]) and torch.equal(gen, ref["gen"])
        print(path, "EQUAL" if ok else "DIFFERENT")
    """
)


def test_plain_transformers_reload_is_exact(tmp_path):
    paths = []
    for family, attn in (("llama", "sdpa"), ("gemma2", "eager")):
        model = harp.prune(tiny_model(family, attn=attn), [2], [0.7], windows=WINDOWS,
                           sinks=1 if family == "llama" else 0)
        ids = torch.randint(1, 128, (2, 17))
        out = harp.save(model, tmp_path / family)
        with torch.no_grad():
            ref = {"attn": attn, "logits": model(ids, use_cache=False).logits,
                   "gen": model.generate(ids[:1, :4], max_new_tokens=14, do_sample=False, pad_token_id=0)}
        torch.save((ids, ref), out / "ref.pt")
        paths.append(str(out))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    r = subprocess.run([sys.executable, "-c", _PLAIN, *paths], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(paths) and all(line.endswith("EQUAL") for line in lines), r.stdout


# window plans the family's own config can say (one w, no sinks; Gemma 2: w = its own window 8, on global
# layers) and those it cannot; each with a bypassed layer, which stays harp's alone
NATIVE = {
    "qwen2": ([1], {0: 4, 3: 4, 5: 4}),
    "qwen3": ([2], {4: 4, 5: 4}),
    "gemma2": ([2], {1: 8, 5: 8}),
}
NOT_NATIVE = {
    "sinks": ("qwen2", {3: 4, 5: 4}, 2),
    "mixed w": ("qwen2", {3: 4, 5: 5}, 0),
    "gemma2 w != its own": ("gemma2", {1: 4, 5: 4}, 0),
    "gemma3 local RoPE": ("gemma3", {5: 8}, 0),  # a local layer would take the local RoPE base (10k, not 1M)
    "mistral": ("mistral", {3: 4, 5: 4}, 0),  # one model-wide sliding_window, no per-layer types
    "llama": ("llama", {3: 4, 5: 4}, 0),
}
FAMILY_FIELDS = ("layer_types", "sliding_window", "use_sliding_window", "max_window_layers")


def _saved_config(model, path):
    return json.loads((harp.save(model, path) / "config.json").read_text())


@pytest.mark.parametrize("family", list(NATIVE))
def test_checkpoint_says_the_windows_in_the_family_config(tmp_path, family):
    """config.json marks exactly the window layers (and the family's own local layers) "sliding_attention"
    with sliding_window = w; harp reloads it exactly (logits, cached decoding, KV bytes = the accounting),
    its KV figures from config.json are the pruned model's, and saving the reloaded model writes the same."""
    bypassed, windows = NATIVE[family]
    attn = "eager" if family == "gemma2" else "sdpa"
    model = harp.prune(tiny_model(family, attn=attn), bypassed, [0.5], windows=windows)
    own = accounting.attention_windows(model.config)  # the family's own local layers (Gemma 2: 0, 2, 4)
    cfg = _saved_config(model, tmp_path / "ck")
    w = set(windows.values()).pop()
    assert cfg["layer_types"] == ["sliding_attention" if i in windows or own[i] else "full_attention"
                                  for i in range(6)]
    assert cfg["sliding_window"] == w and cfg["harp"]["window_layers"] == sorted(windows)
    if family.startswith("qwen"):  # without use_sliding_window transformers drops the window
        assert cfg["use_sliding_window"] is True and cfg["max_window_layers"] == min(windows)
    loaded = harp.load(tmp_path / "ck", attn_implementation=attn)
    assert loaded.config.layer_types == cfg["layer_types"]
    ids = torch.randint(1, 128, (2, 19))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    gen = dict(max_new_tokens=14, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(loaded.generate(ids[:1, :5], **gen), model.generate(ids[:1, :5], **gen))
        cache = output_cache(loaded(ids[:1], use_cache=True))  # batch 1, as the accounting counts
    assert kv_cache_bytes(cache) == accounting.kv_cache_bytes_expected(loaded.config, 19, dtype=torch.float32)
    from harp.model.configs import config_from_dict

    assert accounting.kv_savings(config_from_dict(cfg), None) == accounting.kv_savings(model.config, None)
    assert accounting.attention_windows(loaded.config, {}) == own  # the original, for "before" figures
    again = _saved_config(loaded, tmp_path / "again")
    assert {k: again.get(k) for k in FAMILY_FIELDS} == {k: cfg.get(k) for k in FAMILY_FIELDS}


@pytest.mark.parametrize("case", list(NOT_NATIVE))
def test_family_config_unchanged_where_it_cannot_say_the_windows(tmp_path, case):
    family, windows, sinks = NOT_NATIVE[case]
    model = harp.prune(tiny_model(family), [2], [0.5], windows=windows, sinks=sinks)
    cfg = _saved_config(model, tmp_path / "pruned")
    plain = _saved_config(tiny_model(family), tmp_path / "plain")
    drop = ("harp",)  # the harp block alone carries the plan
    assert {k: v for k, v in cfg.items() if k not in drop} == {k: v for k, v in plain.items() if k not in drop}
    assert HarpBlock.from_dict(cfg["harp"]).windows_plan == windows


_NATIVE_PLAIN = HIDE_HARP + textwrap.dedent(
    """
    import torch, transformers
    for path in sys.argv[1:]:
        ids, ref = torch.load(path + "/ref.pt")
        m = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=ref["attn"])
        with torch.no_grad():
            full = m(ids, use_cache=False).logits
            gen = m.generate(ids[:1, :4], max_new_tokens=14, do_sample=False, pad_token_id=0)
        ok = torch.equal(full, ref["logits"]) and torch.equal(gen, ref["gen"])
        print(path, type(m).__name__, "EQUAL" if ok else "DIFFERENT")
    """
)


def test_plain_transformers_without_remote_code_runs_a_window_checkpoint(tmp_path):
    """A window-only checkpoint whose family config says the windows is an ordinary checkpoint of the family:
    plain transformers (harp not installed, no trust_remote_code) builds its own sliding-window attention and
    cache and gives harp's logits and greedy tokens past the window."""
    paths = []
    for family, attn, windows in (("qwen2", "sdpa", {0: 4, 3: 4, 5: 4}), ("qwen3", "eager", {4: 4, 5: 4}),
                                  ("gemma2", "eager", {1: 8, 5: 8})):
        model = harp.prune(tiny_model(family, attn=attn), [], [], windows=windows)
        ids = torch.randint(1, 128, (2, 19))
        out = harp.save(model, tmp_path / family)
        with torch.no_grad():
            ref = {"attn": attn, "logits": model(ids, use_cache=False).logits,
                   "gen": model.generate(ids[:1, :4], max_new_tokens=14, do_sample=False, pad_token_id=0)}
        plain = tiny_model(family, attn=attn)  # the windows matter: the original differs past them
        assert (_logits(plain, ids) - ref["logits"]).abs().max() > 1e-3
        torch.save((ids, ref), out / "ref.pt")
        paths.append(str(out))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    r = subprocess.run([sys.executable, "-c", _NATIVE_PLAIN, *paths], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(paths) and all(line.endswith("EQUAL") for line in lines), r.stdout
    assert not any(" Harp" in line for line in lines), r.stdout  # the family's own class, not harp's runtime
    assert not (tmp_path / "hf_modules").exists() or not any((tmp_path / "hf_modules").rglob("harp_modeling.py"))


def test_temporarily_windowed_restores_the_config_exactly():
    """The family's fields are written only into the saved config.json, never into the live model's config
    (transformers reads layer_types at every forward): pruning and restoring leave it as it was."""
    model = tiny_model("qwen2", attn="sdpa")
    before = model.config.to_dict()
    ids = torch.randint(1, 128, (1, 15))
    with harp.temporarily_pruned(model, [1], [0.5], windows={3: 4, 5: 4}):
        assert {k: getattr(model.config, k) for k in FAMILY_FIELDS} == {k: before[k] for k in FAMILY_FIELDS}
        _logits(model, ids)
    assert model.config.to_dict() == before


def test_temporarily_windowed_restores_the_model():
    model = tiny_model("qwen3")
    ids = torch.randint(1, 128, (1, 15))
    before = _logits(model, ids)
    with harp.temporarily_pruned(model, [1], [0.5], windows={4: 2}):
        assert not torch.equal(_logits(model, ids), before)
    assert torch.equal(_logits(model, ids), before) and not getattr(model.config, "harp", None)
    assert type(model.model.layers[4].self_attn).__name__ == "Qwen3Attention"


def test_bad_windows_are_refused_before_anything_changes():
    model = tiny_model("gemma2")  # local layers 0, 2, 4 with a window of 8
    cases = [
        ({3: 0}, "at least 1"),
        ({3: 2.5}, "whole number"),
        ({6: 4}, "out of range"),
        ({1: 4}, "both bypassed and a window layer"),
        ({0: 8}, "already a sliding-window layer of 8 tokens"),
        ({2: 64}, "Choose a window below 8"),
    ]
    with pytest.raises(ValueError, match="cannot keep sink tokens"):
        harp.prune(model, [], [], windows={0: 4}, sinks=2)
    for windows, message in cases:
        with pytest.raises(ValueError, match=message):
            harp.prune(model, [1], [0.5], windows=windows)
        assert not getattr(model.config, "harp", None)
    harp.prune(model, [], [], windows={0: 4})  # a smaller window on a local layer is fine
    with pytest.raises(ValueError, match="already pruned"):
        harp.prune(model, [], [], windows={0: 2})


def test_window_mask_shapes():
    q, k = torch.tensor([5, 6]), torch.tensor([3, 4, 5, 6])
    band = window_mask(None, q, k, 3, dtype=torch.float32, additive=False)
    # queries at positions 5, 6; keys at 3..6: query 5 sees 3..5, query 6 sees 4..6
    assert band[0, 0].tolist() == [[True, True, True, False], [False, True, True, True]]
    padded = torch.ones(1, 1, 2, 7, dtype=torch.bool)  # the model's mask: columns are positions 0..6
    padded[..., 4] = False  # a padding position among the kept keys
    m = window_mask(padded, q, k, 3, dtype=torch.float32, additive=False)
    assert m[0, 0].tolist() == [[True, False, True, False], [False, False, True, True]]
    # one sink: position 0 stays visible to every query, and its padding column is honoured
    q, k = torch.tensor([7]), torch.tensor([0, 5, 6, 7])
    sink = window_mask(None, q, k, 3, 1, dtype=torch.float32, additive=False)
    assert sink[0, 0].tolist() == [[True, True, True, True]]
    plain = window_mask(None, q, k, 2, 0, dtype=torch.float32, additive=False)
    assert plain[0, 0].tolist() == [[False, False, True, True]]
    pad0 = torch.ones(1, 1, 1, 8, dtype=torch.bool)
    pad0[..., 0] = False
    padded_sink = window_mask(pad0, q, k, 3, 1, dtype=torch.float32, additive=False)
    assert padded_sink[0, 0].tolist() == [[False, True, True, True]]
    add = window_mask(None, torch.arange(3), torch.arange(3), 2, dtype=torch.float32, additive=True)
    assert add[0, 0, 2, 0] == torch.finfo(torch.float32).min and add[0, 0, 2, 1] == 0


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_sinks_covering_the_sequence_are_the_original(family):
    ids = torch.randint(1, 128, (2, 12))
    original = _logits(tiny_model(family), ids)
    model = harp.prune(tiny_model(family), [], [], windows={5: 2}, sinks=12)
    torch.testing.assert_close(_logits(model, ids), original, rtol=1e-5, atol=1e-5)
    fewer = harp.prune(tiny_model(family), [], [], windows={5: 2}, sinks=3)
    assert (_logits(fewer, ids) - original).abs().max() > 1e-4


def test_sinks_kv_bytes_accounting_and_block():
    w, s = 4, 3
    model = harp.prune(tiny_model("llama"), [], [], windows={0: w, 5: w}, sinks=s)
    assert model.config.harp["sinks"] == [3, 3] and HarpBlock.from_config(model).windows_text() == "5:4+3, 0:4+3"
    for n in (2, 5, 7, 20):
        with torch.no_grad():
            cache = output_cache(model(torch.randint(1, 128, (1, n)), use_cache=True))
        assert kv_cache_bytes(cache) == accounting.kv_cache_bytes_expected(model.config, n, dtype=torch.float32), n
    cfg = model.config
    d = 4 * 16
    plain = accounting.prefill_flops(cfg, 20, {"window_layers": [0, 5], "windows": [4, 4]})["attention"]
    with_sinks = accounting.prefill_flops(cfg, 20)["attention"]
    # queries 5..20 see min(3, i - 4) sink keys more: 1 + 2 + 3 x 14 = 45 per window layer
    assert with_sinks - plain == 4 * d * 2 * 45
    assert accounting.decode_flops(cfg, 99)["attention"] == 4 * d * (4 * 100 + 2 * (4 + 3))
    with pytest.raises(ValueError, match="sinks=-1"):
        harp.prune(tiny_model("llama"), [], [], windows={0: 4}, sinks=-1)


def test_window_methods_are_registered_and_applied_exactly():
    from harp.methods.registry import METHODS
    from harp.methods.selector import Selector, applied

    assert {"window-64", "window-256", "window-1024", "window-any-256"} <= set(METHODS)
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (2, 40))
    before = _logits(model, ids)
    sel = Selector(model, ids[:, :32])
    plan = sel.select("window-256", 2)
    assert plan.kind == "window" and plan.windows == {5: 256, 4: 256} and plan.sinks == 4
    assert plan.describe() == "window 256+4 on layers 5,4"
    with applied(model, plan):  # longer than the prompt: the original model
        torch.testing.assert_close(_logits(model, ids), before, rtol=1e-5, atol=1e-5)
        assert accounting.attention_windows(model.config, None)[4:] == [256, 256]
    short = sel.select("window-any-256", 3)
    assert len(short.layers) == 3 and short.window == 256
    assert torch.equal(_logits(model, ids), before) and not getattr(model.config, "harp", None)


# ------------------------------------------------------------------------------------------------
# harp prune --window, harp info
# ------------------------------------------------------------------------------------------------


def _cli(*args):
    from typer.testing import CliRunner

    from harp.cli import get_app

    return CliRunner().invoke(get_app(), [str(a) for a in args], env={"COLUMNS": "300"})


SMALL = ["--calib-windows", "2", "--seq-len", "32", "--eval-tokens", "256", "--eval-seq-len", "128",
         "--grid", "0:1:0.5"]


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    from tiny import tiny_folder

    return tiny_folder(tmp_path_factory.mktemp("w") / "tiny-gemma2", "gemma2", max_position_embeddings=512)


def test_prune_window_end_to_end(gemma_folder, tmp_path):
    out = tmp_path / "win"
    # layer 4 is local in Gemma 2: it can be windowed smaller, but cannot keep sink tokens (--sinks 0)
    r = _cli("prune", "--model", gemma_folder, "--out", out, "--layers", "2", "--window", "4", "--sinks", "0", *SMALL,
             "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "window layers (4 tokens)" in flat and "attention over the last 4 tokens" in flat
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["method"] == "window" and summary["window"] == 4 and summary["params_removed"] == 0
    assert set(summary["ppl"]) >= {"original", "window", "harp-ls", "alpha=1", "alpha=0"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["harp"] == {"format_version": 2, "layers": [], "alphas": [], "window_layers": [4, 5],
                           "windows": [4, 4]}
    recipe = json.loads((out / "harp_recipe.json").read_text())
    assert recipe["method"] == "window" and recipe["window"] == 4 and recipe["sinks"] == 0
    # the saved model is what was measured: reload and compare perplexity on the same windows
    loaded = harp.load(out)
    assert HarpBlock.from_config(loaded).windows_plan == {4: 4, 5: 4}
    kv = summary["kv_at_contexts"]
    assert [row["context"] for row in kv] == [512] and kv[0]["saving"] > 0.3  # 2 of 6 layers, mostly saved
    info = _cli("info", out)
    flat = " ".join(info.output.split())
    assert info.exit_code == 0 and "5:4, 4:4 (layer:window" in flat and "search" not in flat
    assert "keep their last W - 1" in flat


@pytest.mark.parametrize("args, message", [
    (["--window", "0"], "--window 0: a window is a whole number of tokens, at least 1"),
    (["--window", "4", "--fit", "none"], "two kinds of pruned layer"),
    (["--window", "4", "--alphas", "1,1"], "--alphas rescale bypassed layers; --window keeps"),
    (["--window", "4", "--streamed"], "nothing to stream"),
    (["--window", "8", "--layer-ids", "2,5"], "Layer 2 is already a sliding-window layer of 8 tokens"),
])
def test_prune_window_bad_input_refused_before_loading(gemma_folder, tmp_path, monkeypatch, args, message):
    import harp.jobs.prune as job

    def never(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(job, "load_on_device", never)
    r = _cli("prune", "--model", gemma_folder, "--out", tmp_path / "x", "--layers", "2", *args, *SMALL)
    assert r.exit_code != 0 and message in str(r.exception), r.exception
    assert not (tmp_path / "x").exists()


def test_prune_window_larger_than_the_context_warns(gemma_folder, tmp_path):
    r = _cli("prune", "--model", gemma_folder, "--out", tmp_path / "w", "--layers", "1", "--window", "512",
             "--no-reference", *SMALL)
    assert r.exit_code == 0, r.output
    assert "not below the model's maximum context (512 tokens)" in " ".join(r.output.split())


@pytest.mark.parametrize("fmt, out", [("gguf", "m.gguf"), ("deci", "deci")])
def test_export_refuses_window_layers_before_loading(tmp_path, monkeypatch, fmt, out):
    """llama.cpp's `deci` and the DeciLM layout have only full attention: never a file that silently attends
    past the window."""
    ck = harp.save(harp.prune(tiny_model("llama"), [1], [0.5], windows={4: 8}), tmp_path / "ck")
    import harp.export.run as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    r = _cli("export", ck, "--format", fmt, "--out", tmp_path / out)
    text = str(r.exception)
    assert r.exit_code != 0 and "harp window layers (4:8, layer:window)" in text and "--format" in text, text
    assert not (tmp_path / out).exists()
    from harp.export.deci import ExportError, to_deci

    with pytest.raises(ExportError, match="attend past the window"):
        to_deci(harp.prune(tiny_model("llama"), [], [], windows={4: 8}))


def test_bench_window_checkpoint_kv_and_bounds():
    from harp.bench.run import run_bench

    orig = tiny_model("llama", attn="sdpa", max_position_embeddings=512)
    pruned = harp.prune(tiny_model("llama", attn="sdpa", max_position_embeddings=512), [], [], windows={4: 16, 5: 16})
    r = run_bench(orig, pruned, contexts=[8, 64], new_tokens=2, repeats=1, warmup=0)
    rows = {row["context"]: row for row in r["contexts"]}
    for n, row in rows.items():
        kv = row["kv_cache_bytes"]
        assert kv["pruned"] == kv["expected_pruned"] and kv["original"] == kv["expected_original"]
        assert (kv["pruned"] < kv["original"]) == (n > 15)  # below the window, window layers hold every token
    assert rows[64]["kv_cache_bytes"]["reduction"] == pytest.approx(2 / 6 * (1 - 15 / (64 + 2)), rel=0.05)


def test_plan_states_the_window_saving(gemma_folder):
    r = _cli("plan", "--window", "256")
    flat = " ".join(r.output.split())
    assert r.exit_code == 0, r.output
    # SmolLM2 preset: 8 of 30 layers, w = 256: 8/30 x (1 - 255/n)
    assert "per 2048-token sequence (-23.3 %) as window layers of 256 tokens (--window)" in flat
    assert "per 8192-token sequence (the model's maximum) (-25.8 %)" in flat
    bad = _cli("plan", "--window", "0")
    assert bad.exit_code != 0 and "--window 0" in str(bad.exception)
    local = _cli("plan", "--model", gemma_folder, "--layers", "2", "--window", "8")  # layer 4 is local (8)
    assert local.exit_code != 0 and "already a sliding-window layer" in str(local.exception), local.output


def test_prune_window_keeps_four_sinks_by_default(tmp_path):
    from tiny import tiny_folder

    src = tiny_folder(tmp_path / "llama", "llama", max_position_embeddings=512)
    out = tmp_path / "w"
    r = _cli("prune", "--model", src, "--out", out, "--layers", "2", "--window", "16", "--no-reference", *SMALL)
    assert r.exit_code == 0, r.output
    assert "attention over the last 16 tokens and the first 4" in " ".join(r.output.split())
    block = json.loads((out / "config.json").read_text())["harp"]
    assert block["windows"] == [16, 16] and block["sinks"] == [4, 4]
    bad = _cli("prune", "--model", src, "--out", tmp_path / "x", "--sinks", "2", *SMALL)
    assert bad.exit_code != 0 and "--sinks 2 applies to window layers" in str(bad.exception)
