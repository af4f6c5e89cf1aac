"""`harp compare`'s long-context columns on a tiny random model (seconds): passkey / niah per context with
n and stderr on the same prompts for every method, the loss by position per row and its PNG, the resume
state, the checks before any weight loads, and a comparison without them left as it was."""

from __future__ import annotations

import json
import math

import pytest
from test_compare import _text
from tiny import tiny_folder
from typer.testing import CliRunner

import harp.jobs.compare
from harp.cli import get_app
from harp.engine.evaluate import evaluate
from harp.engine.longctx import retrieval_items
from harp.jobs.compare import CompareSettings, check_compare, run_compare
from harp.methods.selector import Selector
from harp.model.load import load_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmp_lc")
    story = tmp / "story.txt"
    story.write_text(" ".join(f"Line {i} of the long story is here." for i in range(600)))
    return {"model": str(tiny_folder(tmp / "tiny", max_position_embeddings=2048)),
            "calib": str(_text(tmp / "calib.txt", 1)), "eval": str(_text(tmp / "eval.txt", 2, n=4000)),
            "filler": str(story)}


def _settings(setup, out, **kw):
    base = dict(model=setup["model"], ks=[2], methods="harp,sleb", calib=setup["calib"], eval=setup["eval"],
                calib_windows=2, seq_len=32, eval_tokens=256, eval_seq_len=64, grid="0:1:0.5", out=str(out),
                progress=False, batch_size=2, eval_batch_size=2)
    base.update(kw)
    return CompareSettings(**base)


