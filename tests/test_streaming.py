"""The streamed search: the same residual stream and the same alphas as the in-memory search, with the
bottom layers streamed one at a time from safetensors shards; resume; activations off the device;
clear errors; `harp prune --streamed`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import tiny_folder, tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import harp
from harp.cli import get_app
from harp.engine.replay import capture_inputs
from harp.engine.streamed import StreamedModel, activation_store
from harp.methods.search import fingerprint, search_alphas, streamed_search
from harp.model.load import check_resident, load_on_device, resolve_device

runner = CliRunner()


def _windows(n: int = 6, s: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, s), generator=torch.Generator().manual_seed(seed))


def _sharded(tmp_path: Path, family: str, **overrides: Any) -> Path:
    """A tiny random model saved as several safetensors shards with an index."""
    folder = tmp_path / f"{family}-sharded"
    tiny_model(family, **overrides).save_pretrained(folder, max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 3
    return folder


def _reference(folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b or (a is None and b is None)


# ------------------------------------------------------------------------------------------------
# Equality with the in-memory search
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "tied"), [("llama", True), ("gemma2", False), ("qwen3", False)])
def test_streamed_residual_stream_equals_in_memory(tmp_path, family, tied):
    folder = _sharded(tmp_path, family, tie_word_embeddings=tied)
    ref = _reference(folder)
    w = _windows(7)  # a last batch of 3: uneven batches too
    start = 3
    in_memory = capture_inputs(ref, w, start, batch_size=4)
    streamer = StreamedModel(folder)
    streamed, passes = streamer.capture(w, start, 4)
    assert passes == start and len(streamed) == len(in_memory) == 2
    with torch.no_grad():
        states = ref(w, output_hidden_states=True).hidden_states  # states[start] enters layer `start`
    for i, (a, b) in enumerate(zip(in_memory, streamed, strict=True)):
        assert torch.equal(a.windows, b.windows)
        assert torch.equal(a.hidden, b.hidden)  # bit for bit
        assert torch.equal(b.hidden, states[start][4 * i : 4 * i + len(b.windows)])
        assert set(a.kwargs) == set(b.kwargs) == set(range(start, 6))
        for j in range(start, 6):
            assert _same(a.kwargs[j], b.kwargs[j]), f"layer {j} arguments differ"


@pytest.mark.parametrize(("family", "tied"), [("llama", True), ("mistral", False), ("qwen2", False),
                                              ("gemma3", False)])
def test_streamed_search_equals_in_memory_search(tmp_path, family, tied):
    folder = _sharded(tmp_path, family, tie_word_embeddings=tied)
    w = _windows()
    in_memory = search_alphas(_reference(folder), w, 3, grid="0:1:0.25")
    streamed = streamed_search(folder, w, 3, grid="0:1:0.25")
    assert streamed.alphas == in_memory.alphas and streamed.layers == in_memory.layers
    assert streamed.log == in_memory.log  # identical perplexities, not merely close
    assert streamed.method == "streamed"
    # the bottom 3 layers ran once each instead of the 5-layer capture forward of the in-memory search
    assert in_memory.layer_forwards - streamed.layer_forwards == (6 - 1) - 3


def test_explicit_non_contiguous_layers(tmp_path):
    folder = _sharded(tmp_path, "llama")
    w = _windows()
    a = search_alphas(_reference(folder), w, [5, 2], grid="0,0.5,1")
    b = streamed_search(folder, w, [5, 2], grid="0,0.5,1")
    assert a.alphas == b.alphas and a.log == b.log


def test_single_file_checkpoint_and_bfloat16(tmp_path):
    folder = tmp_path / "one-file"
    tiny_model("llama", tie_word_embeddings=True).save_pretrained(folder)
    assert [f.name for f in folder.glob("*.safetensors")] == ["model.safetensors"]
    w = _windows()
    a = search_alphas(_reference(folder, torch.bfloat16), w, 2, grid="0:1:0.5")
    b = streamed_search(folder, w, 2, grid="0:1:0.5", dtype="bfloat16")
    assert a.alphas == b.alphas and a.log == b.log
    # perplexities are accumulated in float32/float64 whatever the model dtype: finite Python floats
    assert all(isinstance(e["ppl"], float) and math.isfinite(e["ppl"]) for e in b.log)


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_activations_off_the_device_give_the_same_search(tmp_path, where):
    folder = _sharded(tmp_path, "qwen2")
    w = _windows()
    on_device = streamed_search(folder, w, 3, grid="0:1:0.5")
    spill = tmp_path / "spill"
    other = streamed_search(folder, w, 3, grid="0:1:0.5", activations=where, spill_dir=spill)
    assert other.log == on_device.log and other.alphas == on_device.alphas
    if where == "disk":
        assert spill.is_dir() and not any(spill.iterdir())  # the spill files are gone with the search


def test_disk_store_is_memory_mapped_and_exact(tmp_path):
    t = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    with activation_store("disk", torch.device("cpu"), tmp_path) as keep:
        kept = keep(t)
        assert torch.equal(kept, t) and kept.dtype == torch.bfloat16
        assert kept.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        assert not list(tmp_path.rglob("*.bin"))  # unlinked at once; the mapping keeps the data
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# What is resident
# ------------------------------------------------------------------------------------------------


def test_bottom_layers_are_resident_one_at_a_time(tmp_path):
    folder = _sharded(tmp_path, "llama", num_hidden_layers=8, tie_word_embeddings=False)
    streamer = StreamedModel(folder)
    stack = streamer.model.model.layers
    start = 5  # k = 3

    def resident_layers() -> set[int]:
        return {j for j, layer in enumerate(stack) if any(not p.is_meta for p in layer.parameters())}

    seen: list[tuple[int, set[int]]] = []
    handles = [
        stack[j].register_forward_pre_hook(lambda mod, args, j=j: seen.append((j, resident_layers())))
        for j in range(len(stack))
    ]
    res = streamed_search(None, _windows(), 3, grid="0:1:0.5", model=streamer)
    for h in handles:
        h.remove()
    bottom_calls = [(j, r) for j, r in seen if j < start]
    assert bottom_calls, "the bottom layers never ran"
    for j, resident in bottom_calls:
        below = resident & set(range(start))
        assert below <= {j}, f"layer {j} ran while bottom layers {sorted(below)} were resident"
    # each bottom layer really ran with its weights (not only through the identity pass)
    assert {j for j, r in bottom_calls if r & {j}} == set(range(start))
    # after the search: the searched layers, the final norm and the head; no bottom layer, no embedding
    names = set(streamer.resident())
    assert not any(n.startswith(tuple(f"model.layers.{j}." for j in range(start))) for n in names)
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" in names and "model.norm.weight" in names
    assert {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")} == {5, 6, 7}
    # each load of a bottom layer read that layer's tensors only
    for loaded in streamer.loaded:
        layers = {n.split(".")[2] for n in loaded if n.startswith("model.layers.")}
        assert len(layers) <= 1 or layers == {"5", "6", "7"}
    assert res.layers == [7, 6, 5]


# ------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------


class Boom(Exception):
    pass


def _fail_after(state: Path, n: int):
    def callback(layer, alpha, log):
        if len(json.loads(state.read_text())["done"]) == n:
            raise Boom

    return callback


def test_streamed_resume_after_interruption(tmp_path):
    folder = _sharded(tmp_path, "mistral")
    w = _windows()
    full = streamed_search(folder, w, 4, grid="0:1:0.5")
    state = tmp_path / "state.json"
    with pytest.raises(Boom):
        streamed_search(folder, w, 4, grid="0:1:0.5", state_path=state, callback=_fail_after(state, 2))
    resumed = streamed_search(folder, w, 4, grid="0:1:0.5", state_path=state)
    assert resumed.resumed_layers == 2
    assert resumed.alphas == full.alphas and resumed.log == full.log


def test_resume_across_modes(tmp_path):
    """The fingerprint reads non-resident weights from disk, so both modes agree on what a search is."""
    folder = _sharded(tmp_path, "llama", tie_word_embeddings=True)
    w = _windows()
    ref = _reference(folder)
    full = search_alphas(ref, w, 4, grid="0:1:0.5")
    streamer = StreamedModel(folder)
    assert fingerprint(ref, w, [5, 4], [0.0, 1.0], "cached") == \
        fingerprint(streamer.model, w, [5, 4], [0.0, 1.0], "cached", streamer.digest)

    state = tmp_path / "a.json"
    with pytest.raises(Boom):
        search_alphas(ref, w, 4, grid="0:1:0.5", state_path=state, callback=_fail_after(state, 1))
    resumed = streamed_search(folder, w, 4, grid="0:1:0.5", state_path=state)
    assert resumed.resumed_layers == 1 and resumed.alphas == full.alphas and resumed.log == full.log

    state = tmp_path / "b.json"
    with pytest.raises(Boom):
        streamed_search(folder, w, 4, grid="0:1:0.5", state_path=state, callback=_fail_after(state, 3))
    resumed = search_alphas(ref, w, 4, grid="0:1:0.5", state_path=state)
    assert resumed.resumed_layers == 3 and resumed.alphas == full.alphas and resumed.log == full.log


def test_state_of_another_model_is_refused(tmp_path):
    a = _sharded(tmp_path / "a", "llama")
    b = tmp_path / "b"
    tiny_model("llama", seed=7).save_pretrained(b, max_shard_size="60KB")
    state = tmp_path / "state.json"
    streamed_search(a, _windows(), 2, grid="0,1", state_path=state)
    with pytest.raises(ValueError, match="different search"):
        streamed_search(b, _windows(), 2, grid="0,1", state_path=state)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_not_a_safetensors_folder(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="(?s)not the file .*save_pretrained"):
        StreamedModel(gguf)
    bins = tmp_path / "bin-model"
    bins.mkdir()
    (bins / "config.json").write_text(json.dumps(tiny_model("llama").config.to_dict()))
    (bins / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="(?s)has none .*save_pretrained\\('DIR', max_shard_size"):
        StreamedModel(bins)
    with pytest.raises(ValueError, match="hub id"):
        StreamedModel("some-org/some-model")
    pruned = harp.save(harp.prune(tiny_model("llama"), [5], [0.5]), tmp_path / "pruned")
    with pytest.raises(ValueError, match="already a HARP-pruned"):
        StreamedModel(pruned)


def test_bad_device_dtype_activations_and_k(tmp_path, monkeypatch):
    folder = _sharded(tmp_path, "llama")
    with pytest.raises(ValueError, match="Unknown device"):
        StreamedModel(folder, device="gpu0")
    with pytest.raises(ValueError, match="Unknown dtype"):
        StreamedModel(folder, dtype="int8")
    with pytest.raises(ValueError, match="Unknown activations"):
        streamed_search(folder, _windows(), 2, activations="ram")
    with pytest.raises(ValueError, match="between 1 and the model's 6 layers"):
        streamed_search(folder, _windows(), 7)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_device_auto_without_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    folder = _sharded(tmp_path, "llama")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, tok = load_on_device(folder, device="auto", with_tokenizer=False)
    assert tok is None and next(model.parameters()).device == torch.device("cpu")
    check_resident(model, [5, 4])  # nothing offloaded
    model.model.layers[4].mlp.up_proj.weight = torch.nn.Parameter(torch.empty(96, 64, device="meta"))
    with pytest.raises(ValueError, match=r"Layers \[4\] were offloaded"):
        check_resident(model, [5, 4])


def test_missing_shard_is_named(tmp_path):
    folder = _sharded(tmp_path, "llama")
    victim = sorted(folder.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        StreamedModel(folder)


# ------------------------------------------------------------------------------------------------
# harp prune --streamed
# ------------------------------------------------------------------------------------------------

SMALL = ["--layers", "3", "--calib-windows", "4", "--seq-len", "64", "--eval-tokens", "512", "--eval-seq-len", "128",
         "--grid", "0:1:0.5", "--no-reference", "--fit", "none"]


def test_cli_prune_streamed_matches_in_memory(tmp_path):
    folder = tiny_folder(tmp_path / "tiny", "llama", max_position_embeddings=512)
    results = {}
    for name, extra in (("mem", []), ("streamed", ["--streamed", "--activations", "cpu"])):
        out = tmp_path / name
        r = runner.invoke(get_app(), ["prune", "--model", str(folder), "--out", str(out), "--json",
                                      str(tmp_path / f"{name}.json"), *SMALL, *extra], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["streamed"]["alphas"] == results["mem"]["alphas"]
    assert results["streamed"]["search"]["log"] == results["mem"]["search"]["log"]
    assert results["streamed"]["search"]["method"] == "streamed"
    assert results["streamed"]["ppl"] == results["mem"]["ppl"]
    assert results["streamed"]["settings"]["streamed"] is True


def test_cli_prune_streamed_errors(tmp_path):
    folder = tiny_folder(tmp_path / "tiny", "llama", max_position_embeddings=512)
    cases = [
        (["--streamed", "--method", "naive"], "--method naive needs the whole model"),
        (["--activations", "disk"], "add --streamed"),
        (["--streamed", "--activations", "ram"], "Unknown activations"),
        (["--device", "tpu"], "Unknown device"),
        (["--streamed", "--select", "attention-drop"], "needs the whole model resident; drop --streamed"),
    ]
    for extra, words in cases:
        out = tmp_path / "o"
        r = runner.invoke(get_app(), ["prune", "--model", str(folder), "--out", str(out), *SMALL, *extra])
        assert r.exit_code != 0 and words in str(r.exception), (extra, r.exception)
        assert not out.exists()


@pytest.mark.slow
def test_default_model_streamed_equals_in_memory():
    """On the real SmolLM2-135M: the streamed search reads its safetensors folder layer by layer and finds
    the same alphas, with the same calibration perplexity for every candidate, as the in-memory search."""
    from transformers import AutoTokenizer

    from harp.engine.text import DEFAULT_CALIB, calibration_windows, load_text, tokenize
    from harp.model.load import default_model_dir, load_model

    torch.set_num_threads(2)
    try:
        folder = default_model_dir()
        tok = AutoTokenizer.from_pretrained(str(folder))
        w = calibration_windows(tokenize(tok, load_text(None, DEFAULT_CALIB)), 4, 64, seed=0)
        model, _ = load_model(folder, with_tokenizer=False)
        in_memory = search_alphas(model, w, 2, grid="0:1:0.5")
        del model
        streamed = streamed_search(folder, w, 2, grid="0:1:0.5")
    finally:
        torch.set_num_threads(1)
    assert streamed.layers == in_memory.layers == [29, 28]
    assert streamed.alphas == in_memory.alphas
    assert streamed.log == in_memory.log
    assert all(math.isfinite(e["ppl"]) for e in streamed.log)
