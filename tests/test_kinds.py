"""`kind=auto`: layers and their kinds (window / refit / drop) chosen under a KV budget (harp.methods.kinds)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import FAMILIES, tiny_model

import harp
from harp.engine.text import calibration_spans, calibration_windows, windows_outside
from harp.methods.kinds import KINDS, choose_kinds, kv_saving, plan_block, saving_of_bypass
from harp.model.accounting import kv_cache_bytes_expected
from harp.model.prune import temporarily_pruned
from harp.modeling import HarpBlock


def _attn(family):
    return "eager" if family.startswith("gemma") else "sdpa"


def _data(seed=0, calib=(4, 48), obj=(2, 96)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, calib, generator=g), torch.randint(0, 128, obj, generator=g)


def _direct_tail_nll(model, ids, tail):
    logits = model(ids).logits[:, tail:-1].float()
    return -torch.log_softmax(logits, -1).gather(-1, ids[:, tail + 1:, None]).mean().item()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_plan_meets_the_budget_and_its_loss_is_the_pruned_models(family):
    model = tiny_model(family, attn=_attn(family))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    calib, obj = _data()
    target = saving_of_bypass(model.config, 2, 256)
    plan = choose_kinds(model, calib, obj, target, context=256, window=6, sinks=1)
    assert plan.saving >= target - 1e-12 and set(plan.kinds.values()) <= set(KINDS)
    assert plan.saving == pytest.approx(kv_saving(model.config, plan.kinds, 6, 1, 256))
    # the model is given back exactly
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not HarpBlock.is_pruned(model)
    # the replayed objective is the loss of the model pruned with the plan (second half of each window)
    layers, alphas, maps = plan.bypassed
    with temporarily_pruned(model, layers, alphas, maps, windows=plan.window_layers, sinks=1), torch.no_grad():
        assert _direct_tail_nll(model, obj, 48) == pytest.approx(plan.loss, abs=1e-4)
    with torch.no_grad():
        assert _direct_tail_nll(model, obj, 48) == pytest.approx(plan.base_loss, abs=1e-4)
    # every step's measured loss is logged, and the last one is the plan's
    assert plan.steps and plan.steps[-1]["loss"] == plan.loss and plan.evaluations > len(plan.steps)


def test_recall_windows_join_the_objective():
    """With recall windows the objective is the text's tail loss plus the answers' mean NLL, both of the model
    pruned with the plan; a window layer narrower than the needles' distance is judged on losing them."""
    model = tiny_model("llama", attn="sdpa")
    calib, obj = _data()
    g = torch.Generator().manual_seed(5)
    probe = torch.randint(0, 128, (2, 80), generator=g)
    mask = torch.zeros(probe.shape, dtype=torch.bool)
    mask[:, 60:70] = True
    target = saving_of_bypass(model.config, 2, 256)
    plan = choose_kinds(model, calib, obj, target, context=256, window=6, sinks=0, recall=(probe, mask))

    def answers_nll() -> float:
        logits = model(probe).logits[:, :-1].float()
        nll = -torch.log_softmax(logits, -1).gather(-1, probe[:, 1:, None])[..., 0]
        return nll[mask[:, :-1]].mean().item()

    layers, alphas, maps = plan.bypassed
    with temporarily_pruned(model, layers, alphas, maps, windows=plan.window_layers, sinks=0), torch.no_grad():
        text, recall = _direct_tail_nll(model, obj, 48), answers_nll()
    assert plan.loss == pytest.approx(text + recall, abs=1e-4)
    assert plan.objective["recall_nll"] == pytest.approx(recall, abs=1e-4)
    assert plan.objective["ppl"] == pytest.approx(math.exp(text), rel=1e-4)
    with torch.no_grad():
        assert plan.base_loss == pytest.approx(_direct_tail_nll(model, obj, 48) + answers_nll(), abs=1e-4)
    assert plan.objective["recall_windows"] == 2 and plan.objective["recall_tokens"] == 20
    with pytest.raises(ValueError, match="mask must mark some positions"):
        choose_kinds(model, calib, obj, target, context=256, window=6, recall=(probe, torch.zeros_like(mask)))


