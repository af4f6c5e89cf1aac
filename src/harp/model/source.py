"""What a `model` argument is, resolved once: the bundled default, a folder, a .gguf or a hub id
(`resolve`), and, without reading tensor data, its config, its HARP block and whether its files are whole
(`inspect_model`): a GGUF's header (metadata and tensor table) against the file's size, safetensors
headers against their lengths, a checkpoint's `harp` block field by field. The loaders
(`harp.model.load`), the streamed engine, the exports, the benchmark and the commands' preflight all take
a `ModelSource` from here, so a `model` argument means the same thing, and a damaged file is the same error
naming the file, whichever way it is reached.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harp.model.checkpoint import check_complete, check_harp_block
from harp.model.configs import PRESETS, config_from_dict, preset_key
from harp.model.files import read_gguf_header, read_json_config
from harp.model.prune import check_k
from harp.util.problems import Collector

DEFAULT_MODEL = "smollm2-135m"

KINDS = ("default", "folder", "gguf", "hub")


@dataclass
class ModelSource:
    """A `model` argument, classified: `kind` is default | folder | gguf | hub; `path` the folder or .gguf
    (None for the default and a hub id); `source` its name (DEFAULT_MODEL for the default, else the argument);
    `arg` the argument as given. `config` and `harp` are filled by `inspect_model` (a hub id's config is not
    knowable offline: None)."""

    source: str | None
    kind: str
    path: Path | None
    config: dict[str, Any] | None = None  # None: not read (`resolve`) or not knowable offline (a hub id)
    harp: tuple[list[int], list[float]] | None = None
    arg: str | None = None

    @property
    def num_layers(self) -> int | None:
        return _positive_int((self.config or {}).get("num_hidden_layers"))

    @property
    def max_positions(self) -> int | None:
        return _positive_int((self.config or {}).get("max_position_embeddings"))

    @property
    def is_pruned(self) -> bool:
        return self.harp is not None

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"

    @property
    def label(self) -> str:
        """The argument as given (the name a loaded model records as `harp_source`); DEFAULT_MODEL for None."""
        return self.arg if self.arg is not None else DEFAULT_MODEL


ModelInfo = ModelSource  # the name the jobs' preflight uses for an inspected source


def _positive_int(n: Any) -> int | None:
    return int(n) if isinstance(n, int) and not isinstance(n, bool) else None


ModelArg = ModelSource | str | os.PathLike[str] | None


def is_default_model(source: ModelArg) -> bool:
    """Whether `source` names the bundled default model (None, "default", "smollm2", ...: `configs.ALIASES`)."""
    if isinstance(source, ModelSource):
        return source.kind == "default"
    return source is None or preset_key(str(source)) == DEFAULT_MODEL


def hub_id(source: str | os.PathLike[str]) -> str:
    """`source`, which is no file or folder here, as a hub id (org/name); FileNotFoundError if it is not one."""
    s = str(source)
    if not _looks_like_hub_id(s) or s.endswith(".gguf"):
        raise FileNotFoundError(
            f"Model {s!r} not found: no such file or folder, and it is not a hub id (org/name). "
            f"Use `model={DEFAULT_MODEL}` for the bundled default, a local folder, or a .gguf file."
        )
    return s


def _looks_like_hub_id(s: str) -> bool:
    return not s.startswith((".", "/", "~")) and s.count("/") == 1


def resolve(source: ModelArg) -> ModelSource:
    """Classify a `model` argument (the one place that does): the bundled default (an alias in
    `configs.ALIASES`, or None), a model folder (a folder with config.json, or that config.json), a .gguf
    file, else a hub id. Reads nothing but the file system's entries; a ModelSource is returned as it is.
    Raises ValueError for a file that is no .gguf and a folder without config.json, FileNotFoundError for
    a path that does not exist and is no hub id."""
    if isinstance(source, ModelSource):
        return source
    arg = None if source is None else str(source)
    if is_default_model(source):
        return ModelSource(DEFAULT_MODEL, "default", None, arg=arg)
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix == ".gguf":
            return ModelSource(arg, "gguf", p, arg=arg)
        if p.name != "config.json":
            raise ValueError(f"{p} is a file but not a .gguf: pass a model folder, a .gguf file or a hub id.")
        p = p.parent
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"{p} is a folder without config.json: it is not a transformers model folder.")
        return ModelSource(arg, "folder", p, arg=arg)
    return ModelSource(hub_id(source), "hub", None, arg=arg)


def inspect_model(source: ModelArg, check_weights: bool = True) -> ModelSource:
    """What a `model` argument is (`resolve`), with its config and HARP block, its files checked complete.
    Raises Problems / ValueError / FileNotFoundError naming the file. Reads no tensor data."""
    ms = resolve(source)
    if ms.kind == "default":
        ms.config = dict(PRESETS[DEFAULT_MODEL])
    elif ms.kind == "gguf":
        assert ms.path is not None
        ms.config = read_gguf_header(ms.path).config()
    elif ms.kind == "folder":
        assert ms.path is not None
        ms.config, ms.harp = _read_folder(ms.path, check_weights)
    return ms


def _read_folder(path: Path, check_weights: bool) -> tuple[dict[str, Any], tuple[list[int], list[float]] | None]:
    """A model folder's config.json and HARP block, checked (and its weight files, with `check_weights`)."""
    cfg_file = path / "config.json"
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
        problems.run(check_complete, path, cfg)
    problems.raise_if_any()
    return cfg, harp


def load_config(spec: str | os.PathLike[str] | None) -> Any:
    """A transformers config from a preset name (smollm2-135m, llama-3.1-8b, llama-3.1-70b, or an alias), a
    config JSON file, a model folder, or (online) a hub id. Never reads weights."""
    name = DEFAULT_MODEL if spec is None else str(spec)
    key = preset_key(name)
    if key is not None:
        return config_from_dict(PRESETS[key])
    p = Path(name).expanduser()
    if p.is_file() and p.suffix != ".gguf":  # any JSON file (the planner reads loose config files)
        return config_from_dict(_read_config_file(p))
    try:
        ms = resolve(name)
    except (FileNotFoundError, ValueError):  # no such path (and no hub id), a folder without config.json
        ms = None
    if ms is not None and ms.kind == "gguf":
        raise ValueError(f"{p} is a GGUF file: pass the config.json of the model (or a preset: {', '.join(PRESETS)}).")
    if ms is not None and ms.kind == "folder":
        assert ms.path is not None
        return config_from_dict(_read_config_file(ms.path / "config.json"))
    if ms is not None and ms.kind == "hub":
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(ms.source)
        except (OSError, ValueError):
            raise FileNotFoundError(
                f"Could not get the config of {name!r} (offline?). Pass a config.json path, a model folder, or "
                f"a preset: {', '.join(PRESETS)}."
            ) from None
    raise FileNotFoundError(
        f"No config at {name!r}: pass a config.json file, a model folder, a hub id, or a preset: {', '.join(PRESETS)}."
    )


def _read_config_file(p: Path) -> dict[str, Any]:
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{p} is not a JSON config file.") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p} is not a JSON config file.")
    return d


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
