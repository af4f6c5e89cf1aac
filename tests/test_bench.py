"""`harp bench` and harp.bench on tiny models: structure of the results and outputs, never timings."""

from __future__ import annotations

import collections
import copy
import json
import sys
import time

import pytest
import torch
import transformers
from tiny import tiny_folder, tiny_model, tiny_tokenizer
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

import harp
import harp.cli
from harp import bench
from harp.model import accounting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pair():
    orig = tiny_model("llama", attn="sdpa")
    pruned = copy.deepcopy(orig)
    harp.prune(pruned, layers=[5, 4], alphas=[0.5, 0.0])
    return orig, pruned


@pytest.fixture(scope="module")
def saved(tmp_path_factory, pair):
    root = tmp_path_factory.mktemp("bench_models")
    orig, pruned = pair
    harp.save(orig, root / "orig")
    harp.save(pruned, root / "pruned")
    return root / "orig", root / "pruned"


def test_run_bench_structure(pair):
    orig, pruned = pair
    threads = torch.get_num_threads()
    r = bench.run_bench(orig, pruned, [16, 8], new_tokens=3, repeats=2, warmup=1, threads=1)
    assert torch.get_num_threads() == threads  # restored
    assert r["environment"]["torch_threads"] == 1
    assert r["settings"]["timing"] == "lockstep"
    assert r["settings"]["contexts"] == [8, 16]
    assert r["models"]["pruned"]["harp_layers"] == [4, 5]
    assert r["models"]["pruned"]["parameters"] < r["models"]["original"]["parameters"]
    bounds = accounting.speedup_bounds(orig.config, [8, 16], pruned.config.harp)
    for row, b in zip(r["contexts"], bounds, strict=True):
        pre = row["prefill"]
        assert len(pre["original"]["runs_ms"]) == len(pre["pruned"]["runs_ms"]) == len(pre["ratio"]["pairs"]) == 2
        pairs = [q / o for o, q in zip(pre["original"]["runs_ms"], pre["pruned"]["runs_ms"], strict=True)]
        assert pre["ratio"]["pairs"] == pytest.approx(pairs)
        assert pre["ratio"]["min"] <= pre["ratio"]["median"] <= pre["ratio"]["max"]
        assert pre["speedup"] == pytest.approx(1 / pre["ratio"]["median"])
        assert pre["bound"] == pytest.approx(b["prefill_bound"])
        assert pre["fraction_of_ideal_saving"] == pytest.approx((1 - pre["ratio"]["median"]) / b["ideal_saving"])
        kv = row["kv_cache_bytes"]
        # 2 of 6 layers pruned: exactly a third of the KV cache goes, and the cache says so
        assert kv["original"] == kv["expected_original"] > 0
        assert kv["pruned"] == kv["expected_pruned"] == kv["original"] * 4 // 6
        dec = row["decode"]
        assert dec["new_tokens"] == 3 and len(dec["original"]["runs_tokens_per_s"]) == 2
        assert dec["bytes_bound"] == pytest.approx(b["decode_bytes_bound"])
    assert r["memory"]["process_peak_rss_bytes"] > 0
    json.dumps(r)  # serialisable as is


def _hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def test_lockstep_prefill_computes_what_a_plain_forward_does(pair):
    """Taking turns in two threads changes nothing the models compute, every switch point is one
    attention or MLP sub-layer, and the hooks are gone afterwards."""
    orig, pruned = pair
    assert len(bench.switch_points(orig)) == len(bench.switch_points(pruned)) == 2 * 6
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    hooks = _hook_count(orig), _hook_count(pruned)
    kw = bench.cache_kwarg(orig)
    for first in (0, 1):
        got = bench.lockstep_prefill((orig, pruned), ids, (kw, kw), first)
        for (seconds, cache, token), model in zip(got, (orig, pruned), strict=True):
            with torch.inference_mode():
                ref_cache = transformers.DynamicCache(config=model.config)
                ref = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: ref_cache}).logits
            assert seconds > 0
            assert torch.equal(token, ref[:, -1:].argmax(-1))
            assert harp.kv_cache_bytes(cache) == harp.kv_cache_bytes(ref_cache)
    assert (_hook_count(orig), _hook_count(pruned)) == hooks


def test_lockstep_charges_each_model_only_its_own_segments(pair):
    """A 30 ms sleep in each of the pruned model's MLPs lands in the pruned model's time, not the
    original's, although the two run interleaved (margins of 10x: no timing assertion)."""
    orig, pruned = pair
    handles = [layer.mlp.register_forward_hook(lambda *a: time.sleep(0.03)) for layer in pruned.model.layers]
    kw = bench.cache_kwarg(orig)
    try:
        ids = torch.randint(0, 128, (1, 8))
        (t_orig, *_), (t_pruned, *_) = bench.lockstep_prefill((orig, pruned), ids, (kw, kw), 0)
    finally:
        for h in handles:
            h.remove()
    assert t_pruned >= 6 * 0.03
    assert t_orig < 0.1 * t_pruned


