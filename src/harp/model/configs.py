"""Model configs without weights: public presets (offline), their names, and config dicts as transformers
configs. `harp.model.source.load_config` reads a `model` argument's config."""

from __future__ import annotations

from typing import Any

from harp.modeling import arch_for

# Public config values (config.json of each model), so `harp plan` works offline for these names.
_LLAMA31 = dict(
    model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False, vocab_size=128256,
    max_position_embeddings=131072, head_dim=128, attention_bias=False, mlp_bias=False,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)


PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
    "llama-3.1-8b": dict(_LLAMA31, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=14336),
    "llama-3.1-70b": dict(_LLAMA31, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, intermediate_size=28672),
}


# The one alias table of `model` arguments: other names of the presets. The names that lead to
# "smollm2-135m" (with it) name the bundled default model (`harp.model.source.DEFAULT_MODEL`).
ALIASES = {"default": "smollm2-135m", "smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m",
           "meta-llama/llama-3.1-8b": "llama-3.1-8b", "meta-llama/llama-3.1-70b": "llama-3.1-70b",
           "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b", "meta-llama/llama-3.1-70b-instruct": "llama-3.1-70b"}


def preset_key(name: str) -> str | None:
    """The preset (a key of PRESETS) that `name` or one of its aliases names, case-insensitively; else None."""
    key = ALIASES.get(name.lower(), name.lower())
    return key if key in PRESETS else None


def config_from_dict(d: dict[str, Any]) -> Any:
    from transformers import CONFIG_MAPPING

    model_type = d.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"config has model_type {model_type!r}, which transformers does not know.")
    cfg = CONFIG_MAPPING[model_type].from_dict({k: v for k, v in d.items() if k != "model_type"})
    arch_for(cfg)  # a clear error for families harp does not support
    return cfg
