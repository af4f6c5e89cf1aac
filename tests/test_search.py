"""The alpha search: cached == naive, perplexity protocol, resume, determinism, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import FAMILIES, tiny_model

import harp
from harp.engine.perplexity import perplexity
from harp.engine.text import calibration_windows, evaluation_windows
from harp.methods.search import DEFAULT_GRID, ideal_layer_forwards, parse_grid, search_alphas


def _windows(n=6, s=16, seed=1):
    return torch.randint(0, 128, (n, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_search_equals_naive_search(family):
    model = tiny_model(family)
    w = _windows()
    cached = search_alphas(model, w, 3, grid="0:1:0.25", batch_size=4)
    naive = search_alphas(model, w, 3, grid="0:1:0.25", batch_size=4, method="naive")
    assert cached.alphas == naive.alphas
    assert [(e["layer"], e["alpha"]) for e in cached.log] == [(e["layer"], e["alpha"]) for e in naive.log]
    for a, b in zip(cached.log, naive.log, strict=True):
        assert math.isclose(a["ppl"], b["ppl"], rel_tol=1e-9)
    # the cached search really does less work
    assert cached.layer_forwards < naive.layer_forwards
    assert cached.layer_forwards == ideal_layer_forwards(6, 3, 5)
    assert naive.layer_forwards == ideal_layer_forwards(6, 3, 5, "naive")


def test_search_leaves_model_unchanged_and_result_reproduces():
    model = tiny_model("llama")
    w = _windows()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = search_alphas(model, w, [5, 2], grid=[0.0, 0.5, 1.0])
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert res.layers == [5, 2]
    # pruning with the result reproduces the last logged perplexity exactly
    harp.prune(model, res.layers, res.alphas)
    assert math.isclose(perplexity(model, w).ppl, res.final_ppl, rel_tol=1e-9)


def test_search_is_greedy_top_down_over_the_grid():
    model = tiny_model("qwen2")
    res = search_alphas(model, _windows(), 2, grid="0,0.5,1")
    assert [e["layer"] for e in res.log] == [5, 5, 5, 4, 4, 4]
    assert [e["alpha"] for e in res.log] == [0.0, 0.5, 1.0] * 2
    for layer, alpha in zip(res.layers, res.alphas, strict=True):
        entries = [e for e in res.log if e["layer"] == layer]
        assert alpha == min(entries, key=lambda e: (e["ppl"], e["alpha"]))["alpha"]


def test_perplexity_matches_reference_computation():
    model = tiny_model("gemma2")  # with final logit soft-capping
    w = _windows(5, 12)
    with torch.no_grad():
        logits = model(w).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
    r = perplexity(model, w, batch_size=2, chunk_tokens=7)  # chunks that straddle windows
    assert r.tokens == 5 * 11 and r.windows == 5
    assert math.isclose(r.ppl, math.exp(float(nll)), rel_tol=1e-5)


def test_resume_after_injected_failure(tmp_path):
    model = tiny_model("mistral")
    w = _windows()
    full = search_alphas(model, w, 4, grid="0:1:0.5")
    state = tmp_path / "state.json"

    class Boom(Exception):
        pass

    def fail_after_two(layer, alpha, log):
        if len(json.loads(state.read_text())["done"]) == 2:
            raise Boom

    with pytest.raises(Boom):
        search_alphas(model, w, 4, grid="0:1:0.5", state_path=state, callback=fail_after_two)
    resumed = search_alphas(model, w, 4, grid="0:1:0.5", state_path=state)
    assert resumed.resumed_layers == 2
    assert resumed.alphas == full.alphas
    assert resumed.log == full.log


def test_resume_after_kill_9(tmp_path):
    """A search killed with SIGKILL mid-way continues from its state file to the same answer."""
    state = tmp_path / "state.json"
    code = textwrap.dedent(
        f"""
        import os, signal, sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from tiny import tiny_model
        from harp.methods.search import search_alphas
        torch.set_num_threads(1)
        w = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
        def die(layer, alpha, log):
            if layer == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        search_alphas(tiny_model("llama"), w, 4, grid="0:1:0.5", state_path={str(state)!r}, callback=die)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert len(json.loads(state.read_text())["done"]) == 3
    model = tiny_model("llama")
    w = _windows()
    resumed = search_alphas(model, w, 4, grid="0:1:0.5", state_path=state)
    full = search_alphas(model, w, 4, grid="0:1:0.5")
    assert resumed.resumed_layers == 3
    assert resumed.alphas == full.alphas and resumed.log == full.log


def test_state_of_a_different_search_is_refused(tmp_path):
    model = tiny_model("llama")
    state = tmp_path / "state.json"
    search_alphas(model, _windows(), 2, grid="0,1", state_path=state)
    with pytest.raises(ValueError, match="different search"):
        search_alphas(model, _windows(seed=2), 2, grid="0,1", state_path=state)


def test_same_seed_same_windows_same_result():
    ids = torch.arange(5000) % 97
    a = calibration_windows(ids, 8, 64, seed=3)
    b = calibration_windows(ids, 8, 64, seed=3)
    c = calibration_windows(ids, 8, 64, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    model = tiny_model("llama")
    r1 = search_alphas(model, a[:, :16] % 128, 2, grid="0:1:0.5")
    r2 = search_alphas(model, b[:, :16] % 128, 2, grid="0:1:0.5")
    assert r1.alphas == r2.alphas and r1.log == r2.log


@pytest.mark.parametrize("k", [0, -1, 7])
def test_bad_k(k):
    with pytest.raises(ValueError, match="between 1 and the model's 6 layers"):
        search_alphas(tiny_model("llama"), _windows(), k)


def test_bad_inputs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        search_alphas(model, _windows(), [6, 2])
    with pytest.raises(ValueError, match="Unknown search method"):
        search_alphas(model, _windows(), 2, method="fast")
    with pytest.raises(ValueError, match="Bad grid"):
        parse_grid("0:1:0")
    with pytest.raises(ValueError, match="Bad grid"):
        parse_grid("a,b")
    with pytest.raises(ValueError, match="already HARP-pruned"):
        search_alphas(harp.prune(tiny_model("llama"), [5], [0.5]), _windows(), 2)


def test_grid_parsing():
    assert parse_grid(None) == list(DEFAULT_GRID) == [round(0.1 * i, 1) for i in range(11)]
    assert parse_grid("0:1:0.1") == list(DEFAULT_GRID)
    assert parse_grid("1,0.5,0.5") == [0.5, 1.0]


def test_window_errors():
    ids = torch.arange(100)
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(ids, 1, 128)
    with pytest.raises(ValueError, match="only 3 windows"):
        calibration_windows(ids, 4, 32)
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluation_windows(ids, 128)
    assert evaluation_windows(ids, 32).shape == (3, 32)
    assert evaluation_windows(ids, 32, max_tokens=64).shape == (2, 32)


def test_damaged_state_file_is_an_error_not_a_silent_restart(tmp_path):
    """The library says a state file is damaged (the CLI's preflight says so too) instead of ignoring it."""
    model = tiny_model("llama")
    state = tmp_path / "state.json"
    state.write_text('{"version": 1, "finger')
    with pytest.raises(ValueError, match="is damaged: it is not JSON. Delete it"):
        search_alphas(model, torch.randint(0, 128, (2, 16)), 2, grid=[0.0, 1.0], state_path=state)
    assert state.exists()  # never deleted for the user