def test_long_context_columns_on_the_same_prompts_for_every_method_and_resume(setup, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    s = _settings(setup, out, tasks="passkey,niah", context="300,400", limit=3, filler=setup["filler"],
                  eval_tokens=1100, eval_seq_len=1100)
    calls = []

    def recording(*a, **k):
        res = evaluate(*a, **k)
        calls.append((k["items"], {name: sc.source for name, sc in res.scores.items()}))
        return res

    real_select = Selector.select

    def failing(self, method, k):
        if method == "sleb":
            raise KeyboardInterrupt
        return real_select(self, method, k)

    monkeypatch.setattr(Selector, "select", failing)
    with pytest.raises(KeyboardInterrupt):
        run_compare(s, log=lambda m: None, evaluator=recording)
    columns = ["passkey@300", "passkey@400", "niah@300", "niah@400"]
    state = json.loads((tmp_path / ".cmp.compare-state.json").read_text())
    assert set(state["rows"]) == {"0:original", "2:harp"}
    for row in state["rows"].values():  # the resume state carries the new columns
        assert list(row["scores"]) == ["wikitext", *columns]
        assert set(row["retrieval"]) == set(columns) and row["loss_by_position"]["seq_len"] == 1100

    monkeypatch.setattr(Selector, "select", real_select)
    rep = run_compare(s, log=lambda m: None, evaluator=recording)
    assert len(calls) == 3  # original and harp before the interruption, then only sleb
    # the prompts are generated once per run and given to every row; the rerun makes the very same ones
    assert calls[0][0] is calls[1][0] and calls[2][0] == calls[0][0]
    assert all(src == "given items (" + name.replace("@", ", ") + " tokens)"
               for _, sources in calls for name, src in sources.items() if "@" in name)
    _, tok = load_model(setup["model"])
    for c in (300, 400):
        items = calls[0][0][f"niah@{c}"]
        assert items == retrieval_items("niah", tok, c, 3, seed=0, filler=setup["filler"])
        # the haystack is the --filler text (the tiny tokenizer decodes with spaces between its pieces)
        assert all(len(it.ids) == c and "l ong st or y" in tok.decode(list(it.ids)) for it in items)

    assert [t["name"] for t in rep.tasks] == ["wikitext", *columns]
    assert [(r["k"], r["method"]) for r in rep.rows] == [(0, "original"), (2, "harp"), (2, "sleb")]
    for r in rep.rows:
        for col in columns:
            sc, ret = r["scores"][col], r["retrieval"][col]
            assert sc["samples"] == ret["n"] == 3 and sc["value"] == ret["acc"] == ret["correct"] / 3
            assert sc["stderr"] == pytest.approx(math.sqrt(sc["value"] * (1 - sc["value"]) / 3))
        lbp = r["loss_by_position"]
        assert [b["bucket"] for b in lbp["buckets"]] == ["0-512", "512-1k", "1k-2k"]
        assert lbp["ppl"] == pytest.approx(r["scores"]["wikitext"]["value"])
        assert len(lbp["curve_points"]["position"]) == len(lbp["curve_points"]["nll"]) > 10

    data = json.loads((out / "compare.json").read_text())
    lc = data["long_context"]
    assert lc["contexts"] == [300, 400] and lc["n"] == {"passkey": 3, "niah": 3}
    assert set(lc["items"]) == set(columns) and all(v["n"] == 3 for v in lc["items"].values())
    assert lc["position_plots"] == ["loss_by_position_k2.png"]
    assert data["settings"]["context"] == [300, 400] and data["settings"]["filler"] == setup["filler"]
    assert (out / "loss_by_position_k2.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "compare.md").read_text()
    assert "| passkey@300 (n=3) ↑ | passkey@400 (n=3) ↑ | niah@300 (n=3) ↑ | niah@400 (n=3) ↑ |" in md
    assert "Loss by position at k = 2" in md and "| method | ppl | 0-512 | 512-1k | 1k-2k |" in md
    assert "Long context: passkey, niah at 300, 400 tokens" in md and "lm-evaluation-harness" not in md
    sleb = rep.row(2, "sleb")
    assert f"| `sleb` | whole layers {','.join(map(str, sorted(sleb['layers'])))} |" in md
    niah = sleb["scores"]["niah@400"]
    assert f"{niah['value']:.3f} ±{niah['stderr']:.3f}" in md
    assert not (tmp_path / ".cmp.compare-state.json").exists()


def test_a_comparison_without_them_keeps_its_keys(setup, tmp_path):
    rep = run_compare(_settings(setup, tmp_path / "plain", methods="no-rescale"), log=lambda m: None)
    d = rep.to_dict()
    assert set(d) == {"settings", "model", "num_layers", "params_before", "kv_bytes_before", "tasks", "rows",
                      "data", "seconds", "auto_k", "host", "out"}
    assert "context" not in d["settings"] and "filler" not in d["settings"]
    assert d["tasks"] == [{"name": "wikitext", "title": "WikiText-2 ppl", "kind": "perplexity"}]
    assert not {"retrieval", "loss_by_position"} & set(d["rows"][1])
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["compare.json", "compare.md", "compare.png"]
    assert "Loss by position" not in (tmp_path / "plain" / "compare.md").read_text()


def test_bad_long_context_input_is_refused_before_loading(setup, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr(harp.jobs.compare, "load_model", no_load)
    base = ["compare", "--model", setup["model"], "--calib", setup["calib"], "--eval", setup["eval"],
            "--layers", "2", "--out", str(tmp_path / "c")]

    def refused(*extra: str) -> str:
        r = CliRunner().invoke(get_app(), base + list(extra))
        assert r.exit_code != 0 and not isinstance(r.exception, AssertionError), r.output
        return str(r.exception)

    assert "--context 4096 is longer than the model's maximum 2048 tokens" in refused(
        "--tasks", "wikitext,passkey,niah", "--context", "1024,4096")
    assert "--eval-seq-len 4096 is longer than the model's maximum 2048 tokens" in refused(
        "--eval-seq-len", "4096", "--eval-tokens", "4096")
    assert "Bad --context" in refused("--tasks", "passkey", "--context", "lots")
    msg = refused("--tasks", "niah", "--filler", str(tmp_path / "missing.txt"))
    assert "--filler" in msg and "no such file" in msg
    assert "--context applies only to the long-context tasks" in refused("--context", "1024")
    # the library names its parameters
    with pytest.raises(ValueError, match=r"`context=8192` is longer than the model's maximum 2048 tokens"):
        check_compare(_settings(setup, tmp_path / "c", tasks="passkey", context=8192))


def test_compare_command_prints_the_columns(setup, tmp_path):
    out = tmp_path / "cli"
    r = CliRunner().invoke(get_app(), [
        "compare", "--model", setup["model"], "--methods", "no-rescale", "--layers", "2", "--tasks", "passkey",
        "--context", "128", "--limit", "2", "--calib", setup["calib"], "--eval", setup["eval"],
        "--calib-windows", "2", "--seq-len", "32", "--eval-tokens", "256", "--eval-seq-len", "64", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "passkey@128" in r.output and "±0.000" in r.output
    data = json.loads((out / "compare.json").read_text())
    assert [t["name"] for t in data["tasks"]] == ["wikitext", "passkey@128"]
    assert all(row["scores"]["passkey@128"]["samples"] == 2 for row in data["rows"])
    assert "position_plots" not in data["long_context"] and not (out / "loss_by_position_k2.png").exists()
