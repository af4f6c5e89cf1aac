"""Runs the real vLLM engine on one model folder; started by tests/test_vllm.py with .venv-vllm/bin/python.

    python tests/vllm_driver.py SPEC.json OUT.json

SPEC: {"model": DIR, "prompts": [[token ids], ...], "max_tokens": 32, "tp": 1, "max_model_len": 512,
       "hf_overrides": {...} (optional), "max_num_batched_tokens": int (optional)}
OUT:  {"ok": true, "tokens": [[...]], "prompt_logprobs": [[float per prompt token after the first]],
       "num_gpu_blocks": int, "block_size": int, "model_class": str, "attention_modules": int,
       "kv_layers": {layer index: {"spec": KV cache spec class, "sliding_window": int | None,
                     "block_size": int, "page_size_bytes": int, "max_memory_usage_bytes": int}},
       "max_model_len": int, "max_in_flight_tokens": int, "max_concurrency": float}
   or {"ok": false, "error": "ExceptionType: message"} when the engine refuses the model.

The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a load error arrives
here as the exception vLLM raised, and the KV-cache size vLLM computed is readable from its config.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def _inspect(model) -> dict:
    from vllm.model_executor.layers.attention import Attention

    return {
        "model_class": type(model).__name__,
        "model_bases": [c.__name__ for c in type(model).__mro__],
        "attention_modules": sum(isinstance(m, Attention) for m in model.modules()),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _kv_layers(llm) -> dict:
    """The KV cache spec vLLM's scheduler holds for each attention layer (by layer index): what it
    allocates per request (`max_memory_usage_bytes`: vLLM's own figure for one max_model_len request)."""
    vllm_config = llm.llm_engine.vllm_config
    kv = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
    layers = {}
    for group in kv.kv_cache_groups:
        spec = group.kv_cache_spec
        for name in group.layer_names:
            idx = int(name.split("layers.")[1].split(".")[0])
            layers[idx] = {
                "spec": type(spec).__name__,
                "sliding_window": getattr(spec, "sliding_window", None),
                "block_size": spec.block_size,
                "page_size_bytes": spec.page_size_bytes,
                "max_memory_usage_bytes": spec.max_memory_usage_bytes(vllm_config),
            }
    return layers


def _max_concurrency(llm) -> float:
    """vLLM's own figure (the one it logs): how many max_model_len requests its KV cache holds at once."""
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    kv = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
    return float(get_max_concurrency_for_kv_cache_config(llm.llm_engine.vllm_config, kv))


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(
        model=spec["model"],
        dtype="float32",
        max_model_len=spec.get("max_model_len", 512),
        enforce_eager=spec.get("enforce_eager", True),
        tensor_parallel_size=spec.get("tp", 1),
        seed=0,
    )
    if spec.get("max_num_batched_tokens"):
        kwargs["max_num_batched_tokens"] = spec["max_num_batched_tokens"]
    if spec.get("hf_overrides"):
        kwargs["hf_overrides"] = spec["hf_overrides"]
    if spec.get("tp", 1) > 1:
        kwargs["distributed_executor_backend"] = "mp"
    try:
        llm = LLM(**kwargs)
    except Exception as e:  # the refusal tests want vLLM's own error text
        out = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        open(out_path, "w").write(json.dumps(out))
        return
    params = SamplingParams(
        temperature=0.0, max_tokens=spec.get("max_tokens", 32), ignore_eos=True, prompt_logprobs=0, logprobs=0
    )
    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in spec["prompts"]]
    results = llm.generate(prompts, params, use_tqdm=False)
    tokens, plps = [], []
    for prompt, r in zip(spec["prompts"], results, strict=True):
        c = r.outputs[0]
        tokens.append(list(c.token_ids))
        lp = []
        for pos, d in enumerate(r.prompt_logprobs or []):
            if pos == 0:
                continue  # the first prompt token has no logprob
            lp.append(float(d[prompt[pos]].logprob))
        plps.append(lp)
    cache = llm.llm_engine.vllm_config.cache_config
    out = {
        "ok": True,
        "tokens": tokens,
        "prompt_logprobs": plps,
        "num_gpu_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
    }
    if spec.get("tp", 1) == 1:
        out.update(llm.apply_model(_inspect)[0])
        vllm_config = llm.llm_engine.vllm_config
        out.update(kv_layers=_kv_layers(llm), max_model_len=vllm_config.model_config.max_model_len,
                   max_in_flight_tokens=vllm_config.max_in_flight_tokens, max_concurrency=_max_concurrency(llm))
    open(out_path, "w").write(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