def test_budget_counts_window_layers_exactly():
    """A window layer still holds w - 1 + sinks tokens: under the budget of k bypassed layers, windows alone need
    more layers than k, and the saving is the accounting's."""
    model = tiny_model("llama", attn="sdpa")
    calib, obj = _data()
    target = saving_of_bypass(model.config, 2, 256)
    assert target == pytest.approx(2 / 6)
    plan = choose_kinds(model, calib, obj, target, context=256, window=8, sinks=0, kinds=["window"])
    assert set(plan.kinds.values()) == {"window"} and len(plan.kinds) == 3  # 2 x (1 - 7/256) < 2 layers' worth
    block = plan_block(plan.kinds, 8, 0)
    full = kv_cache_bytes_expected(model.config, 256, {"layers": [], "alphas": []})
    assert plan.saving == pytest.approx(1 - kv_cache_bytes_expected(model.config, 256, block) / full)
    with pytest.raises(ValueError, match=r"save at most .* less than the 66.7 % asked"):
        choose_kinds(model, calib, obj, 4 / 6, context=256, window=8, kinds=["window"], layers=[4, 5])


def test_gemma_local_layers_are_never_windowed_wider():
    model = tiny_model("gemma2", attn="eager")  # sliding_window 8: even layers are local
    calib, obj = _data()
    plan = choose_kinds(model, calib, obj, 0.5, context=256, window=16, sinks=0)
    singles = {(s["layer"], s["kind"]) for s in plan.singles}
    local = [i for i, t in enumerate(model.config.layer_types) if t == "sliding_attention"]
    assert local and all((i, "window") not in singles for i in local)
    assert all((i, "refit") in singles for i in local)
    with pytest.raises(ValueError, match="No candidate layer can become a window layer"):
        choose_kinds(model, calib, obj, 0.1, context=256, window=16, kinds=["window"], layers=local)


def test_bad_settings_refused():
    model = tiny_model("llama", attn="sdpa")
    calib, obj = _data()
    with pytest.raises(ValueError, match="Unknown layer kind"):
        choose_kinds(model, calib, obj, 0.2, context=256, window=8, kinds=["window", "prune"])
    with pytest.raises(ValueError, match="a fraction of the KV cache"):
        choose_kinds(model, calib, obj, 1.5, context=256, window=8)
    with pytest.raises(ValueError, match="already HARP-pruned"):
        choose_kinds(harp.prune(tiny_model("llama"), [5], [1.0]), calib, obj, 0.2, context=256, window=8)


def test_objective_windows_avoid_the_calibration_windows():
    ids = torch.arange(20000)
    spans = calibration_spans(ids, 8, 64, seed=3)
    assert torch.equal(torch.stack([ids[a:b] for a, b in spans]), calibration_windows(ids, 8, 64, 3))
    held = windows_outside(ids, 3, 1000, spans, bos=-1)
    assert held.shape == (3, 1000) and (held[:, 0] == -1).all()
    used = {int(t) for a, b in spans for t in ids[a:b]}
    assert not used & {int(t) for t in held[:, 1:].flatten()}
    assert all(torch.equal(r[1:], torch.arange(int(r[1]), int(r[1]) + 999)) for r in held)  # contiguous text
    with pytest.raises(ValueError, match=r"room for only \d+ objective windows of 6000 tokens .* but 3"):
        windows_outside(ids, 3, 6000, spans, what="objective")


# ------------------------------------------------------------------------------------------------
# harp prune --kind auto
# ------------------------------------------------------------------------------------------------


def _cli(*args):
    from typer.testing import CliRunner

    from harp.cli import get_app

    return CliRunner().invoke(get_app(), [str(a) for a in args], env={"COLUMNS": "300"})


SMALL = ["--calib-windows", "2", "--seq-len", "32", "--eval-tokens", "256", "--eval-seq-len", "128"]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from tiny import tiny_folder

    return tiny_folder(tmp_path_factory.mktemp("k") / "tiny-llama", "llama", max_position_embeddings=512)


