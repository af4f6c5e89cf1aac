"""Checkpoints: exact reload with harp and with plain transformers (harp not importable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import FAMILIES, HIDE_HARP, tiny_model

import harp
from harp.model.checkpoint import ENTRY_FILE, RECIPE_FILE, RUNTIME_FILE

PLANS = {"top": ([5, 4], [0.6, 0.0]), "mixed": ([0, 3, 5], [0.0, 0.8, 0.2])}


def _pruned(family, plan="mixed", attn="eager"):
    model = tiny_model(family, attn=attn)
    layers, alphas = PLANS[plan]
    return harp.prune(model, layers=layers, alphas=alphas)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_load_harp_is_bit_exact(tmp_path, family):
    model = _pruned(family)
    ids = torch.randint(0, 128, (2, 11))
    out = harp.save(model, tmp_path / "ck")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", RUNTIME_FILE, ENTRY_FILE, RECIPE_FILE} <= files
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["harp"]["layers"] == [0, 3, 5] and cfg["harp"]["alphas"] == [0.0, 0.8, 0.2]
    assert cfg["harp"]["format_version"] == 1
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_harp.HarpForCausalLM"
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["layers"] == [0, 3, 5] and recipe["base_architecture"] == type(model).__name__

    loaded = harp.load(out, attn_implementation="eager")
    assert harp.count_parameters(loaded) == harp.count_parameters(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # a loaded checkpoint saves again to the same weights
    again = harp.save(loaded, tmp_path / "ck2")
    a = harp.load(again, attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(a(ids).logits, loaded(ids).logits)


_PLAIN = HIDE_HARP + textwrap.dedent(
    """
    try:
        import harp  # noqa: F401
        raise SystemExit("harp was importable")
    except ImportError:
        pass
    import torch, transformers
    for path in sys.argv[1:]:
        m = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation="eager")
        ids, ref = torch.load(path + "/ref.pt")
        with torch.no_grad():
            logits = m(ids).logits
        assert not any(".layers.3.self_attn.q_proj" in n or ".layers.3.self_attn.k_proj" in n
                       for n, _ in m.named_parameters()), "q/k came back"
        print(path, "EQUAL" if torch.equal(logits, ref) else "DIFFERENT", type(m).__name__)
    """
)


def test_plain_transformers_loads_saved_folders(tmp_path):
    """Every family, loaded in one subprocess where `import harp` fails."""
    paths = []
    for family in FAMILIES:
        model = _pruned(family)
        ids = torch.randint(0, 128, (2, 11))
        out = harp.save(model, tmp_path / family)
        with torch.no_grad():
            torch.save((ids, model(ids).logits), out / "ref.pt")
        paths.append(str(out))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    r = subprocess.run([sys.executable, "-c", _PLAIN, *paths], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(paths) and all(" EQUAL " in line for line in lines), r.stdout


def test_generation_after_reload_matches(tmp_path):
    model = _pruned("llama", "top", attn="sdpa")
    ids = torch.randint(1, 128, (1, 7))
    loaded = harp.load(harp.save(model, tmp_path / "ck"), attn_implementation="sdpa")
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        b = loaded.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_refuses_to_overwrite_and_writes_nothing(tmp_path):
    model = _pruned("llama")
    out = tmp_path / "ck"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="already exists and is not empty.*overwrite"):
        harp.save(model, out)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp folder left behind
    harp.save(model, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "precious.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_output_path_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        harp.save(_pruned("llama"), f)
    assert f.read_text() == "x"


def test_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    model = _pruned("llama")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        harp.save(model, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temp folder


def test_unwritable_output(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits; a path under a regular file can never be created
        (tmp_path / "f").write_text("x")
        target = tmp_path / "f" / "sub" / "ck"
        with pytest.raises((NotADirectoryError, FileExistsError, PermissionError)):
            harp.save(_pruned("llama"), target)
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(PermissionError, match="Cannot write"):
            harp.save(_pruned("llama"), ro / "ck")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        harp.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing does not exist"):  # a typo is named as one
        harp.load(tmp_path / "missing")
    # a checkpoint whose weights do not match its harp block is refused, not silently re-initialised
    model = _pruned("llama")
    out = harp.save(model, tmp_path / "ck")
    cfg = json.loads((out / "config.json").read_text())
    cfg["harp"]["alphas"] = [0.5, 0.8, 0.2]  # layer 0 now claims to have v/o weights
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        harp.load(out)
