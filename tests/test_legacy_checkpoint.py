"""A HARP checkpoint saved by main at commit e2209cf (before the package restructure) keeps loading exactly: the
same weights bit for bit, the same greedy tokens, and the same logits up to float32 round-off (the reference
logits were recorded on another CPU, whose matmul kernels may round the last bit differently: 6e-8 seen).

tests/data/legacy_e2209cf/ holds a tiny random LLaMA (4 layers: layer 0 pruned with alpha 0.7, layer 1 with
a closed-form refit map, layer 2 unpruned, layer 3 with alpha 0, i.e. attention removed), saved by
`harp.save` of that commit, with the logits and the greedy cached continuation the old code gave. Its
README.md and make.py say how it was made; nothing here regenerates it. The checkpoint is copied to
tmp_path before loading, so a loader that writes into it cannot change the vendored files.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import harp

DATA = Path(__file__).parent / "data" / "legacy_e2209cf"
HARP_BLOCK = {"format_version": 1, "layers": [0, 1, 3], "alphas": [0.7, 1.0, 0.0]}  # as e2209cf wrote it
PRUNED, UNPRUNED = (0, 1, 3), (2,)


def _reference() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    ref = json.loads((DATA / "reference.json").read_text())
    tensors = load_file(str(DATA / "reference.safetensors"))
    assert tensors["input_ids"][0].tolist() == ref["input_ids"]
    return tensors["input_ids"], tensors["logits"], ref["greedy_cached"]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    out = tmp_path / "legacy_e2209cf"
    shutil.copytree(DATA / "checkpoint", out, ignore=shutil.ignore_patterns("__pycache__"))
    return out


@torch.no_grad()
def _greedy_cached(model: torch.nn.Module, ids: torch.Tensor, n: int) -> list[int]:
    """One prefill, then one token at a time through the KV cache (`cache` or `past_key_values`)."""
    kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True)
    new = [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        cache = getattr(out, "cache", None)
        cache = cache if cache is not None else out.past_key_values
        out = model(input_ids=torch.tensor([[new[-1]]]), use_cache=True, **{kwarg: cache})
        new.append(int(out.logits[0, -1].argmax()))
    return new


def test_vendored_checkpoint_is_the_one_e2209cf_saved():
    cfg = json.loads((DATA / "checkpoint" / "config.json").read_text())
    assert cfg["harp"] == HARP_BLOCK
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((DATA / "reference.json").read_text())["harp"] == HARP_BLOCK
    assert json.loads((DATA / "checkpoint" / "harp_recipe.json").read_text())["harp_commit"] == "e2209cf"


def test_harp_load_reproduces_logits_and_cached_greedy_exactly(checkpoint):
    ids, ref_logits, ref_greedy = _reference()
    before = _digest(checkpoint)
    model = harp.load(checkpoint)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)  # round-off only: a wrong map is >> 1e-3

    assert dict(model.config.harp) == HARP_BLOCK  # the harp block reads back as it was written
    names = {n for n, _ in model.named_parameters()}
    for i in PRUNED:  # q/k stay deleted in the pruned layers, the unpruned one keeps them
        assert not any(f"layers.{i}.self_attn.{p}_proj" in n for n in names for p in "qk"), i
    for i in UNPRUNED:
        assert all(any(f"layers.{i}.self_attn.{p}_proj" in n for n in names) for p in "qk"), i

    assert _greedy_cached(model, ids, len(ref_greedy)) == ref_greedy
    with torch.no_grad():
        gen = model.generate(  # an explicit mask: with pad_token_id=0 the prompt's token 0 would be masked
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=len(ref_greedy),
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            eos_token_id=None,
        )
    assert gen[0, ids.shape[1] :].tolist() == ref_greedy

    assert _digest(checkpoint) == before, "loading changed the checkpoint folder"
    assert json.loads((checkpoint / "config.json").read_text())["harp"] == HARP_BLOCK


_PLAIN = textwrap.dedent(
    """
    import sys

    class _BlockHarp:  # plain transformers: the checkpoint's own modeling files, `import harp` fails
        def find_spec(self, name, path=None, target=None):
            if name == "harp" or name.startswith("harp."):
                raise ImportError("harp is hidden in this test")
            return None

    sys.meta_path.insert(0, _BlockHarp())
    import torch, transformers

    torch.set_num_threads(1)
    path, ids_file, out_file = sys.argv[1:]
    m = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    ids = torch.load(ids_file)
    with torch.no_grad():
        logits = m(input_ids=ids).logits
        gen = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, use_cache=True,
                         pad_token_id=0, eos_token_id=None)
    torch.save({"logits": logits, "greedy": gen[0, ids.shape[1]:].tolist(), "cls": type(m).__name__}, out_file)
    """
)


def test_plain_transformers_trust_remote_code_gives_the_same_logits(checkpoint, tmp_path):
    ids, ref_logits, ref_greedy = _reference()
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    args = [str(checkpoint), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")]
    r = subprocess.run([sys.executable, "-c", _PLAIN, *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["cls"] == "HarpLlamaForCausalLM"  # the checkpoint's own modeling_harp.py, not installed harp
    torch.testing.assert_close(out["logits"], ref_logits, rtol=0, atol=1e-6)
    assert out["greedy"] == ref_greedy
