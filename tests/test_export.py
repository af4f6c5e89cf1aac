"""`harp export`: DeciLM (nemotron-nas) safetensors and llama.cpp `deci` GGUFs.

The DeciLM checks reload the exported folder with a reference forward pass written here from the
format's definition (not with harp's code) and compare logits with harp's model. The slow tests run
the GGUFs in llama.cpp (llama-cpp-python must be installed; they fail, not skip, without it).
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model
from typer.testing import CliRunner

import harp
from harp.cli import get_app
from harp.export.deci import ExportError
from harp.export.run import export_deci, export_gguf

# --------------------------------------------------------------------------------------------
# Reference DeciLM forward pass, from the format's definition (block_configs + tensor names).
# --------------------------------------------------------------------------------------------


def deci_reference_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    w = {k: v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}
    hidden, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["rms_norm_eps"]
    hd, n = hidden // heads, len(ids)
    assert cfg["rope_scaling"] is None  # the tiny models use plain RoPE

    def rms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if cfg["attention_bias"] and "_proj" in name and "mlp" not in name else y

    def ffn_width(mult: float) -> int:
        m = int(2 * mult * hidden / 3)
        return m if m % 256 == 0 else m + 256 - m % 256

    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)

    def rope(x: torch.Tensor) -> torch.Tensor:  # heads x n x hd, rotate-half convention
        return x * cos + torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * sin

    causal = torch.ones(n, n, dtype=torch.bool).tril()
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    assert len(cfg["block_configs"]) == cfg["num_hidden_layers"]
    for i, block in enumerate(cfg["block_configs"]):
        p, att = f"model.layers.{i}.", block["attention"]
        if not att["no_op"]:
            h = rms(x, w[p + "input_layernorm.weight"])
            if att["replace_with_linear"]:
                x = x + h @ w[p + "self_attn.linear_attn.weight"].T
            else:
                kv = heads // att["n_heads_in_group"]
                q = rope(linear(h, p + "self_attn.q_proj").view(n, heads, hd).transpose(0, 1))
                k = rope(linear(h, p + "self_attn.k_proj").view(n, kv, hd).transpose(0, 1))
                v = linear(h, p + "self_attn.v_proj").view(n, kv, hd).transpose(0, 1)
                k, v = k.repeat_interleave(heads // kv, 0), v.repeat_interleave(heads // kv, 0)
                s = (q @ k.transpose(1, 2) / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
                o = (s.softmax(-1) @ v).transpose(0, 1).reshape(n, hidden)
                x = x + linear(o, p + "self_attn.o_proj")
        else:
            assert not any(k.startswith(p + ("self_attn", "input_layernorm")[j]) for k in w for j in (0, 1))
        width = ffn_width(block["ffn"]["ffn_mult"])
        assert w[p + "mlp.gate_proj.weight"].shape == (width, hidden)
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T


IDS = [3, 17, 99, 5, 42, 8, 64, 1, 77, 23, 11, 120, 6, 50, 31, 2]


def harp_logits(model: torch.nn.Module, ids: list[int] = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


def pruned(family: str, layers: list[int], alphas: list[float], **overrides) -> torch.nn.Module:
    overrides.setdefault("intermediate_size", 256)  # the DeciLM format stores FFN widths in 256s
    return harp.prune(tiny_model(family, **overrides), layers=layers, alphas=alphas)


# --------------------------------------------------------------------------------------------
# DeciLM export: same logits as harp, through a reference implementation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, layers, alphas, overrides",
    [
        ("llama", [5, 4, 3, 2], [0.8, 0.2, 0.0, 0.1], {}),  # GQA, untied
        ("llama", [0, 5], [0.0, 0.5], {"tie_word_embeddings": True}),  # no-op layer 0, tied
        ("llama_mha", [], [], {}),  # unpruned, MHA with q/k/v/o biases
        ("mistral", [4, 3], [0.3, 0.0], {}),
        ("qwen2", [5, 4], [0.0, 0.0], {}),  # q/k/v biases on attention layers, alpha = 0 only
    ],
)
def test_deci_export_matches_harp(tmp_path: Path, family: str, layers, alphas, overrides) -> None:
    model = pruned(family, layers, alphas, **overrides)
    out = export_deci(model, tmp_path / "deci")
    cfg = json.loads((out / "config.json").read_text())
    kinds = [
        "no_op" if b["attention"]["no_op"] else "linear" if b["attention"]["replace_with_linear"] else "attn"
        for b in cfg["block_configs"]
    ]
    for i, a in zip(layers, alphas, strict=True):
        assert kinds[i] == ("no_op" if a == 0 else "linear")
    assert kinds.count("attn") == 6 - len(layers)
    ref = deci_reference_logits(out, IDS)
    torch.testing.assert_close(ref, harp_logits(model), atol=1e-4, rtol=1e-4)


def test_deci_linear_weight_is_alpha_wo_r_wv(tmp_path: Path) -> None:
    base = tiny_model("llama", intermediate_size=256)
    attn = base.model.layers[5].self_attn
    wo, wv = attn.o_proj.weight.detach().double().clone(), attn.v_proj.weight.detach().double().clone()
    model = harp.prune(base, layers=[5], alphas=[0.3])
    w = load_file(str(export_deci(model, tmp_path / "d") / "model.safetensors"))
    repeat = torch.eye(2, dtype=torch.float64).repeat_interleave(2, 0)  # 4 heads -> 2 KV heads
    expected = 0.3 * wo @ torch.kron(repeat, torch.eye(16, dtype=torch.float64)) @ wv
    torch.testing.assert_close(w["model.layers.5.self_attn.linear_attn.weight"].double(), expected)
    assert not any(k.startswith("model.layers.5.self_attn.") and "linear_attn" not in k for k in w)


def test_cli_export_deci_from_harp_checkpoint(tmp_path: Path) -> None:
    ckpt = harp.save(pruned("llama", [5, 4], [0.5, 0.0]), tmp_path / "ckpt")
    runner = CliRunner()
    res = runner.invoke(get_app(), ["export", str(ckpt), "--format", "deci", "--out", str(tmp_path / "deci")])
    assert res.exit_code == 0, res.output
    assert "linear 5" in res.output and "no_op 4" in res.output
    ref = deci_reference_logits(tmp_path / "deci", IDS)
    torch.testing.assert_close(ref, harp_logits(harp.load(ckpt)), atol=1e-4, rtol=1e-4)
    # never clobbers
    res = runner.invoke(get_app(), ["export", str(ckpt), "--format", "deci", "--out", str(tmp_path / "deci")])
    assert res.exit_code != 0 and isinstance(res.exception, FileExistsError)
    res = runner.invoke(
        get_app(), ["export", str(ckpt), "--format", "deci", "--out", str(tmp_path / "deci"), "--overwrite"]
    )
    assert res.exit_code == 0, res.output


# --------------------------------------------------------------------------------------------
# What the format cannot hold: clear errors, nothing written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, layers, alphas, overrides, words",
    [
        ("gemma2", [5], [0.5], {}, ["gemma2", "norms", "trust_remote_code"]),
        ("gemma2", [], [], {}, ["gemma2", "norms"]),
        (
            "qwen2",
            [5, 4],
            [0.5, 0.0],
            {},
            ["layer 5", "v_proj bias", "keep layer 5 as attention", "alpha = 0"],
        ),
        ("llama_mha", [5], [0.5], {}, ["layer 5", "o_proj bias", "keep layer 5 as attention"]),
        ("qwen3", [5], [0.5], {}, ["q_norm"]),
        ("llama", [5], [0.5], {"head_dim": 32}, ["head_dim 32", "hidden_size / num_attention_heads"]),
        ("mistral", [5], [0.5], {"sliding_window": 8}, ["sliding"]),
    ],
)
@pytest.mark.parametrize("fmt", ["deci", "gguf"])
def test_unsupported_features_error(tmp_path: Path, fmt, family, layers, alphas, overrides, words) -> None:
    model = pruned(family, layers, alphas, **overrides)
    out = tmp_path / ("out" if fmt == "deci" else "out.gguf")
    with pytest.raises(ExportError) as e:
        (export_deci if fmt == "deci" else export_gguf)(model, out)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_ffn_width_not_multiple_of_256(tmp_path: Path) -> None:
    model = pruned("llama", [5], [0.5], intermediate_size=96)
    with pytest.raises(ExportError, match="multiple of 256.*`fmt=gguf`"):  # the CLI says --format gguf
        export_deci(model, tmp_path / "d")
    export_gguf(model, tmp_path / "m.gguf", dtype="f32")  # GGUF stores the width exactly


def test_cli_unsupported_is_one_clean_error(tmp_path: Path) -> None:
    ckpt = harp.save(pruned("qwen2", [5], [0.5]), tmp_path / "ckpt")
    res = CliRunner().invoke(get_app(), ["export", str(ckpt), "--format", "deci", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and isinstance(res.exception, ExportError)
    assert "v_proj bias" in str(res.exception) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt", ["deci", "gguf"])
def test_a_window_checkpoint_is_refused_in_one_line(tmp_path: Path, fmt) -> None:
    """llama.cpp's `deci` and the DeciLM layout have only full attention: a window checkpoint would run
    unwindowed, so export refuses it, naming the layers and the flag that makes an exportable plan."""
    ckpt = harp.save(harp.prune(tiny_model("llama"), [5], [0.5], windows={2: 4}), tmp_path / "ckpt")
    out = tmp_path / ("o" if fmt == "deci" else "o.gguf")
    res = CliRunner().invoke(get_app(), ["export", str(ckpt), "--format", fmt, "--out", str(out)])
    assert res.exit_code != 0 and isinstance(res.exception, ValueError)  # refused before any weight loads
    text = str(res.exception)
    assert "\n" not in text and "window layers (2:4" in text and "--kind bypass" in text and "`" not in text, text
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# GGUF layout (no llama.cpp needed)
# --------------------------------------------------------------------------------------------


def test_gguf_layout(tmp_path: Path) -> None:
    import gguf

    model = pruned("llama", [5, 4, 0], [0.5, 0.0, 0.0])
    path = export_gguf(model, tmp_path / "m.gguf", dtype="f32")
    r = gguf.GGUFReader(path)
    assert r.get_field("general.architecture").contents() == "deci"
    # layer 0 (alpha 0) is a zero linear layer: llama.cpp cannot load a no-op layer 0
    assert r.get_field("deci.attention.head_count").contents() == [4, 4, 4, 4, 0, 4]
    assert r.get_field("deci.attention.head_count_kv").contents() == [0, 2, 2, 2, 0, 0]
    assert r.get_field("deci.feed_forward_length").contents() == [256] * 6
    t = {x.name: x for x in r.tensors}
    assert not np.any(t["blk.0.attn_output.weight"].data)
    assert "blk.4.attn_norm.weight" not in t and "blk.4.attn_output.weight" not in t
    assert "blk.5.attn_q.weight" not in t and tuple(t["blk.5.attn_output.weight"].shape) == (64, 64)
    assert "output.weight" in t
    with pytest.raises(FileExistsError):
        export_gguf(model, path)


def _tokenizer_gguf(path: Path, n_tokens: int) -> Path:
    """A GGUF holding only tokenizer metadata, standing in for 'a GGUF of the same base model'."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([f"t{i}" for i in range(n_tokens)])
    w.add_token_types([1] * n_tokens)
    w.add_token_merges(["t 1", "t 2"])
    w.add_bos_token_id(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_cli_export_gguf_tokenizer_sources(tmp_path: Path) -> None:
    import gguf

    ckpt = harp.save(pruned("llama", [5, 0], [0.5, 0.0]), tmp_path / "ckpt")  # no tokenizer files
    runner = CliRunner()
    out = tmp_path / "m.gguf"
    res = runner.invoke(get_app(), ["export", str(ckpt), "--format", "gguf", "--out", str(out)])
    assert isinstance(res.exception, ExportError) and "--tokenizer-gguf" in str(res.exception)
    assert not out.exists()
    wrong = _tokenizer_gguf(tmp_path / "wrong.gguf", 100)
    res = runner.invoke(get_app(), ["export", str(ckpt), "-f", "gguf", "-o", str(out), "--tokenizer-gguf", str(wrong)])
    assert isinstance(res.exception, ExportError) and "100 tokens" in str(res.exception) and not out.exists()
    ref = _tokenizer_gguf(tmp_path / "tok.gguf", 128)
    res = runner.invoke(
        get_app(), ["export", str(ckpt), "-f", "gguf", "-o", str(out), "--tokenizer-gguf", str(ref), "--dtype", "q8_0"]
    )
    assert res.exit_code == 0, res.output
    assert "zero linear layer" in res.output
    mine, theirs = gguf.GGUFReader(out), gguf.GGUFReader(ref)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        assert mine.get_field(key).contents() == theirs.get_field(key).contents()
    kinds = {t.name: t.tensor_type.name for t in mine.tensors}
    assert kinds["blk.1.ffn_up.weight"] == "Q8_0" and kinds["blk.1.attn_norm.weight"] == "F32"


# --------------------------------------------------------------------------------------------
# llama.cpp runs the GGUFs (slow: needs llama-cpp-python, which CI installs)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp_works(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Fail with a clear message, instead of killing the whole test session, when llama-cpp-python is
    missing or was built for instructions this CPU lacks (e.g. AVX-512 on an AVX2-only machine)."""
    path = export_gguf(pruned("llama", [5], [0.5]), tmp_path_factory.mktemp("canary") / "c.gguf", dtype="f32")
    code = (
        "from harp.bench import llamacpp\n"
        f"llm = llamacpp.open_gguf({str(path)!r}, n_ctx=32, logits_all=True, n_threads=1)\n"
        "llamacpp.logits(llm, [1, 2, 3, 4, 5, 6, 7, 8])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        hint = ""
        if r.returncode == -signal.SIGILL:
            hint = (
                " (SIGILL: llama-cpp-python was built for instructions this CPU lacks; rebuild it with "
                "CMAKE_ARGS including -DGGML_NATIVE=OFF and only the instruction sets this CPU has, e.g. "
                "-DGGML_AVX512=OFF on AVX2-only CPUs)"
            )
        pytest.fail(f"llama.cpp cannot run a GGUF here: exit code {r.returncode}{hint}\n{r.stderr[-2000:]}")


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    from harp.bench import llamacpp

    llm = llamacpp.open_gguf(path, n_ctx=64, logits_all=True, n_threads=1)
    try:
        return llamacpp.logits(llm, ids)
    finally:
        llm.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, layers, alphas, overrides",
    [
        ("llama", [5, 4, 3, 0], [0.8, 0.0, 0.3, 0.0], {}),  # GQA, no-op layer 0
        ("llama", [5, 1], [0.6, 0.4], {"tie_word_embeddings": True, "intermediate_size": 96}),
        (
            "llama",
            [5],
            [0.5],
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 10000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
        ),
        ("llama_mha", [], [], {}),  # unpruned, q/k/v/o biases
        ("qwen2", [5, 4], [0.0, 0.0], {}),
    ],
)
def test_llamacpp_runs_tiny_gguf(llama_cpp_works: None, tmp_path: Path, family, layers, alphas, overrides) -> None:
    model = pruned(family, layers, alphas, **overrides)
    path = export_gguf(model, tmp_path / "m.gguf", dtype="f32")
    got = _llama_logits(path, IDS)
    np.testing.assert_allclose(got, harp_logits(model).float().numpy(), atol=2e-4, rtol=1e-3)


@pytest.mark.slow  # needs llama-cpp-python, like the other llama.cpp tests (the fast suite runs without it)
def test_llamacpp_runs_refit_layers(llama_cpp_works: None, tmp_path: Path) -> None:
    """A refit layer (harp.fit_layers) is the same linear layer with another map: GGUF export and llama.cpp
    reproduce harp's logits, at layer 0, mid-stack and top, with an alpha-0 layer beside them."""
    model = tiny_model("llama", intermediate_size=256)
    calib = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(0))
    fit = harp.fit_layers(model, calib, [0, 3, 5])
    harp.prune(model, layers=[0, 3, 5, 2], alphas=[1.0, 1.0, 0.8, 0.0], maps=fit.maps)
    path = export_gguf(model, tmp_path / "refit.gguf", dtype="f32")
    got = _llama_logits(path, IDS)
    np.testing.assert_allclose(got, harp_logits(model).float().numpy(), atol=2e-4, rtol=1e-3)


