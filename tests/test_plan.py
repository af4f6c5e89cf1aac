"""`harp plan`: config-only memory plan of the search and savings of the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import FAMILIES, tiny_model
from typer.testing import CliRunner

from harp.cli import get_app
from harp.engine.streamed import StreamedModel
from harp.jobs.plan import layer_parameters, parse_calib, result_summary, search_memory
from harp.model.accounting import count_parameters, parameter_count, removed_parameters
from harp.model.configs import PRESETS, config_from_dict
from harp.model.source import load_config

runner = CliRunner()
DOCS = Path(__file__).resolve().parent.parent / "docs" / "scaling.md"


def test_presets_have_the_public_sizes():
    assert parameter_count(load_config("llama-3.1-8b")) == 8_030_261_248
    assert parameter_count(load_config("llama-3.1-70b")) == 70_553_706_496
    assert parameter_count(load_config("smollm2-135m")) == 134_515_008
    assert set(PRESETS) == {"smollm2-135m", "llama-3.1-8b", "llama-3.1-70b"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer_parameters_match_a_real_model(family):
    model = tiny_model(family)
    layer = model.model.layers[0]
    assert layer_parameters(model.config) == sum(p.numel() for p in layer.parameters())
    assert parameter_count(model.config) == count_parameters(model)


def test_streamed_peak_does_not_grow_with_depth_in_memory_does():
    base = load_config("smollm2-135m").to_dict()
    cfgs = [load_config("smollm2-135m")] + [config_from_dict({**base, "num_hidden_layers": n}) for n in (60, 120)]
    streamed = [search_memory(c, 4, 8, 256, streamed=True) for c in cfgs]
    in_memory = [search_memory(c, 4, 8, 256, streamed=False) for c in cfgs]
    assert streamed[0] == streamed[1] == streamed[2]
    assert in_memory[0]["total"] < in_memory[1]["total"] < in_memory[2]["total"]
    one_layer = layer_parameters(cfgs[0]) * 4
    assert in_memory[2]["total"] - in_memory[0]["total"] == 90 * one_layer
    # the streamed search grows with k and with the calibration size
    assert search_memory(cfgs[0], 8, 8, 256)["total"] > streamed[0]["total"]
    more = search_memory(cfgs[0], 4, 16, 256)
    assert more["activations"] == 2 * streamed[0]["activations"]  # cached streams and rotary tables per batch
    # bfloat16 halves the weights
    assert search_memory(cfgs[0], 4, 8, 256, dtype="bfloat16")["weights"] * 2 == streamed[0]["weights"]


def test_activations_off_the_device():
    cfg = load_config("llama-3.1-8b")
    on = search_memory(cfg, 8, 128, 2048, dtype="bfloat16", device="cuda")
    cpu = search_memory(cfg, 8, 128, 2048, dtype="bfloat16", device="cuda", activations="cpu")
    disk = search_memory(cfg, 8, 128, 2048, dtype="bfloat16", device="cuda", activations="disk")
    stream = 2 * 128 * 2048 * 4096 * 2
    assert on["activations"] >= stream and cpu["activations"] == disk["activations"] == 0
    assert cpu["host_activations"] >= stream and disk["host_activations"] == 0
    assert on["total"] - cpu["total"] == on["activations"]


def test_plan_weights_and_activations_are_what_the_streamed_search_holds(tmp_path):
    """The plan's weight and activation terms count exactly the tensors the streamed search keeps."""
    folder = tmp_path / "m"
    tiny_model("llama", tie_word_embeddings=False).save_pretrained(folder, max_shard_size="60KB")
    streamer = StreamedModel(folder)
    w = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    batches, _ = streamer.capture(w, 4, 4)  # k = 2
    seen, held = set(), 0
    for p in streamer.model.parameters():
        if not p.is_meta and id(p) not in seen:
            seen.add(id(p))
            held += p.numel() * p.element_size()
    cfg = streamer.model.config
    m = search_memory(cfg, 2, 8, 16, batch_size=4)
    assert m["phase"] == 1  # the peak is in the search phase, whose weights are the ones counted
    g_extra = 2 * 64 * 2 * 16 * 4  # the folded o_proj of 2 pruned layers (hidden x kv_dim), float32
    assert m["weights"] - g_extra == held
    stream = sum(b.hidden.numel() * b.hidden.element_size() for b in batches)
    assert m["activations"] >= 2 * stream


def test_result_summary():
    cfg = load_config("llama-3.1-8b")
    r = result_summary(cfg, 8, dtype="bfloat16", context=8192)
    assert r["layers"] == list(range(31, 23, -1))
    assert r["params_before"] - r["params_after_min"] == removed_parameters(cfg, r["layers"], [0.0] * 8)
    assert r["params_before"] - r["params_after_max"] == removed_parameters(cfg, r["layers"], [0.5] * 8)
    assert r["kv_before"] == 32 * 2 * 8 * 128 * 2 * 8192  # 1 GiB
    assert r["kv_saving"] == pytest.approx(8 / 32)


