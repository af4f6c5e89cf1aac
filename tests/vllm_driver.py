"""Runs the real vLLM engine on one model folder; started by tests/test_vllm.py with .venv-vllm/bin/python.

    python tests/vllm_driver.py SPEC.json OUT.json

SPEC: {"model": DIR, "prompts": [[token ids], ...], "max_tokens": 32, "tp": 1, "max_model_len": 512,
       "hf_overrides": {...} (optional)}
OUT:  {"ok": true, "tokens": [[...]], "prompt_logprobs": [[float per prompt token after the first]],
       "num_gpu_blocks": int, "block_size": int, "model_class": str, "attention_modules": int}
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
    open(out_path, "w").write(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
