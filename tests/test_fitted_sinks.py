"""Fitted sinks: a window layer's per-head sink logit (one more softmax column, no value) and output bias
standing in for sink tokens (`harp.fit_sinks`, `prune(..., fitted_sinks=)`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from test_window import _PLAIN
from tiny import FAMILIES, tiny_folder, tiny_model
from transformers import AttentionInterface

import harp
from harp.model.accounting import output_cache
from harp.modeling import FittedSink, HarpBlock, HarpBlockError, attention_geometry

WINDOWS = {0: 3, 3: 5, 5: 4}  # layer 0, mid, top (Gemma's 0 and 3 are local with window 8)


def _random_sinks(model, layers, seed=1):
    g = attention_geometry(model.config)
    gen = torch.Generator().manual_seed(seed)
    return {i: FittedSink(torch.randn(g["heads"], generator=gen), 0.2 * torch.randn(g["hidden"], generator=gen))
            for i in layers}


def _eager(query, key, value, mask, scaling, softcap, column=None):
    """Plain attention, written out: the reference the tests compare against (`column`: per-head logit of one
    more softmax column with no value)."""
    heads = query.shape[1]
    k = key.repeat_interleave(heads // key.shape[1], 1)
    v = value.repeat_interleave(heads // value.shape[1], 1)
    logits = query @ k.transpose(-1, -2) * scaling
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~mask, float("-inf"))
    if column is not None:
        logits = torch.cat([column.view(1, -1, 1, 1).expand(*logits.shape[:-1], 1), logits], -1)
        v = torch.cat([torch.zeros_like(v[..., :1, :]), v], -2)
    return (torch.softmax(logits, -1) @ v).transpose(1, 2).contiguous()


class _Reference:
    """The unpruned model run through `_eager`: layer `layer` (if any) attends over a window of `window`
    (plus a sink column and, through a hook on o_proj, an output bias) and its query/key/value are kept."""

    def __init__(self, model, layer=None, window=None, sink=None):
        self.model, self.layer, self.window, self.sink = model, layer, window, sink
        self.seen = {}
        AttentionInterface.register("harp_test_reference", self)
        model.set_attn_implementation("harp_test_reference")
        if sink is not None:
            o_proj = model.model.layers[layer].self_attn.o_proj
            o_proj.register_forward_hook(lambda m, a, out: out + sink.bias)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, softcap=None, sliding_window=None,
                 **kw):
        n = query.shape[2]
        q, k = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
        mask = k <= q
        own = getattr(module, "sliding_window", None) or sliding_window
        if own:
            mask &= q - k < own
        column = None
        if module.layer_idx == self.layer:
            self.seen = {"query": query, "key": key, "value": value, "scaling": scaling, "softcap": softcap}
            if self.window is not None:
                mask &= q - k < self.window
            column = None if self.sink is None else self.sink.logit
        return _eager(query, key, value, mask, scaling, softcap, column), None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_fitted_sink_is_one_more_softmax_column_and_a_bias(family):
    """harp's window layer with a fitted sink gives the logits of attention written out with the extra
    column (and the bias after o_proj), at the top layer (Gemma 2: with its logit softcap); a very negative
    logit and a zero bias give the plain window layer."""
    ids = torch.randint(1, 128, (1, 14))
    model = tiny_model(family, attn="eager")
    sinks = _random_sinks(model, [5])
    ours = harp.prune(tiny_model(family, attn="eager"), [], [], windows={5: 4}, fitted_sinks=sinks)
    _Reference(model, 5, 4, sinks[5])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    g = attention_geometry(model.config)
    off = {5: FittedSink(torch.full((g["heads"],), -1e4), torch.zeros(g["hidden"]))}
    plain = harp.prune(tiny_model(family), [], [], windows={5: 4})
    quiet = harp.prune(tiny_model(family), [], [], windows={5: 4}, fitted_sinks=off)
    with torch.no_grad():
        torch.testing.assert_close(quiet(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
        assert (ours(ids).logits - plain(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_decode_with_fitted_sinks_equals_a_full_forward(family):
    """Fitted sinks at layer 0, mid and top (with a bypassed layer): prefill, then one token at a time well
    past every window, gives the logits of one full forward (no cache); greedy generation is the same
    chunked (a prefill longer than the chunk) and not."""
    attn = "sdpa" if family in ("llama", "qwen2") else "eager"
    model = tiny_model(family, attn=attn)
    windows = {5: 4} if family.startswith("gemma") else WINDOWS
    harp.prune(model, [1], [0.5], windows=windows, fitted_sinks=_random_sinks(model, windows))
    ids = torch.randint(1, 128, (2, 17))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :3], use_cache=True)
        steps, cache = [out.logits], output_cache(out)
        for t in range(3, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = output_cache(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_fitted_sinks_run_in_chunks(monkeypatch):
    from harp import modeling

    model = tiny_model("llama", attn="sdpa")
    harp.prune(model, [], [], windows=WINDOWS, fitted_sinks=_random_sinks(model, WINDOWS))
    ids = torch.randint(1, 128, (2, 29))
    with torch.no_grad():
        one = model(ids).logits
        monkeypatch.setattr(modeling, "WINDOW_CHUNK", 6)
        torch.testing.assert_close(model(ids).logits, one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_fit_sinks_measures_what_the_sink_tokens_carry(family):
    """The fitted constants of one window layer (the lowest, so everything below it is the original model)
    equal the statistics computed by hand from that layer's queries, keys and values in the unpruned model:
    b the mean log of the sinks' attention mass, share the mean of sigmoid(b - window logsumexp), and the
    bias o_proj of share times the sinks' mean output; at the queries the window has left the sinks."""
    layer, window, sinks = 3, 6, 2
    calib = torch.randint(1, 128, (3, 30))
    fit = harp.fit_sinks(tiny_model(family), calib, {layer: window}, sinks=sinks)
    assert set(fit.fitted) == {layer} and fit.sinks == sinks and fit.tokens == calib.numel()
    model = tiny_model(family)
    ref = _Reference(model, layer)
    b_rows, win_rows, out_rows = [], [], []
    for row in calib:
        with torch.no_grad():
            model(row[None], use_cache=False)
        s = ref.seen
        heads = s["query"].shape[1]
        k = s["key"].repeat_interleave(heads // s["key"].shape[1], 1)
        v = s["value"].repeat_interleave(heads // s["value"].shape[1], 1)
        logits = (s["query"] @ k.transpose(-1, -2) * s["scaling"]).double()[0]
        if s["softcap"]:
            logits = torch.tanh(logits / s["softcap"]) * s["softcap"]
        for q in range(window + sinks, calib.shape[1]):
            b_rows.append(torch.logsumexp(logits[:, q, :sinks], -1))
            win_rows.append(torch.logsumexp(logits[:, q, q - window + 1:q + 1], -1))
            out_rows.append(torch.einsum("hs,hsd->hd", torch.softmax(logits[:, q, :sinks], -1),
                                         v[0, :, :sinks].double()))
    assert fit.queries == len(b_rows) == 3 * (30 - window - sinks)
    b = torch.stack(b_rows).mean(0)
    share = torch.sigmoid(b - torch.stack(win_rows)).mean(0)
    value = torch.stack(out_rows).mean(0)
    o = model.model.layers[layer].self_attn.o_proj.weight.double()
    torch.testing.assert_close(fit.fitted[layer].logit, b.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fit.fitted[layer].bias, (o @ (share[:, None] * value).flatten()).float(),
                               rtol=1e-4, atol=1e-5)
    assert fit.share[layer] == pytest.approx(float(share.mean()), rel=1e-5)


def test_fit_sinks_restores_the_model_and_refuses_short_windows():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
    harp.fit_sinks(model, torch.randint(1, 128, (2, 20)), {4: 5})
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert not HarpBlock.from_config(model)
    with pytest.raises(ValueError, match=r"longer than window \+ 4 sinks \(10 tokens or more\); these have 9"):
        harp.fit_sinks(model, torch.randint(1, 128, (2, 9)), {4: 5})
    with pytest.raises(ValueError, match="sink tokens"):
        harp.fit_sinks(model, torch.randint(1, 128, (2, 20)), {4: 5}, sinks=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_save_and_reload_fitted_sinks_exactly(tmp_path, family):
    """The block says which window layers have a fitted sink (format version 3: an older harp refuses it);
    the logits and biases are weights; harp.load gives the same logits and greedy tokens."""
    model = tiny_model(family, attn="sdpa")
    harp.prune(model, [2], [0.7], windows={5: 4, 4: 6}, fitted_sinks=_random_sinks(model, [5]))
    out = harp.save(model, tmp_path / "ck")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["harp"]["format_version"] == 3 and cfg["harp"]["fitted_sinks"] == [5]
    assert "layer_types" not in cfg or cfg["layer_types"] == getattr(tiny_model(family).config, "layer_types", None)
    loaded = harp.load(out, attn_implementation="sdpa")
    assert HarpBlock.from_config(loaded).windows_text() == "5:4+fit, 4:6"
    ids = torch.randint(1, 128, (2, 17))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        gen = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(loaded.generate(ids[:1, :3], **gen), model.generate(ids[:1, :3], **gen))


def test_plain_transformers_reloads_fitted_sinks_exactly(tmp_path):
    model = tiny_model("qwen2", attn="sdpa")
    harp.prune(model, [], [], windows={3: 4, 5: 4}, fitted_sinks=_random_sinks(model, [3, 5]))
    ids = torch.randint(1, 128, (2, 17))
    out = harp.save(model, tmp_path / "ck")
    with torch.no_grad():
        ref = {"attn": "sdpa", "logits": model(ids, use_cache=False).logits,
               "gen": model.generate(ids[:1, :4], max_new_tokens=14, do_sample=False, pad_token_id=0)}
    torch.save((ids, ref), out / "ref.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    r = subprocess.run([sys.executable, "-c", _PLAIN, str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("EQUAL"), r.stdout


def test_block_checks_fitted_sinks():
    good = {"format_version": 3, "layers": [], "alphas": [], "window_layers": [3, 5], "windows": [4, 4],
            "fitted_sinks": [5]}
    block = HarpBlock.from_dict(good, 6)
    assert block.fitted_sinks == (5,) and block.to_dict() == good
    assert HarpBlock.from_dict({**good, "fitted_sinks": [], "format_version": 2}, 6).to_dict()["format_version"] == 2
    for bad, message in [({"fitted_sinks": [2]}, "harp fitted sink layer 2 is not a window layer"),
                         ({"sinks": [0, 4]}, "harp window layer 5 has both 4 sink tokens and a fitted sink"),
                         ({"fitted_sinks": 5}, "must be a list"),
                         ({"format_version": 4}, "newer than this harp-prune reads")]:
        with pytest.raises(HarpBlockError, match=message):
            HarpBlock.from_dict({**good, **bad}, 6)


def test_prune_refuses_bad_fitted_sinks_before_changing_anything():
    model = tiny_model("llama")
    sinks = _random_sinks(model, [5])
    for kw, message in [(dict(windows={4: 4}), r"layers \[5\], which are not being made window layers"),
                        (dict(windows={5: 4}, sinks=2), "pass `sinks=0` with them")]:
        with pytest.raises(ValueError, match=message):
            harp.prune(model, [], [], fitted_sinks=sinks, **kw)
        assert not HarpBlock.from_config(model)
    g = attention_geometry(model.config)
    with pytest.raises(ValueError, match="one logit per head"):
        harp.prune(tiny_model("llama"), [], [], windows={5: 4},
                   fitted_sinks={5: FittedSink(torch.zeros(g["heads"] + 1), torch.zeros(g["hidden"]))})


def test_prune_cli_fits_sinks_end_to_end(tmp_path):
    """`harp prune --window W --sinks fit`: fitted on calibration text, saved (block and weights), stated in the
    summary, recipe and `harp info`; the saved model reloads to the perplexity that was measured."""
    from test_window import SMALL, _cli
    from tiny import tiny_folder

    src = tiny_folder(tmp_path / "llama", "llama", max_position_embeddings=512)
    out = tmp_path / "w"
    r = _cli("prune", "--model", src, "--out", out, "--layers", "2", "--window", "16", "--sinks", "fit",
             "--no-reference", *SMALL, "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "attention over the last 16 tokens, with fitted sinks (in place of 4 sink tokens)" in flat
    assert "fitted sinks of window layers 5, 4 (standing in for 4 sink tokens) on 4 x 512 calibration tokens" in flat
    block = json.loads((out / "config.json").read_text())["harp"]
    assert block["windows"] == [16, 16] and block["fitted_sinks"] == [4, 5] and "sinks" not in block
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["sinks"] == 0 and summary["sink_fit"]["tokens"] == 4 * 512 and set(summary["sink_fit"]["share"]) \
        == {"4", "5"}
    recipe = json.loads((out / "harp_recipe.json").read_text())
    assert recipe["sinks"] == "fit" and recipe["sink_fit"]["queries"] == 4 * (512 - 16 - 4)
    cfg = json.loads((out / "config.json").read_text())  # a logit per head and a bias per channel, per layer
    added = 2 * (cfg["num_attention_heads"] + cfg["hidden_size"])
    assert summary["params_removed"] == -added and re.search(rf"parameters added\W+{added:,} \(\+", flat), flat
    loaded = harp.load(out)
    assert loaded.model.layers[5].self_attn.harp_sink_logit.abs().sum() > 0
    info = _cli("info", out)
    assert info.exit_code == 0 and "5:16+fit, 4:16+fit" in " ".join(info.output.split()), info.output


@pytest.mark.parametrize("args, message", [
    (["--window", "4", "--sinks", "many"], "--sinks must be a whole number of tokens >= 0 or 'fit'"),
    (["--window", "510", "--sinks", "fit"], "a window of 510 leaves no room in this model's 512-token context"),
    (["--window", "4", "--sinks", "fit", "--layer-ids", "2,5"], "Layer 2 is already a sliding-window layer"),
    (["--sinks", "fit"], "--sinks fit applies to window layers"),
])
def test_prune_cli_refuses_bad_sink_fits_before_loading(tmp_path, monkeypatch, args, message):
    from test_window import SMALL, _cli
    from tiny import tiny_folder

    import harp.jobs.prune as job

    src = tiny_folder(tmp_path / "gemma2", "gemma2", max_position_embeddings=512)

    def never(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(job, "load_on_device", never)
    r = _cli("prune", "--model", src, "--out", tmp_path / "x", "--layers", "2", *args, *SMALL)
    assert r.exit_code != 0 and message in str(r.exception), r.exception
    assert not (tmp_path / "x").exists()


def test_fitted_sink_methods_in_the_selector_and_compare(tmp_path, monkeypatch):
    """`window-256-fit` (harp compare, the Selector): the top k layers become window layers whose fitted sinks are
    fitted on the calibration stream's own windows of 2 x 256 tokens (at least 1,024); `applied` gives the model
    `harp.prune` gives with the same fit and restores it exactly; asked for by name only ('all' leaves it out)."""
    from harp.methods.registry import parse_methods
    from harp.methods.selector import Selector, applied
    from harp.methods.sinks import sink_fit_windows

    model = tiny_model("llama", max_position_embeddings=1024)
    stream = torch.randint(1, 128, (6000,))
    calib = stream[:64].view(2, 32)
    plan = Selector(model, calib, calib_ids=stream, seed=3).select("window-256-fit", 2)
    assert (plan.kind, plan.layers, plan.window, plan.sinks) == ("window", [5, 4], 256, 0)
    assert sorted(plan.fitted_sinks) == [4, 5] and "window 256+fit on layers 5,4" in plan.describe()
    assert plan.info["sink_fit"]["tokens"] == 4 * 1024 and plan.to_dict()["fitted_sinks"] == [4, 5]
    ids = torch.randint(1, 128, (1, 600))
    with torch.no_grad():
        before = model(ids).logits
        with applied(model, plan):
            pruned = model(ids).logits
        after = model(ids).logits
    assert torch.equal(before, after) and not torch.allclose(pruned, before)
    ref = tiny_model("llama", max_position_embeddings=1024)
    fit = harp.fit_sinks(ref, sink_fit_windows(stream, 256, 1024, 3), {5: 256, 4: 256})
    harp.prune(ref, [], [], windows={5: 256, 4: 256}, sinks=0, fitted_sinks=fit.fitted)
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, pruned, atol=1e-5)
    with pytest.raises(ValueError, match="window-1024-fit` fits its sinks on calibration text"):
        Selector(model, calib).select("window-1024-fit", 2)
    assert "window-256-fit" not in parse_methods("all")

    # harp compare: refused before loading when the context leaves the fit no room past window + 4 sinks
    from harp.jobs import compare as compare_job
    from harp.jobs.compare import CompareSettings, check_compare

    monkeypatch.setattr(compare_job, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    folder = tiny_folder(tmp_path / "tiny", max_position_embeddings=512)
    s = CompareSettings(model=str(folder), ks=[2], methods="harp-ls,window-1024-fit", out=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="`methods`: window-1024-fit fits the sinks past window \\+ 4 tokens, but a "
                                         "window of 1024 leaves no room in this model's 512-token context: drop it"):
        check_compare(s)


def test_compare_runs_a_fitted_sink_method_end_to_end(tmp_path):
    """`harp compare --methods harp-ls,window-256-fit`: the fitted-sink row holds its window, no sink tokens, what the
    sinks were fitted on, and its KV saving at the model's maximum (the window's w - 1 tokens held)."""
    from harp.jobs.compare import CompareSettings, run_compare

    folder = tiny_folder(tmp_path / "tiny", max_position_embeddings=1024)
    s = CompareSettings(model=str(folder), ks=[2], methods="harp-ls,window-256-fit", calib_windows=2, seq_len=32,
                        eval_tokens=256, eval_seq_len=64, out=str(tmp_path / "c"), progress=False)
    rep = run_compare(s, log=lambda m: None)
    row = rep.row(2, "window-256-fit")
    assert (row["kind"], row["window"], row["sinks"]) == ("window", 256, 0)
    assert row["info"]["sinks"] == "fit" and row["info"]["sink_fit"]["tokens"] == 4 * 1024
    assert row["kv_at_max"]["saving"] == pytest.approx(2 / 6 * (1 - 255 / 1024))
    assert "| `window-256-fit` |" in (tmp_path / "c" / "compare.md").read_text()