def test_parse_calib_and_load_config_errors(tmp_path):
    assert parse_calib("16x512") == parse_calib("16×512") == parse_calib(" 16 * 512 ") == (16, 512)
    for bad in ("16", "0x512", "16x1", "axb"):
        with pytest.raises(ValueError, match="windows x tokens"):
            parse_calib(bad)
    with pytest.raises(FileNotFoundError, match="preset"):
        load_config(str(tmp_path / "nope"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="GGUF"):
        load_config(str(tmp_path / "m.gguf"))
    (tmp_path / "bad.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ValueError, match="does not support model_type 'gpt2'"):
        load_config(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="between 1 and the model's 30 layers"):
        search_memory(load_config(None), 31, 4, 16)


def test_cli_plan_from_a_config_file(tmp_path):
    cfg = tiny_model("qwen2").config
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json_string())
    r = runner.invoke(get_app(), ["plan", "--model", str(path), "--layers", "2", "--calib", "4x32", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["model"]["layers"] == 6 and d["settings"]["calib"] == [4, 32]
    assert d["streamed"]["total"] < d["in_memory"]["total"]
    assert d["result"]["kv_saving"] == pytest.approx(2 / 6)
    r = runner.invoke(get_app(), ["plan", "--model", str(tmp_path), "--layers", "2", "--calib", "4x32"])
    assert r.exit_code == 0 and "peak memory of the alpha search" in r.output
    r = runner.invoke(get_app(), ["plan", "--model", str(path), "--layers", "7", "--calib", "4x32"])
    assert r.exit_code != 0  # the library names `k=7`, the command line its flag
    assert "--layers 7: must be between 1 and the model's 6 layers." in (r.output + str(r.exception))


def test_cli_plan_70b_fits_streamed_not_in_memory():
    r = runner.invoke(get_app(), ["plan", "--model", "llama-3.1-70b", "--layers", "8", "--calib", "16x512",
                                  "--dtype", "bfloat16", "--device", "cuda", "--memory", "80"])
    assert r.exit_code == 0, r.output
    assert "streamed fits, in-memory does NOT fit" in r.output
    assert "(-10.0 %, any alphas)" in r.output


def test_cli_plan_errors():
    for args, words in ((["--calib", "16"], "windows x tokens"), (["--layers", "0"], "between 1"),
                        (["--model", "./nowhere"], "No config"), (["--device", "tpu"], "use cpu or cuda"),
                        (["--dtype", "int3"], "Unknown dtype")):
        r = runner.invoke(get_app(), ["plan", *args])
        assert r.exit_code != 0 and words in str(r.exception), (args, r.exception)


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.1-70b"])
def test_docs_show_the_current_plan(name):
    """docs/scaling.md quotes `harp plan` for Llama-3.1-8B and -70B; fail when the numbers drift."""
    from harp.commands.plan import render
    from harp.jobs.plan import full_plan

    text = DOCS.read_text()
    p = full_plan(load_config(name), 8, 16, 512, dtype="bfloat16", device="cuda")
    for line in render(p, name, 80.0):
        assert line in text, f"docs/scaling.md is out of date: missing {line!r}"


# ------------------------------------------------------------------------------------------------
# vLLM handoff: what can be checked without a GPU
# ------------------------------------------------------------------------------------------------


def _export(tmp_path: Path, alphas: list[float]) -> Path:
    import harp
    from harp.export.run import export_deci

    model = harp.prune(tiny_model("llama", intermediate_size=256), layers=[5, 4, 3], alphas=alphas)
    return export_deci(model, tmp_path / "deci")


def _add_remote_code(folder: Path) -> None:
    (folder / "configuration_decilm.py").write_text("# stands in for NVIDIA's DeciLM config class\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    (folder / "config.json").write_text(json.dumps(cfg))


def test_vllm_check_alpha_zero_export(tmp_path):
    from harp.export.deci import vllm_check

    folder = _export(tmp_path, [0.0, 0.0, 0.0])
    r = vllm_check(folder, 2)
    assert r["layers"] == 6 and r["kv_layers"] == 3 and r["kv_heads"] == 2  # KV cache for 3 of 6 layers
    assert len(r["problems"]) == 1 and "auto_map" in r["problems"][0]  # NVIDIA's remote code is a user step
    _add_remote_code(folder)
    assert vllm_check(folder, 1)["problems"] == vllm_check(folder, 2)["problems"] == []
    assert vllm_check(folder, 4)["problems"] == []  # 4 heads split, 2 KV heads replicate, FFN 256 splits
    assert any("4 attention heads do not split" in p for p in vllm_check(folder, 8)["problems"])
    assert any("KV heads" in p for p in vllm_check(folder, 3)["problems"])


def test_vllm_check_refuses_linear_layers(tmp_path):
    from harp.export.deci import vllm_check

    folder = _export(tmp_path, [0.5, 0.0, 0.2])
    _add_remote_code(folder)
    problems = vllm_check(folder, 2)["problems"]
    assert len(problems) == 1 and "layers [3, 5] are replace_with_linear" in problems[0]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        vllm_check(tmp_path / "nowhere")