@pytest.mark.parametrize("sinks", ["2", "fit"])
def test_prune_kind_auto_end_to_end(llama_folder, tmp_path, sinks):
    """With `--sinks fit` the chosen window layers get fitted sinks (chosen with the 4 sink tokens the fit stands
    in for)."""
    out = tmp_path / "auto"
    r = _cli("prune", "--model", llama_folder, "--out", out, "--kind", "auto", "--layers", "2", "--window", "32",
             "--sinks", sinks, *SMALL, "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "kinds (top first; --kind auto)" in flat and "perplexity: --kind auto (the saved model)" in flat
    summary = json.loads((tmp_path / "s.json").read_text())
    kinds = {int(i): k for i, k in summary["kinds"].items()}
    assert summary["method"] == "mixed" and summary["window"] == 32 and set(kinds.values()) <= set(KINDS)
    assert set(summary["ppl"]) == {"original", "mixed", "harp-ls"}  # harp-ls: the top 2 refit, same budget
    # the budget is the KV saving of the top 2 bypassed layers at the model's maximum (512 tokens)
    assert summary["selection"]["target_saving"] == pytest.approx(2 / 6)
    assert summary["kv_at_contexts"][-1]["saving"] >= 2 / 6 - 1e-9
    # the wall-time row counts the kind choice (the slow part of --kind auto), not "search 0 s" alone
    assert summary["seconds"]["select"] > 0 and f"select {summary['seconds']['select']:.0f} s" in flat
    # the checkpoint holds exactly the chosen kinds and reloads to the measured model
    block = HarpBlock.from_config(json.loads((out / "config.json").read_text()))
    assert block.windows_plan == {i: 32 for i, k in kinds.items() if k == "window"}
    assert block.fitted_sinks == (tuple(sorted(block.windows_plan)) if sinks == "fit" else ())
    assert set(summary["sink_fit"].get("share", {})) == {str(i) for i in block.fitted_sinks}
    assert block.plan == {i: (0.0 if k == "drop" else 1.0) for i, k in kinds.items() if k != "window"}
    recipe = json.loads((out / "harp_recipe.json").read_text())
    assert recipe["method"] == "mixed" and recipe["kinds"] == summary["kinds"]
    assert recipe["sinks"] == (2 if sinks == "2" else "fit")
    assert recipe["selection"]["sinks"] == (2 if sinks == "2" else 4)  # what the window layers were judged with
    assert recipe["selection"]["steps"] and recipe["selection"]["objective"]["seq_len"] == 512
    from transformers import AutoTokenizer

    from harp.engine.perplexity import perplexity
    from harp.engine.text import evaluation_windows, load_text, tokenize

    loaded, tok = harp.load(out), AutoTokenizer.from_pretrained(out)
    ids = evaluation_windows(tokenize(tok, load_text("wikitext2-raw-test")), 128, 256)
    assert perplexity(loaded, ids).ppl == pytest.approx(summary["ppl"]["mixed"], rel=1e-4)


def test_prune_kind_auto_with_recall_windows(llama_folder, tmp_path):
    """--recall-windows: the recipe records the answers' NLL beside the text's perplexity, the summary shows
    both; recall windows too short for needles past the window are refused naming the settings."""
    r = _cli("prune", "--model", llama_folder, "--out", tmp_path / "auto", "--kind", "auto", "--layers", "2",
             "--window", "32", "--recall-windows", "1", "--no-reference", *SMALL, "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    objective = json.loads((tmp_path / "s.json").read_text())["selection"]["objective"]
    assert objective["recall_windows"] == 1 and objective["recall_seq_len"] == 512 and objective["recall_tokens"] > 0
    assert objective["recall_base_nll"] > 0 and "recall NLL" in " ".join(r.output.split())
    r = _cli("prune", "--model", llama_folder, "--out", tmp_path / "short", "--kind", "auto", "--layers", "2",
             "--window", "400", "--recall-windows", "1", *SMALL)
    assert r.exit_code != 0 and "--recall-windows 1: Recall windows of 512 tokens leave no room" in str(r.exception)
    assert "Here the windows are 512 tokens" in str(r.exception) and "give a smaller --window" in str(r.exception)


@pytest.mark.parametrize("args, message", [
    (["--kind", "auto", "--layer-ids", "4,5"], "--kind auto chooses the layers: state the KV budget"),
    (["--kind", "auto", "--alphas", "1,1"], "--alphas does not apply"),
    (["--kind", "auto", "--fit", "none"], "--fit none does not apply"),
    (["--kind", "auto", "--select", "attention-drop"], "drop --select attention-drop"),
    (["--kind", "auto", "--kv-saving", "abc"], "--kv-saving 'abc': give a fraction"),
    (["--kind", "auto", "--kv-saving", "140%"], "at most 100 %"),
    (["--kind", "auto", "--context", "4096"], "--context 4096 is longer than the model's maximum context (512"),
    (["--kind", "sometimes"], "Unknown --kind 'sometimes'"),
    (["--kv-saving", "25%"], "--kv-saving applies to --kind auto"),
    (["--kind", "window"], "--kind window needs the window size: add --window"),
    (["--kind", "bypass", "--window", "8"], "--kind bypass bypasses the chosen layers"),
    (["--recall-windows", "2"], "--recall-windows applies to --kind auto"),
    (["--kind", "auto", "--recall-windows", "-1"], "--recall-windows -1: a whole number of windows"),
])
def test_prune_kind_bad_input_refused_before_loading(llama_folder, tmp_path, monkeypatch, args, message):
    import harp.jobs.prune as job

    monkeypatch.setattr(job, "load_on_device", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    r = _cli("prune", "--model", llama_folder, "--out", tmp_path / "x", "--layers", "2", *args, *SMALL)
    assert r.exit_code != 0 and message in str(r.exception), r.exception
    assert not (tmp_path / "x").exists()
