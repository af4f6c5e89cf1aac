"""`harp prune` and `harp info` end to end on a tiny model folder; clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_folder
from typer.testing import CliRunner

import harp
from harp.cli import get_app
from harp.engine.perplexity import perplexity
from harp.engine.text import evaluation_windows, load_text, tokenize

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("m") / "tiny-llama", "llama", max_position_embeddings=512)


SMALL = ["--layers", "3", "--calib-windows", "4", "--seq-len", "64", "--eval-tokens", "512", "--eval-seq-len", "128",
         "--grid", "0:1:0.5"]


def _run(*args):
    return runner.invoke(get_app(), list(args), catch_exceptions=False)


def test_prune_end_to_end_then_info(folder, tmp_path):
    out = tmp_path / "pruned"
    r = _run("prune", "--model", str(folder), "--layers", "3", "--out", str(out), "--json", str(tmp_path / "s.json"),
             *SMALL)
    assert r.exit_code == 0, r.output
    assert "HARP result" in r.output and "parameters removed" in r.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["layers"] == [5, 4, 3] and len(summary["alphas"]) == 3
    assert set(summary["ppl"]) == {"original", "harp", "harp-ls", "alpha=1", "alpha=0"}
    assert summary["params_removed"] == summary["params_removed_predicted"] > 0
    assert summary["kv_reduction"] == pytest.approx(3 / 6)
    assert [r["saving"] for r in summary["kv_at_contexts"]] == pytest.approx([3 / 6] * len(summary["kv_at_contexts"]))
    # checkpoint: weights, config, search log with every candidate, tokenizer
    log = json.loads((out / "search_log.json").read_text())
    assert len(log) == 3 * 3
    model = harp.load(out)
    assert model.config.harp["layers"] == [3, 4, 5]
    tok = __import__("transformers").AutoTokenizer.from_pretrained(out)
    ev = evaluation_windows(tokenize(tok, load_text(None, "wikitext2-raw-test")), 128, 512)
    assert summary["method"] == "harp-ls"  # the default saves the refit; the paper's HARP is the reference row
    assert perplexity(model, ev).ppl == pytest.approx(summary["ppl"]["harp-ls"], rel=1e-6)
    # the search state file is gone once the checkpoint is complete
    assert not list(tmp_path.glob(".pruned.harp-search.json"))

    r = _run("info", str(out))
    assert r.exit_code == 0, r.output
    assert "pruned layers" in r.output and "5, 4, 3" in r.output
    r = _run("info", str(out), "--json")
    assert json.loads(r.output)["harp"]["layers"] == [3, 4, 5]


def test_prune_with_given_alphas_skips_search(folder, tmp_path):
    r = _run("prune", "--model", str(folder), "--layer-ids", "1,3", "--alphas", "0.5,0", "--no-reference",
             "--out", str(tmp_path / "o"), *SMALL)
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    # alphas are given top layer first: layer 3 -> 0.5, layer 1 -> 0
    assert cfg["harp"] == {"format_version": 1, "layers": [1, 3], "alphas": [0.0, 0.5]}


def test_prune_select_attention_drop_searches_the_scored_layers(folder, tmp_path):
    """--select attention-drop: He et al.'s score picks the K layers (any depth), HARP's search sets
    their alphas; the same as scoring and searching by hand on the same calibration windows."""
    from harp.engine.text import calibration_windows
    from harp.methods.scores import attention_drop_scores, pick
    from harp.methods.search import search_alphas
    from harp.model.load import load_model

    out = tmp_path / "anyd"
    r = _run("prune", "--model", str(folder), "--select", "attention-drop", "--fit", "none", "--out", str(out),
             "--json", str(tmp_path / "s.json"), *SMALL)
    assert r.exit_code == 0, r.output
    assert "chosen by --select attention-drop" in r.output
    summary = json.loads((tmp_path / "s.json").read_text())
    model, tok = load_model(str(folder))
    calib = calibration_windows(tokenize(tok, load_text(None, "wikitext2-valid")), 4, 64, 0)
    scores = attention_drop_scores(model, calib, 4)
    layers = sorted(pick(scores, 3, highest=True), reverse=True)
    assert summary["selection"]["rule"] == "attention-drop"
    assert summary["selection"]["scores"] == pytest.approx(scores)
    ref = search_alphas(model, calib, layers, grid="0:1:0.5")
    assert summary["layers"] == ref.layers == layers and summary["alphas"] == ref.alphas
    assert json.loads((out / "harp_recipe.json").read_text())["selection"]["rule"] == "attention-drop"
    assert harp.load(out).config.harp["layers"] == sorted(layers)


def _err(*args):
    r = runner.invoke(get_app(), list(args))
    assert r.exit_code != 0
    return r.exception


def test_bad_inputs_are_clear_and_write_nothing(folder, tmp_path):
    out = tmp_path / "o"
    cases = [
        (["--model", str(tmp_path / "nope")], FileNotFoundError, "not found"),
        (["--model", str(folder), "--layers", "0"], ValueError, "between 1 and"),
        (["--model", str(folder), "--layers", "7"], ValueError, "between 1 and"),
        (["--model", str(folder), "--calib", str(tmp_path / "missing.txt")], FileNotFoundError, "not found"),
        (["--model", str(folder), "--grid", "0:1:-1"], ValueError, "Bad grid"),
        (["--model", str(folder), "--alphas", "0.5"], ValueError, "gives 1 values for 3"),
        (["--model", str(folder), "--select", "best"], ValueError, "Unknown --select"),
        (["--model", str(folder), "--select", "attention-drop", "--layer-ids", "1,2"], ValueError, "--layer-ids"),
        (["--model", str(folder), "--select", "attention-drop", "--alphas", "0,0,0"], ValueError, "--alphas"),
    ]
    for extra, exc, msg in cases:
        e = _err("prune", "--out", str(out), *SMALL, *extra)  # a later --layers overrides SMALL's
        assert isinstance(e, exc) and msg in str(e), (extra, e)
        assert not out.exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    e = _err("prune", "--out", str(out), "--model", str(folder), "--calib", str(empty), *SMALL)
    assert isinstance(e, ValueError) and "empty" in str(e)
    short = tmp_path / "short.txt"
    short.write_text("just a few words of text")
    e = _err("prune", "--out", str(out), "--model", str(folder), "--calib", str(short), *SMALL)
    assert isinstance(e, ValueError) and "fewer than one window" in str(e)
    same = _err("prune", "--out", str(out), "--model", str(folder), "--calib", "wikitext2-raw-test", *SMALL)
    assert isinstance(same, ValueError) and "same" in str(same)
    assert not out.exists()
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    e = _err("prune", "--out", str(existing), "--model", str(folder), *SMALL)
    assert isinstance(e, FileExistsError) and "--overwrite" in str(e)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_cli_main_prints_one_line_errors(tmp_path, capsys, monkeypatch):
    import sys

    from harp import cli

    monkeypatch.setattr(sys, "argv", ["harp", "prune", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as ex:
        cli.main()
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_overlapping_text_warns(folder, tmp_path):
    text = load_text(None, "wikitext2-raw-test").text
    part = tmp_path / "calib.txt"
    part.write_text(text[:2500] + "\n")  # calibration text that contains the evaluation text's start
    with pytest.warns(UserWarning, match="also occur in the calibration"):
        r = runner.invoke(get_app(), ["prune", "--out", str(tmp_path / "o"), "--model", str(folder), "--calib",
                                      str(part), *SMALL, "--layers", "1"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    torch.manual_seed(0)


def test_library_errors_name_parameters_and_the_cli_shows_flags():
    """The library names its parameters (`seq_len=1`); commands/ is the one place that turns them into
    flags, for every command (harp.cli wraps each in flag_errors)."""
    from harp.commands import cli_text, flag_errors
    from harp.engine.evaluate import parse_limit

    assert cli_text("`seq_len=1`: too short; pass `overwrite=True` or `overwrite`, not `k=99`") == (
        "--seq-len 1: too short; pass --overwrite or --overwrite, not --layers 99")
    assert cli_text("run `harp eval DIR` or set `trust_remote_code=True`") == (
        "run `harp eval DIR` or set `trust_remote_code=True`")  # not a flag of harp's: left as it is
    with pytest.raises(ValueError, match="`limit` must be at least 1"):
        parse_limit("0")
    with pytest.raises(ValueError, match="^--limit must be at least 1"), flag_errors():
        parse_limit("0")


def test_library_warnings_are_printed_with_flags():
    """A warning raised inside a command (the refit's "too few calibration tokens") names the flag."""
    import warnings

    from harp.commands import flag_errors

    with pytest.warns(UserWarning, match=r"^too few tokens: more or longer --calib-windows\.$"):
        with flag_errors():
            warnings.warn("too few tokens: more or longer `calib_windows`.", UserWarning, stacklevel=1)
    with pytest.warns(UserWarning, match="`calib_windows`"):  # outside a command: the parameter
        warnings.warn("more or longer `calib_windows`.", UserWarning, stacklevel=1)


def test_cli_text_renders_the_new_parameter_names():
    from harp.commands import cli_text

    assert cli_text("`layers=9,10`: out of range; `plot=False`; `contexts=256`; `fmt=gguf`; `ks=3`") == (
        "--layer-ids 9,10: out of range; --no-plot; --context 256; --format gguf; --layers 3")


def test_library_errors_name_no_flag_of_harp():
    """No error a library module raises (or collects as a problem, or warns) spells one of harp's flags: it names the
    parameter in backticks and harp.commands renders the flag. commands/ and cli.py are the CLI itself;
    bench/probe.py is the argparse of the memory probe's own child process."""
    import ast
    import re
    from pathlib import Path

    import typer

    import harp

    group = typer.main.get_command(harp.cli.get_app())
    flags = {o for cmd in group.commands.values() for p in cmd.params
             for o in (*p.opts, *getattr(p, "secondary_opts", [])) if o.startswith("--")} - {"--help"}
    root = Path(harp.__file__).parent
    skip = {"cli.py", "bench/probe.py"}
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("commands/") or rel in skip:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            f = node.func if isinstance(node, ast.Call) else None
            is_problem = isinstance(f, ast.Attribute) and (f.attr == "add" or (
                f.attr == "append" and getattr(f.value, "id", None) == "problems") or f.attr == "warn")
            # Collector.add, problem lists, warnings.warn
            if not (isinstance(node, ast.Raise) or is_problem):
                continue
            for c in ast.walk(node):
                if isinstance(c, ast.Constant) and isinstance(c.value, str):
                    found += [(rel, f) for f in re.findall(r"--[a-z][a-z0-9-]*", c.value) if f in flags]
    assert found == []


def test_k_of_a_model_whose_layer_count_is_unknown():
    """A hub id's layer count is unknown before its config loads: k is checked by core.check_k without an
    upper bound, named as the parameter, shown as --layers on the command line."""
    from harp.commands import flag_errors
    from harp.jobs.prune import PruneSettings, check_prune
    from harp.util.problems import Problems

    for k in (0, True, 2.5):
        with pytest.raises(Problems, match=rf"^`k={k!r}`: must be between 1 and the model's number of layers\.$"):
            check_prune(PruneSettings(model="org/name", k=k))
    with pytest.raises(Problems, match=r"^--layers 0: must be between 1 and the model's number of layers\.$"), \
            flag_errors():
        check_prune(PruneSettings(model="org/name", k=0))
    assert check_prune(PruneSettings(model="org/name", k=500)).kind == "hub"  # no upper bound yet
    from harp.jobs.compare import CompareSettings, check_compare

    with pytest.raises(Problems, match=r"^--layers 0: must be between 1 and the model's number of layers\.$"), \
            flag_errors():
        check_compare(CompareSettings(model="org/name", ks=(0, 4)))
