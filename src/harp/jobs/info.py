"""What a HARP checkpoint is — which layers, which alphas, how it was made — read without its weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harp.model.accounting import kv_savings, kv_savings_text
from harp.model.checkpoint import RECIPE_FILE, check_complete, read_config
from harp.model.configs import config_from_dict


def describe(path: str | Path) -> dict[str, Any]:
    """A dict describing a checkpoint folder (no weights are loaded). A damaged folder (truncated weights,
    a malformed harp block, a half-written save) is an error naming the file, not a description."""
    path = Path(path)
    cfg = read_config(path)
    check_complete(path, cfg)
    harp_block = cfg.get("harp") or {}
    info: dict[str, Any] = {
        "path": str(path),
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "model_type": cfg.get("model_type"),
        "num_layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "harp": harp_block,
        "weights_bytes": sum(p.stat().st_size for p in path.glob("*.safetensors")),
    }
    if harp_block:
        try:
            info["kv_savings"] = kv_savings(config_from_dict(cfg), None)
        except (TypeError, ValueError, KeyError):
            pass
    for name in (RECIPE_FILE, "harp_summary.json"):
        f = path / name
        if f.is_file():
            info[name.removesuffix(".json")] = json.loads(f.read_text())
    return info


def kv_text(path: str | Path) -> str:
    """The KV saving at the contexts every command states it at (2,048 tokens and the model's maximum)."""
    try:
        cfg = config_from_dict(read_config(path))
        dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32"
        return kv_savings_text(kv_savings(cfg, None, dtype=str(dtype).removeprefix("torch.")))
    except (TypeError, ValueError, KeyError):
        return "KV figures unavailable for this config"