# The default model pruned at k = 8 with the alphas `make prune` searched (default settings), as recorded
# in benchmarks/results/prune_smollm2_k8.json: read from there so the test does not rerun the search.
DEFAULT_RESULT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "prune_smollm2_k8.json"


@pytest.mark.slow
def test_llamacpp_runs_pruned_default_model(llama_cpp_works: None, tmp_path: Path) -> None:
    """Acceptance: llama.cpp loads the f32 GGUF of SmolLM2 pruned at k = 8, tokenises like harp, its
    greedy continuation matches harp's for 32 tokens and its perplexity is within 1 %."""
    import gguf

    from harp.bench import llamacpp
    from harp.engine.text import load_text
    from harp.model.load import default_gguf, load_model

    plan = json.loads(DEFAULT_RESULT.read_text())
    model, tok = load_model(None)
    harp.prune(model, layers=plan["layers"], alphas=plan["alphas"])
    path = export_gguf(model, tmp_path / "pruned.gguf", dtype="f32", tokenizer=tok)

    # tokenizer metadata built from the HF tokenizer = what the original GGUF carries
    mine, ref = gguf.GGUFReader(path), gguf.GGUFReader(default_gguf())
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token",
    ):
        assert mine.get_field(key).contents() == ref.get_field(key).contents(), key

    text = load_text("wikitext2-raw-test").text  # WikiText-2-raw test, bundled with harp
    ids = tok(text[:6000], add_special_tokens=False)["input_ids"][:512]
    prompt = tok("The history of the printing press begins in", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        h_logits = model(torch.tensor([ids])).logits[0, :-1].double()
    want = want[0, len(prompt) :].tolist()
    h_nll = torch.nn.functional.cross_entropy(h_logits, torch.tensor(ids[1:]), reduction="sum").item()

    llm = llamacpp.open_gguf(path, n_ctx=512, logits_all=True, n_threads=1)  # 1: robust on a busy CI box
    try:
        sample = tok.decode(ids[:200])
        assert llm.tokenize(sample.encode(), add_bos=False, special=False) == tok(sample)["input_ids"]
        assert llamacpp.greedy(llm, prompt, 32) == want
        l_nll, n = llamacpp.nll(llm, ids)
    finally:
        llm.close()
    assert n == len(ids) - 1
    assert abs(math.exp(l_nll / n) / math.exp(h_nll / n) - 1) < 0.01
