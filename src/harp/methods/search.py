"""HARP's alpha search (docs/method.md): greedy, top layer first, over a grid, minimising
calibration perplexity — in the cached form.

While layer l is searched every layer below it is still the original model, so the residual stream
entering the searched block never changes: one forward of the original model caches it (and the
per-layer arguments the decoder layers receive: masks, rotary tables), and each candidate alpha
runs only layers l..L-1, the final norm and the LM head. The naive form (a full forward per
candidate) is kept as the test oracle and the benchmark baseline.

The search is resumable: with a `state_path` it writes its progress after every layer; rerun with
the same arguments it continues where it stopped and ends with the same alphas.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harp.engine.perplexity import perplexity
from harp.engine.replay import Batch, Prepare, capture_inputs, run_layers, tail_nll
from harp.engine.streamed import ACTIVATIONS, StreamedModel, activation_store
from harp.model.prune import check_k, refuse_pruned, temporarily_pruned
from harp.modeling import LinearMap, arch_for, get_module, layer_indices
from harp.util.digest import tensor_digest
from harp.util.fsio import StateMismatch, read_state, write_json_atomic
from harp.util.problems import Collector
from harp.util.progress import Progress

DEFAULT_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
STATE_VERSION = 1


@dataclass
class SearchResult:
    layers: list[int]  # searched layers, top first (search order)
    alphas: list[float]  # chosen alpha per layer, same order
    log: list[dict[str, float]]  # every (layer, alpha, ppl) evaluated, in order
    calib_tokens: int
    method: str
    seconds: float
    layer_forwards: int  # decoder-layer passes over the whole calibration set, this run
    head_evals: int
    resumed_layers: int = 0
    grid: list[float] = field(default_factory=list)

    @property
    def final_ppl(self) -> float:
        """Calibration perplexity with every searched layer pruned at its chosen alpha."""
        return min(e["ppl"] for e in self.log if e["layer"] == self.layers[-1])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["final_calib_ppl"] = self.final_ppl
        return d


MAX_GRID = 1000  # candidates per layer: each one is a pass of the searched layers over the calibration set


def parse_grid(spec: str | Sequence[float] | None) -> list[float]:
    """A grid from a list, 'a,b,c', or 'start:stop:step' (inclusive). Default 0.0..1.0 step 0.1.
    At most MAX_GRID distinct finite values; errors name what is wrong (stop < start, step <= 0, ...)."""
    if spec is None:
        return list(DEFAULT_GRID)
    usage = "use 'a,b,c' or 'start:stop:step' (e.g. 0:1:0.1)"
    if isinstance(spec, str):
        s = spec.strip()
        if ":" in s:
            parts = s.split(":")
            try:
                if len(parts) != 3:
                    raise ValueError
                start, stop, step = (float(x) for x in parts)
            except ValueError:
                raise ValueError(f"Bad grid {spec!r}: {usage}.") from None
            if not all(math.isfinite(v) for v in (start, stop, step)):
                raise ValueError(f"Bad grid {spec!r}: start, stop and step must be finite numbers.")
            if step <= 0:
                raise ValueError(f"Bad grid {spec!r}: step {step:g} must be > 0.")
            if stop < start:
                raise ValueError(f"Bad grid {spec!r}: stop {stop:g} < start {start:g} (the grid runs upwards: "
                                 f"write {stop:g}:{start:g}:{step:g}).")
            span = (stop - start) / step + 1e-9  # inf for a step that is denormal-small
            if not math.isfinite(span) or span + 1 > MAX_GRID:
                count = f"{int(span) + 1:,}" if math.isfinite(span) else "unboundedly many"
                raise ValueError(f"Bad grid {spec!r}: {count} candidates per layer (at most {MAX_GRID:,}; each "
                                 "costs a pass over the calibration set): use a larger step.")
            n = int(math.floor(span)) + 1
            vals = [round(start + i * step, 10) for i in range(n)]
        else:
            try:
                vals = [float(x) for x in s.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f"Bad grid {spec!r}: {usage}.") from None
    else:
        try:
            vals = [float(x) for x in spec]
        except (TypeError, ValueError):
            raise ValueError(f"Bad grid {spec!r}: give numbers.") from None
    if not vals:
        raise ValueError(f"Bad grid {spec!r}: no values; {usage}.")
    bad = [v for v in vals if not math.isfinite(v)]
    if bad:
        raise ValueError(f"Bad grid {spec!r}: {bad[0]} is not a finite number.")
    out = sorted(set(vals))
    if len(out) > MAX_GRID:
        raise ValueError(f"Bad grid {spec!r}: {len(out):,} candidates per layer (at most {MAX_GRID:,}).")
    return out


def top_layers(num_layers: int, k: int) -> list[int]:
    """The top k decoder layers, top first. Raises for k outside 1..num_layers."""
    check_k(k, num_layers)
    return list(range(num_layers - 1, num_layers - 1 - k, -1))


# ------------------------------------------------------------------------------------------------
# Resumable state
# ------------------------------------------------------------------------------------------------








def fingerprint(
    model: nn.Module,
    windows: torch.Tensor,
    order: list[int],
    grid: list[float],
    method: str,
    digest: Callable[[str, torch.Tensor], float] | None = None,
    maps: Mapping[int, LinearMap] | None = None,
) -> str:
    """What makes two searches the same search: model weights/config, calibration tokens, layers, grid.

    `digest(name, tensor)` gives the float64 sum of a state-dict entry (default `tensor_digest`); the
    streamed search reads the entries that are not resident from disk, so both agree on a model."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    cfg.pop("harp", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    digest = digest or (lambda name, p: tensor_digest(p))
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items())[:: max(1, len(model.state_dict()) // 16)]:
            h.update(name.encode())
            h.update(repr(digest(name, p)).encode())
    h.update(windows.cpu().numpy().tobytes())
    h.update(json.dumps({"order": order, "grid": grid}).encode())
    for i, m in sorted((maps or {}).items()):  # a scale search on fitted maps is another search
        h.update(repr((i, tensor_digest(m.weight), None if m.bias is None else tensor_digest(m.bias))).encode())
    return h.hexdigest()


def _read_state(path: Path, fp: str) -> dict[str, Any] | None:
    try:
        return read_state(path, STATE_VERSION, fp)
    except StateMismatch as e:
        if e.damaged:
            raise ValueError(f"{path} (the saved progress of an interrupted search) is damaged: it is not JSON. "
                             "Delete it to start the search over.") from None
        raise ValueError(
            f"{path} holds the progress of a different search (other model, calibration text, layers or "
            "grid). Delete it to start over, or rerun with the original arguments to resume it."
        ) from None


# ------------------------------------------------------------------------------------------------
# The search
# ------------------------------------------------------------------------------------------------


@dataclass
class StreamHooks:
    """How a cached search gets and keeps its residual stream, and fingerprints its weights. All None: the
    in-memory search. The streamed search (`harp.streaming`) sets them: `prepare(lo, bar)` supplies the
    cached batches (and the decoder-layer passes they cost) instead of a forward of the whole model,
    `keep(t)` stores each cached hidden state (e.g. on the CPU or memory-mapped on disk), `digest(name, t)`
    fingerprints weights that are not resident."""

    prepare: Prepare | None = None
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None
    digest: Callable[[str, torch.Tensor], float] | None = None

    def store(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.keep is None else self.keep(t)


@dataclass
class _SearchState:
    """The resumable part of a search: the alphas fixed so far and the log, saved after every layer."""

    order: list[int]
    grid: list[float]
    method: str
    state_file: Path | None
    fingerprint: str
    fixed_layers: list[int]
    fixed_alphas: list[float]
    log: list[dict[str, float]]
    resumed: int

    @classmethod
    def resume(cls, state_file: Path | None, fp: str, order: list[int], grid: list[float],
               method: str) -> _SearchState:
        """The progress saved in `state_file` for this search (fingerprint `fp`), or a fresh start."""
        state = _read_state(state_file, fp) if state_file else None
        done: list[tuple[int, float]] = [(d["layer"], d["alpha"]) for d in (state or {}).get("done", [])]
        log: list[dict[str, float]] = list((state or {}).get("log", []))
        return cls(order, grid, method, state_file, fp, [layer for layer, _ in done], [alpha for _, alpha in done],
                   log, resumed=len(done))

    @property
    def remaining(self) -> list[int]:
        return self.order[len(self.fixed_layers) :]

    def fix(self, layer: int, alpha: float) -> None:
        """Fix `layer` at `alpha` and save the progress."""
        self.fixed_layers.append(layer)
        self.fixed_alphas.append(alpha)
        self.save()

    def save(self) -> None:
        if self.state_file is None:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            self.state_file,
            {
                "version": STATE_VERSION,
                "fingerprint": self.fingerprint,
                "order": self.order,
                "grid": self.grid,
                "method": self.method,
                "done": [{"layer": a, "alpha": b} for a, b in zip(self.fixed_layers, self.fixed_alphas, strict=True)],
                "log": self.log,
            },
        )


@dataclass
class _Scorer:
    """Calibration perplexity of one candidate pruning — cached (layers from the candidate's up, on the
    cached residual stream) or naive (a full forward) — counting decoder-layer passes and head evaluations."""

    model: nn.Module
    windows: torch.Tensor
    method: str
    batch_size: int
    chunk_tokens: int
    maps: Mapping[int, LinearMap] | None
    hooks: StreamHooks
    num_layers: int
    n_tokens: int
    lo: int = 0
    batches: list[Batch] = field(default_factory=list)
    layer_forwards: int = 0
    head_evals: int = 0

    def cache_stream(self, state: _SearchState, bar: Progress) -> None:
        """Cache the stream entering the lowest searched layer, the layers fixed so far pruned (cached method)."""
        self.lo = state.order[-1]
        if self.method != "cached" or not state.remaining:
            return
        bar.describe("caching the residual stream")
        if self.hooks.prepare is None:
            with temporarily_pruned(self.model, state.fixed_layers, state.fixed_alphas, self.maps):
                self.batches = capture_inputs(self.model, self.windows, self.lo, self.batch_size)
            self.layer_forwards += self.num_layers - 1  # one original forward (it stops before the top layer)
        else:
            self.batches, passes = self.hooks.prepare(self.lo, bar)
            self.layer_forwards += passes

    def layer_inputs(self, layer: int) -> list[torch.Tensor]:
        """The input of `layer` per cached batch: everything below it is still original."""
        if self.method != "cached":
            return []
        lo = self.lo
        entry = [b.hidden if layer == lo else self.hooks.store(run_layers(self.model, b, b.hidden, lo, layer))
                 for b in self.batches]
        self.layer_forwards += layer - lo
        return entry

    def ppl(self, layer: int, entry: list[torch.Tensor], layers: list[int], alphas: list[float]) -> float:
        """Calibration perplexity with `layers` pruned at `alphas`; `layer` is the lowest of them."""
        with temporarily_pruned(self.model, layers, alphas, self.maps):
            if self.method == "cached":
                pairs = zip(self.batches, entry, strict=True)
                nll = sum(tail_nll(self.model, b, h, layer, self.chunk_tokens) for b, h in pairs)
                self.layer_forwards += self.num_layers - layer
                self.head_evals += 1
                return math.exp(nll / self.n_tokens)
            ppl = perplexity(self.model, self.windows, batch_size=self.batch_size, chunk_tokens=self.chunk_tokens).ppl
            self.layer_forwards += self.num_layers
            self.head_evals += 1
            return ppl


def _search_order(model: nn.Module, layers: int | Sequence[int]) -> tuple[int, list[int]]:
    """The model's layer count and the layers to search, top first; raises for a pruned model or bad layers."""
    num = len(get_module(model, arch_for(model.config).layers))
    refuse_pruned(model, "This model is already HARP-pruned; search alphas on the original model.")
    if isinstance(layers, int):
        return num, top_layers(num, layers)
    order = sorted(layer_indices(list(layers), num), reverse=True)
    if not order:
        raise ValueError(f"Layers {list(layers)} out of range: this model has layers 0..{num - 1}.")
    return num, order


def _search_layer(scorer: _Scorer, state: _SearchState, layer: int, bar: Progress) -> float:
    """Every grid alpha for `layer` (the layers above it fixed), each logged; the best one (ties: the smaller)."""
    entry = scorer.layer_inputs(layer)
    scores: list[tuple[float, float]] = []
    for alpha in state.grid:
        bar.describe(f"layer {layer}  alpha {alpha:g}")
        ppl = scorer.ppl(layer, entry, state.fixed_layers + [layer], state.fixed_alphas + [alpha])
        scores.append((ppl, alpha))
        state.log.append({"layer": layer, "alpha": alpha, "ppl": ppl})
        bar.advance(1)
    _, best_alpha = min(scores)  # ties -> the smaller alpha
    return best_alpha


def search_alphas(
    model: nn.Module,
    windows: torch.Tensor,
    layers: int | Sequence[int] = 8,
    *,
    grid: str | Sequence[float] | None = None,
    method: str = "cached",
    batch_size: int = 4,
    chunk_tokens: int = 1024,
    state_path: str | Path | None = None,
    progress: bool = False,
    callback: Callable[[int, float, list[dict[str, float]]], None] | None = None,
    prepare: Prepare | None = None,
    keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
    digest: Callable[[str, torch.Tensor], float] | None = None,
    maps: Mapping[int, LinearMap] | None = None,
) -> SearchResult:
    """Find HARP's alphas by greedy top-down search over `grid`, minimising calibration perplexity.

    Args:
        model: an unpruned transformers causal LM (it is left unchanged on return).
        windows: calibration token windows (N, S), e.g. from `harp.text.calibration_windows`.
        layers: k (the top k layers) or explicit layer indices; searched from the highest down.
        grid: candidate alphas (default 0.0..1.0 step 0.1).
        method: "cached" (docs/method.md, cached residual stream) or "naive" (full forward per
            candidate; the reference).
        state_path: JSON file to write progress to after each layer, and to resume from.
        callback: called as callback(layer, alpha, log) after each layer is fixed.
        maps: fitted output maps per layer (`harp.fit_layers`): alpha scales them instead of `W_O R`.
        prepare, keep, digest: for the streamed search (`harp.streaming`): `prepare(lo, bar)` supplies
            the cached batches instead of a forward of the whole model, `keep(t)` stores each cached
            hidden state (e.g. on the CPU or memory-mapped on disk), `digest` fingerprints weights that
            are not resident.

    Returns the layers (top first), their alphas, and the log of every (layer, alpha, ppl) tried.
    """
    num, order = _search_order(model, layers)
    if method not in ("cached", "naive"):
        raise ValueError(f"Unknown search method {method!r}: use 'cached' or 'naive'.")
    grid_vals = parse_grid(grid)
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError("Calibration windows must be a (N, seq_len) tensor with N >= 1 and seq_len >= 2.")
    n_tokens = windows.shape[0] * (windows.shape[1] - 1)
    hooks = StreamHooks(prepare, keep, digest)

    state_file = Path(state_path) if state_path is not None else None
    fp = fingerprint(model, windows, order, grid_vals, method, digest, maps) if state_file else ""
    state = _SearchState.resume(state_file, fp, order, grid_vals, method)
    scorer = _Scorer(model, windows, method, batch_size, chunk_tokens, maps, hooks, num, n_tokens)

    t0 = time.perf_counter()
    remaining = state.remaining
    with Progress(len(remaining) * len(grid_vals), "alpha search", enabled=progress) as bar:
        scorer.cache_stream(state, bar)
        for layer in remaining:
            best_alpha = _search_layer(scorer, state, layer, bar)
            state.fix(layer, best_alpha)
            if callback is not None:
                callback(layer, best_alpha, state.log)

    return SearchResult(
        layers=list(order),
        alphas=list(state.fixed_alphas),
        log=state.log,
        calib_tokens=n_tokens,
        method=method,
        seconds=time.perf_counter() - t0,
        layer_forwards=scorer.layer_forwards,
        head_evals=scorer.head_evals,
        resumed_layers=state.resumed,
        grid=grid_vals,
    )


def ideal_layer_forwards(num_layers: int, k: int, grid_size: int, method: str = "cached") -> int:
    """Layer-forward count (docs/method.md) for the top k layers: cached = G * k(k+1)/2 candidate
    passes + one original forward (L - 1 layers) + k(k-1)/2 to rebuild each layer's input;
    naive = G * k * L."""
    if method == "naive":
        return grid_size * k * num_layers
    return grid_size * k * (k + 1) // 2 + (num_layers - 1) + k * (k - 1) // 2


def streamed_search(
    source: str | os.PathLike[str] | None,
    windows: torch.Tensor,
    layers: int | Sequence[int] = 8,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device | None = "cpu",
    activations: str = "device",
    spill_dir: str | os.PathLike[str] | None = None,
    attn_implementation: str | None = None,
    grid: str | Sequence[float] | None = None,
    batch_size: int = 4,
    chunk_tokens: int = 1024,
    state_path: str | Path | None = None,
    progress: bool = False,
    callback: Callable[[int, float, list[dict[str, float]]], None] | None = None,
    model: StreamedModel | None = None,
) -> SearchResult:
    """HARP's greedy top-down alpha search on a model that stays on disk (a safetensors folder).

    Same arguments and result as `harp.search_alphas` (method "cached"; `result.method` is "streamed"),
    plus where the model runs (`device`, `dtype`) and where the calibration activations are kept
    (`activations`: "device", "cpu", or "disk" memory-mapped under `spill_dir`). Peak memory is the
    searched layers, the final norm and the LM head, plus the activations; not the whole model.
    A `state_path` written by an in-memory search of the same model resumes here, and vice versa.
    """
    if activations not in ACTIVATIONS:
        raise ValueError(f"Unknown activations place {activations!r}: use one of {', '.join(ACTIVATIONS)}.")
    sm = model or StreamedModel(source, dtype=dtype, device=device, attn_implementation=attn_implementation)
    with activation_store(activations, sm.device, spill_dir) as keep:
        result = search_alphas(
            sm.model, windows, layers, grid=grid, method="cached", batch_size=batch_size, chunk_tokens=chunk_tokens,
            state_path=state_path, progress=progress, callback=callback,
            prepare=lambda lo, bar: sm.capture(windows, lo, batch_size, bar, keep),
            keep=keep, digest=sm.digest,
        )
    result.method = "streamed"
    return result


def check_grid(spec: Any, out: Collector) -> list[float] | None:

    return out.run(parse_grid, spec)


def check_search_state(state: Path, order: list[int] | None, grid: list[float] | None, out: Collector) -> None:
    """A resumable search's state file next to `out`: readable, of this harp, and for these layers/grid."""

    if not state.exists():
        return
    way_out = f"delete {state} to start the search over"
    try:
        d = json.loads(state.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        out.add(f"{state} (the saved progress of an interrupted search) is damaged: not valid JSON; {way_out}.")
        return
    if not isinstance(d, dict) or d.get("version") != STATE_VERSION or not isinstance(d.get("done"), list):
        version = d.get("version") if isinstance(d, dict) else "?"
        out.add(f"{state} is not a search state this harp wrote (version {version}, this harp writes "
                f"{STATE_VERSION}); {way_out}.")
        return
    if order is not None and d.get("order") is not None and list(d["order"]) != list(order):
        out.add(f"{state} holds the progress of a different search (layers {d['order']}, this run searches {order}); "
                f"{way_out}, or rerun with the original arguments to resume it.")
    elif grid is not None and d.get("grid") is not None and [float(x) for x in d["grid"]] != list(grid):
        out.add(f"{state} holds the progress of a search over another grid ({d['grid']}); {way_out}, or rerun with "
                "the original `grid` to resume it.")