def test_lockstep_error_in_one_model_is_raised_not_deadlocked(pair):
    orig, pruned = pair

    def boom(*_):
        raise RuntimeError("boom in layer 2")

    hooks = _hook_count(orig), _hook_count(pruned)
    handle = pruned.model.layers[2].mlp.register_forward_pre_hook(boom)
    kw = bench.cache_kwarg(orig)
    try:
        with pytest.raises(RuntimeError, match="boom in layer 2"):
            bench.lockstep_prefill((orig, pruned), torch.randint(0, 128, (1, 8)), (kw, kw), 1)
    finally:
        handle.remove()
    assert (_hook_count(orig), _hook_count(pruned)) == hooks


def test_forward_timing_and_min_seconds(pair):
    orig, pruned = pair
    r = bench.run_bench(orig, pruned, [8], new_tokens=1, repeats=1, warmup=0, timing="forward", min_seconds=0.3)
    assert r["settings"]["timing"] == "forward"
    row = r["contexts"][0]
    assert len(row["prefill"]["ratio"]["pairs"]) > 1  # rounds added until 0.3 s of measuring
    assert "cpu_time" in row["prefill"] and "cpu_time" in row["decode"]
    assert "CPU time" in bench.bench_table(r)
    lo, hi = row["prefill"]["speedup_ci95"]
    assert lo <= row["prefill"]["speedup"] <= hi
    with pytest.raises(ValueError, match="timing must be one of"):
        bench.run_bench(orig, pruned, [8], timing="fast")


def test_median_ci95():
    assert bench.median_ci95([2.0]) == (2.0, 2.0)
    lo, hi = bench.median_ci95([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02])
    assert 0.9 <= lo <= 1.0 <= hi <= 1.1
    assert bench.median_ci95([1.0, 2.0, 3.0], seed=3) == bench.median_ci95([1.0, 2.0, 3.0], seed=3)


def _first_prompt_tokens(model) -> list[int]:
    """Records the first token of every multi-token input (the prefills) `model` embeds."""
    seen: list[int] = []

    def pre(_module, args):
        if args[0].shape[-1] > 1:
            seen.append(int(args[0][0, 0]))

    model.model.embed_tokens.register_forward_pre_hook(pre)
    return seen


def test_prompt_starts_with_bos_where_the_tokenizer_adds_one(pair, tmp_path):
    plain = bench.prompt_tokens(128, 16, seed=3)
    with_bos = bench.prompt_tokens(128, 16, seed=3, bos=1)
    assert int(with_bos[0, 0]) == 1 and torch.equal(with_bos[:, 1:], plain[:, 1:])
    # loaded models: the tokenizer passed decides
    orig, pruned = (copy.deepcopy(m) for m in pair)
    seen = _first_prompt_tokens(orig), _first_prompt_tokens(pruned)
    for tok, first in ((tiny_tokenizer(bos=True), 1), (tiny_tokenizer(bos=False), int(plain[0, 0]))):
        r = bench.run_bench(orig, pruned, [16], new_tokens=1, repeats=1, warmup=0, seed=3, tokenizer=tok)
        assert seen[0] == seen[1] == [first] and ("BOS" in r["settings"]["tokens"]) == (first == 1)
        for s in seen:
            s.clear()
    # sources: the tokenizer saved with the model decides, the memory probe uses the same prompt
    src = tiny_folder(tmp_path / "bos", "llama", bos=True)
    model, tok = harp.load_model(str(src))
    harp.prune(model, layers=[5], alphas=[0.5])
    harp.save(model, tmp_path / "pruned", tokenizer=tok)
    r = bench.run_bench(str(src), str(tmp_path / "pruned"), [8], new_tokens=0, repeats=1, warmup=0)
    assert "the tokenizer's BOS (1)" in r["settings"]["tokens"]


