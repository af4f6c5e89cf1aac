"""vLLM plugin: serve HARP checkpoints (``harp.save`` folders) in vLLM, tensor-parallel.

Installed with ``pip install "harp-prune[vllm]"``; vLLM finds it through the ``vllm.general_plugins``
entry point ``harp = harp.vllm_plugin:register`` and calls :func:`register` in every process it
starts (API server, engine core, tensor-parallel workers).

How a checkpoint reaches the plugin: a HARP checkpoint's ``config.json`` names its base class
(``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...) and carries a ``harp`` block. The plugin registers,
under those base names, thin subclasses of vLLM's own classes that look at the config: a config with
pruned layers in its ``harp`` block gets the HARP model (:mod:`harp.vllm_plugin.models`), any other
config gets vLLM's own model, unchanged. So ``vllm serve DIR`` works on a ``harp.save`` folder as it
is. Set ``HARP_VLLM_OVERRIDE=0`` to leave vLLM's built-in names alone; the HARP classes are then
reached explicitly with ``--hf-overrides '{"architectures": ["HarpLlamaForCausalLM"]}'`` (or
``HarpMistral…``, ``HarpQwen2…``, ``HarpQwen3…``, ``HarpGemma…``, ``HarpGemma2…``, ``HarpGemma3…``).

This module imports nothing from vLLM at import time (registration is lazy, by class path).
"""

from __future__ import annotations

import os

_MODELS = "harp.vllm_plugin.models"

# explicit HARP architecture names -> class in harp.vllm_plugin.models
HARP_ARCHITECTURES = {
    "HarpLlamaForCausalLM": "HarpLlamaForCausalLM",
    "HarpMistralForCausalLM": "HarpMistralForCausalLM",
    "HarpQwen2ForCausalLM": "HarpQwen2ForCausalLM",
    "HarpQwen3ForCausalLM": "HarpQwen3ForCausalLM",
    "HarpGemmaForCausalLM": "HarpGemmaForCausalLM",
    "HarpGemma2ForCausalLM": "HarpGemma2ForCausalLM",
    "HarpGemma3ForCausalLM": "HarpGemma3ForCausalLM",
}

# vLLM's built-in names a harp.save folder carries -> dispatching subclass (vLLM's own model unless the
# config has pruned layers).
BUILTIN_OVERRIDES = {
    "LlamaForCausalLM": "LlamaOrHarp",
    "MistralForCausalLM": "MistralOrHarp",
    "Qwen2ForCausalLM": "Qwen2OrHarp",
    "Qwen3ForCausalLM": "Qwen3OrHarp",
    "GemmaForCausalLM": "GemmaOrHarp",
    "Gemma2ForCausalLM": "Gemma2OrHarp",
    "Gemma3ForCausalLM": "Gemma3OrHarp",
}


def overrides_enabled() -> bool:
    return os.environ.get("HARP_VLLM_OVERRIDE", "1").strip().lower() not in ("0", "false", "no", "off")


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group (safe to call more than once)."""
    from vllm import ModelRegistry

    for arch, cls in HARP_ARCHITECTURES.items():
        ModelRegistry.register_model(arch, f"{_MODELS}:{cls}")
    if overrides_enabled():
        for arch, cls in BUILTIN_OVERRIDES.items():
            ModelRegistry.register_model(arch, f"{_MODELS}:{cls}")