def test_bench_table_and_plot(pair, tmp_path):
    orig, pruned = pair
    r = bench.run_bench(orig, pruned, [4, 8], new_tokens=2, repeats=1, warmup=0)
    table = bench.bench_table(r)
    assert table.count("\n| 4 |") == 2 and "FLOP bound" in table and "tok/s" in table
    written = bench.write_bench(r, tmp_path / "out")
    assert json.loads(written["json"].read_text())["contexts"][1]["context"] == 8
    assert written["png"].read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(FileExistsError, match="`overwrite=True`"):  # the CLI says --overwrite
        bench.write_bench(r, tmp_path / "out")
    bench.write_bench(r, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.json", "bench.md", "bench.png"]


def test_cli_bench_writes_json_and_png(saved, tmp_path):
    orig_dir, pruned_dir = saved
    out = tmp_path / "bench"
    args = [
        "bench",
        "--model",
        str(orig_dir),
        "--pruned",
        str(pruned_dir),
        "--context",
        "16,8",
        "--new-tokens",
        "2",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--no-isolated-memory",
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(harp.cli.get_app(), args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    data = json.loads((out / "bench.json").read_text())
    assert [row["context"] for row in data["contexts"]] == [8, 16]
    assert data["command"].startswith("harp bench --model")
    for row in data["contexts"]:
        assert row["kv_cache_bytes"]["reduction"] == pytest.approx(2 / 6)
        assert row["decode"]["original"]["median_tokens_per_s"] > 0
    assert data["memory"]["process_peak_rss_bytes"] > 0
    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC
    # a second run refuses to clobber, before measuring anything
    res = CliRunner().invoke(harp.cli.get_app(), args)
    assert isinstance(res.exception, FileExistsError)


def test_probe_memory_in_fresh_process(saved):
    """Per-model peak RSS comes from a fresh process that loads only that model."""
    _, pruned_dir = saved
    probe = bench.probe_memory(pruned_dir, [4, 8], 2, threads=1, timeout=300)
    assert probe["weights_bytes"] > 0
    assert probe["peak_during_load_bytes"] >= probe["rss_after_load_bytes"] > 0
    assert sorted(probe["peak_rss_bytes"]) == ["4", "8"] and min(probe["peak_rss_bytes"].values()) > 0
    if sys.platform.startswith("linux"):  # peak reset per context, so loading's peak does not mask it
        assert probe["peak_method"].startswith("VmHWM")


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while `on` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _ops_in_layer(model, idx: int) -> collections.Counter:
    """Ops run inside decoder layer `idx` during a 10-token prefill and one decode step."""
    counter = _OpCounter()
    layer = model.model.layers[idx]
    hooks = [
        layer.register_forward_pre_hook(lambda *a: setattr(counter, "on", True)),
        layer.register_forward_hook(lambda *a: setattr(counter, "on", False)),
    ]
    cache = transformers.DynamicCache(config=model.config)
    try:
        with counter, torch.inference_mode():
            model(torch.randint(0, 128, (1, 10)), cache=cache, use_cache=True)
            model(torch.randint(0, 128, (1, 1)), cache=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    return counter.ops


def test_pruned_layers_do_only_what_the_bound_counts(pair):
    """A pruned layer runs its v/o maps (alpha != 0) and its MLP, nothing else of attention: no q/k,
    no rotary (cat/neg), no repeat_kv (expand), no softmax or sdpa, no cache traffic."""
    orig, pruned = pair
    attention_ops = {"scaled_dot_product_attention", "cat", "neg", "expand", "softmax", "_softmax", "bmm", "matmul"}
    ops = _ops_in_layer(orig, 5)
    assert ops["scaled_dot_product_attention"] == 2 and ops["cat"] > 0 and ops["linear"] == 2 * 7
    linear = _ops_in_layer(pruned, 5)  # alpha 0.5: v, folded o + 3 MLP maps
    assert not attention_ops & set(linear) and linear["linear"] == 2 * 5
    removed = _ops_in_layer(pruned, 4)  # alpha 0: the 3 MLP maps only
    assert not attention_ops & set(removed) and removed["linear"] == 2 * 3
    assert _ops_in_layer(pruned, 3) == _ops_in_layer(orig, 3)  # unpruned layers untouched


@pytest.mark.slow
def test_real_model_kv_cache_falls_by_exactly_k_over_L():
    """SmolLM2-135M with its top 8 of 30 layers pruned: the cache object holds exactly 22/30 of the
    original's bytes, and the bench reports the config-derived bounds (no timing assertions)."""
    from harp.model.load import load_model

    orig, _ = load_model(None, with_tokenizer=False)
    pruned = copy.deepcopy(orig)
    harp.prune(pruned, layers=list(range(29, 21, -1)), alphas=[0.8, 0.2, 0.1, 0.1, 0.0, 0.1, 0.0, 0.0])
    r = bench.run_bench(orig, pruned, [16, 64], new_tokens=1, repeats=1, warmup=0, threads=2)
    for row in r["contexts"]:
        kv = row["kv_cache_bytes"]
        # 30 layers x (k + v) x 3 KV heads x 64 dims x n tokens x 4 bytes
        assert kv["original"] == 30 * 2 * 3 * 64 * row["context"] * 4
        assert kv["pruned"] * 30 == kv["original"] * 22
        assert row["prefill"]["bound"] > 1 and row["decode"]["bytes_bound"] > 1
    assert r["contexts"][1]["prefill"]["bound"] > r["contexts"][0]["prefill"]["bound"]
    assert r["models"]["original"]["parameters"] == accounting.parameter_count(orig.config) == 134_515_008
