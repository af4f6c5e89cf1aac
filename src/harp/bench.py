"""`harp bench`: measure how much faster and lighter a HARP-pruned model is than its original.

Method (what the numbers mean):

* Both models live in one process and are measured **interleaved**: for every context length, after
  `warmup` unmeasured rounds, each of `repeats` rounds (more if `min_seconds` asks for it) measures
  the original (A) and the pruned model (B) on the same tokens. The pruned/original ratio is
  computed within each round, so a slow moment of the machine hits both sides of a pair; medians,
  min-max and a bootstrap 95 % interval of the median ratio are reported.
* `timing="lockstep"` (default) interleaves at the finest grain that keeps each model's own
  computation intact: the two prefills run in two threads that hand the CPU to each other at every
  attention and MLP sub-layer (A's embedding, B's embedding, A's layer-0 attention, B's layer-0
  attention, ...), never running at the same time; each model's time is the sum of its own
  segments. Shared 2-core machines drift by tens of percent within seconds; a multi-second prefill
  of A and then of B sees different drifts, while 60 alternating segments of both see the same.
  Decode alternates step by step (A's step 1, B's step 1, ...). `timing="forward"` times whole
  forwards A then B instead, and also records process CPU time.
* Prefill: one forward of `n` tokens into an empty `DynamicCache`, logits for the last token only
  (`logits_to_keep=1`, as `generate` does).
* Decode: `new_tokens` greedy steps of one token each on that cache; throughput = new_tokens / time.
* KV-cache bytes: read from the cache object after the prefill (`harp.stats.kv_cache_bytes`).
* Bounds: `harp.flops` (HARP.md section 5): prefill FLOPs ratio, decode bytes-read ratio. The
  measured prefill saving `1 - t_pruned/t_orig` is reported as a fraction of the ideal saving
  `1 - 1/bound`.
* Memory: with `isolated_memory=True` each model is re-loaded in a fresh subprocess that runs every
  context once, so its peak RSS (ru_maxrss) belongs to that model alone. The process-wide peak of
  the benchmark itself (both models loaded) is always reported, and labelled as such.
"""

from __future__ import annotations

import gc
import inspect
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .flops import layer_kinds, speedup_bounds
from .modeling import arch_for, decoder_layers, get_module
from .stats import count_parameters, kv_cache_bytes

RESULT_VERSION = 1
JSON_NAME = "bench.json"
PLOT_NAME = "bench.png"
TABLE_NAME = "bench.md"
_PROBE_MARK = "HARP_BENCH_PROBE "
TIMINGS = ("lockstep", "forward")
MAX_ROUNDS = 200  # cap on rounds per context when min_seconds asks for more than `repeats`

ModelLike = nn.Module | str | os.PathLike | None  # None: the bundled default model


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def parse_contexts(spec: str | Iterable[int]) -> list[int]:
    """'256,512,1024' (or a list of ints) -> sorted distinct positive context lengths."""
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("No context lengths given: pass e.g. --context 256,512,1024.")
    out: list[int] = []
    for s in items:
        try:
            if isinstance(s, bool) or float(s) != int(s):
                raise ValueError
            n = int(s)
        except (TypeError, ValueError):
            raise ValueError(f"Context length {s!r} is not an integer (expected e.g. 256,512,1024).") from None
        if n < 1:
            raise ValueError(f"Context length {n} must be at least 1.")
        out.append(n)
    dup = sorted({n for n in out if out.count(n) > 1})
    if dup:
        raise ValueError(f"Context lengths must be distinct; repeated: {dup}.")
    return sorted(out)


def check_pair(orig: nn.Module, pruned: nn.Module, contexts: Sequence[int]) -> None:
    """Raise ValueError unless `pruned` is a HARP-pruned version of `orig`'s architecture and every
    context fits the model."""
    pc, oc = pruned.config, orig.config
    if not (getattr(pc, "harp", None) or {}).get("layers"):
        raise ValueError(
            "The pruned model has no HARP layers (config.harp is empty): pass a model pruned by harp.prune "
            "or a checkpoint written by harp.save / `harp prune`."
        )
    keys = (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "intermediate_size",
    )
    diff = {
        k: (getattr(oc, k, None), getattr(pc, k, None)) for k in keys if getattr(oc, k, None) != getattr(pc, k, None)
    }
    if diff:
        detail = ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in diff.items())
        raise ValueError(f"The pruned model is not a pruned version of the original model ({detail}).")
    impl = (getattr(oc, "_attn_implementation", None), getattr(pc, "_attn_implementation", None))
    if impl[0] != impl[1]:
        raise ValueError(
            f"The models use different attention implementations ({impl[0]} vs {impl[1]}); "
            "load both with the same attn_implementation so the comparison is like for like."
        )
    dtypes = {next(orig.parameters()).dtype, next(pruned.parameters()).dtype}
    if len(dtypes) != 1:
        raise ValueError(f"The models have different dtypes {sorted(map(str, dtypes))}; load both with the same dtype.")
    limit = getattr(oc, "max_position_embeddings", None)
    if limit is not None:
        too_long = [n for n in contexts if n > limit]
        if too_long:
            raise ValueError(
                f"Context length(s) {too_long} exceed this model's max_position_embeddings ({limit}); "
                f"use contexts up to {limit}."
            )


# --------------------------------------------------------------------------------------------
# Running a model
# --------------------------------------------------------------------------------------------


def _cache_kwarg(model: nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` (5.x); use whichever forward() takes."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _greedy_step(model: nn.Module, ids: torch.Tensor, cache: Any, kw: str, **kwargs: Any) -> torch.Tensor:
    """One forward of `ids` on `cache`; the greedy next token."""
    return model(input_ids=ids, use_cache=True, **{kw: cache}, **kwargs).logits[:, -1:].argmax(-1)


@torch.inference_mode()
def _prefill(model: nn.Module, ids: torch.Tensor, kw: str) -> tuple[float, float, Any, torch.Tensor]:
    """(wall s, process CPU s, cache, next token) of one prefill."""
    cache = _new_cache(model)
    c0, t0 = time.process_time(), time.perf_counter()
    token = _greedy_step(model, ids, cache, kw, logits_to_keep=1)
    return time.perf_counter() - t0, time.process_time() - c0, cache, token


@torch.inference_mode()
def _decode(model: nn.Module, cache: Any, token: torch.Tensor, steps: int, kw: str) -> tuple[float, float]:
    """(wall s, process CPU s) of `steps` greedy one-token steps."""
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        token = _greedy_step(model, token, cache, kw)
    return time.perf_counter() - t0, time.process_time() - c0


def _measure(model: nn.Module, ids: torch.Tensor, new_tokens: int, kw: str) -> dict[str, float | int]:
    """One prefill + decode, with the garbage collector paused so it cannot land inside a timing
    (callers run gc.collect() between contexts: a full collection can take half a second)."""
    gc.disable()
    try:
        t_pre, c_pre, cache, token = _prefill(model, ids, kw)
        kv = kv_cache_bytes(cache)
        t_dec, c_dec = _decode(model, cache, token, new_tokens, kw) if new_tokens > 0 else (0.0, 0.0)
    finally:
        gc.enable()
    del cache
    return {"prefill_s": t_pre, "prefill_cpu_s": c_pre, "decode_s": t_dec, "decode_cpu_s": c_dec, "kv_bytes": kv}


# --------------------------------------------------------------------------------------------
# Lockstep timing: both models' prefills in two threads that take turns, sub-layer by sub-layer
# --------------------------------------------------------------------------------------------


class _Baton:
    """Two threads, one runs at a time. `take(i)` waits for thread i's turn and starts its clock;
    `give(i)` stops the clock, adds the segment to `seconds[i]` and hands the turn over (for good if
    `done`). The hand-over itself (waking the other thread) is in nobody's time."""

    def __init__(self, first: int) -> None:
        self._cv = threading.Condition()
        self._turn = first
        self._done = [False, False]
        self._t0 = [0.0, 0.0]
        self.seconds = [0.0, 0.0]

    def take(self, i: int) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._turn == i or self._done[1 - i])
        self._t0[i] = time.perf_counter()

    def give(self, i: int, done: bool = False) -> None:
        self.seconds[i] += time.perf_counter() - self._t0[i]
        with self._cv:
            self._done[i] = self._done[i] or done
            self._turn = 1 - i
            self._cv.notify_all()


def _switch_points(model: nn.Module) -> list[nn.Module]:
    """Where lockstep timing hands over: the start of every attention and MLP sub-layer (a pruned
    layer keeps both modules, so the original and the pruned model have the same points)."""
    arch = arch_for(model.config)
    points: list[nn.Module] = []
    for layer in decoder_layers(model):
        points.append(get_module(layer, arch.attn))
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, nn.Module):
            points.append(mlp)
    return points


def _lockstep_prefill(
    models: tuple[nn.Module, nn.Module], ids: torch.Tensor, kws: tuple[str, str], first: int
) -> list[tuple[float, Any, torch.Tensor]]:
    """Prefill `ids` on both models in lockstep (see the module docstring); per model (wall seconds
    of its own segments, cache, next token). `first` says which model starts."""
    baton = _Baton(first)
    threads = torch.get_num_threads()
    out: list[Any] = [None, None]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        torch.set_num_threads(threads)  # a new thread may not inherit the setting
        baton.take(i)
        try:
            _, _, cache, token = _prefill(models[i], ids, kws[i])  # its own timings span both threads: unused
            out[i] = (cache, token)
        except BaseException as e:  # re-raised in the calling thread below
            errors.append(e)
        finally:
            baton.give(i, done=True)

    def hook(i: int) -> Callable[..., None]:
        def pre(_module: nn.Module, _args: Any) -> None:
            baton.give(i)
            baton.take(i)

        return pre

    handles = [p.register_forward_pre_hook(hook(i)) for i, m in enumerate(models) for p in _switch_points(m)]
    try:
        workers = [threading.Thread(target=run, args=(i,), name=f"harp-bench-{i}") for i in (0, 1)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        for h in handles:
            h.remove()
    if errors:
        raise errors[0]
    return [(baton.seconds[i], *out[i]) for i in (0, 1)]


@torch.inference_mode()
def _alternating_decode(
    models: tuple[nn.Module, nn.Module],
    state: list[tuple[Any, torch.Tensor]],
    steps: int,
    kws: tuple[str, str],
    first: int,
) -> list[float]:
    """`steps` greedy steps on both models, alternating step by step; wall seconds per model."""
    seconds = [0.0, 0.0]
    caches = [c for c, _ in state]
    tokens = [t for _, t in state]
    order = (first, 1 - first)
    for _ in range(steps):
        for i in order:
            t0 = time.perf_counter()
            tokens[i] = _greedy_step(models[i], tokens[i], caches[i], kws[i])
            seconds[i] += time.perf_counter() - t0
    return seconds


def _lockstep_round(
    a: nn.Module, b: nn.Module, ids: torch.Tensor, new_tokens: int, kws: tuple[str, str], first: int
) -> tuple[dict[str, float | int], dict[str, float | int]]:
    """One lockstep round (prefill, then decode) of both models, garbage collector paused."""
    gc.disable()
    try:
        pre = _lockstep_prefill((a, b), ids, kws, first)
        kv = [kv_cache_bytes(c) for _, c, _ in pre]
        dec = (
            _alternating_decode((a, b), [(c, t) for _, c, t in pre], new_tokens, kws, first)
            if new_tokens > 0
            else [0.0, 0.0]
        )
    finally:
        gc.enable()
    rows = [{"prefill_s": pre[i][0], "decode_s": dec[i], "kv_bytes": kv[i]} for i in (0, 1)]
    del pre
    return rows[0], rows[1]


def _tokens(vocab: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def _status_bytes(field: str) -> int | None:
    """A `Vm*` field of /proc/self/status in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _current_rss_bytes() -> int | None:
    return _status_bytes("VmRSS")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmHWM") is not None
    except OSError:
        return False


def _weights_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _load(source: ModelLike, dtype: Any, attn_implementation: str | None) -> tuple[nn.Module, str | None]:
    if isinstance(source, nn.Module):
        return source, getattr(source, "harp_source", None)
    from .models import load_model

    model, _ = load_model(source, dtype=dtype, attn_implementation=attn_implementation, with_tokenizer=False)
    return model, str(source)


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# --------------------------------------------------------------------------------------------
# Isolated peak-memory probe (a fresh process per model)
# --------------------------------------------------------------------------------------------


def probe_memory(
    source: str | os.PathLike,
    contexts: Sequence[int],
    new_tokens: int,
    *,
    dtype: str = "float32",
    threads: int | None = None,
    attn_implementation: str | None = None,
    seed: int = 0,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Load one model in a fresh Python process, run a prefill + decode at each context (ascending)
    and return its RSS after loading, its peak during loading, and per context its peak RSS while
    serving that context (bytes).

    On Linux the peak (VmHWM) is reset before each context, so loading's transient peak (which
    from_pretrained can push well above the serving peak) does not mask it; elsewhere the numbers
    are ru_maxrss, the process peak so far (`peak_method` says which)."""
    cmd = [
        sys.executable,
        "-m",
        "harp.bench",
        "--probe",
        str(source),
        "--contexts",
        ",".join(map(str, contexts)),
        "--new-tokens",
        str(new_tokens),
        "--dtype",
        dtype,
        "--seed",
        str(seed),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    if attn_implementation:
        cmd += ["--attn", attn_implementation]
    env = dict(os.environ)
    src_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(_PROBE_MARK):
            return json.loads(line[len(_PROBE_MARK) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"Memory probe for {source} failed (exit {proc.returncode}): " + " | ".join(tail))


def _probe_main(argv: Sequence[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m harp.bench", description="harp bench memory probe (internal)")
    ap.add_argument("--probe", required=True)
    ap.add_argument("--contexts", required=True)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--attn", default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    contexts = parse_contexts(a.contexts)
    model, _ = _load(a.probe, a.dtype, a.attn)
    kw = _cache_kwarg(model)
    out: dict[str, Any] = {
        "rss_after_load_bytes": _current_rss_bytes(),
        # VmHWM, not ru_maxrss: on Linux a child's ru_maxrss starts at its parent's RSS at fork time
        "peak_during_load_bytes": _status_bytes("VmHWM") or _peak_rss_bytes(),
        "weights_bytes": _weights_bytes(model),
        "peak_rss_bytes": {},
    }
    ids = _tokens(model.config.vocab_size, max(contexts), a.seed)
    resettable = True
    for n in contexts:
        gc.collect()
        resettable = resettable and _reset_peak_rss()
        _measure(model, ids[:, :n], a.new_tokens, kw)
        hwm = _status_bytes("VmHWM") if resettable else None
        out["peak_rss_bytes"][str(n)] = hwm if hwm is not None else _peak_rss_bytes()
    out["peak_method"] = (
        "VmHWM reset before each context (/proc/self/clear_refs): peak while serving that context"
        if resettable
        else "ru_maxrss: peak of the process so far, loading included (may include the parent's RSS at fork)"
    )
    print(_PROBE_MARK + json.dumps(out), flush=True)


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def run_bench(
    orig: ModelLike,
    pruned: ModelLike,
    contexts: Iterable[int] | str = (256, 512, 1024, 2048, 4096),
    *,
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    isolated_memory: bool = False,
    seed: int = 0,
    timing: str = "lockstep",
    min_seconds: float = 0.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark `pruned` against `orig` (models, or sources `harp.models.load_model` understands).

    Returns a JSON-serialisable dict: settings, environment, both models' structure, and per context
    the prefill times, decode throughput, pair-by-pair ratios, FLOP/bytes bounds, the measured
    saving as a fraction of the ideal one, KV-cache bytes and (with `isolated_memory`, which needs
    both models given as sources) each model's own peak RSS. See the module docstring.

    `timing`: "lockstep" (default) or "forward", see the module docstring. `min_seconds`: per
    context, keep adding rounds beyond `repeats` until the timed work of both models adds up to this
    many seconds (at most MAX_ROUNDS rounds) - cheap short contexts then get many rounds, long ones
    `repeats`.
    """
    ctx = parse_contexts(contexts)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {', '.join(TIMINGS)}; got {timing!r}.")
    if not min_seconds >= 0:
        raise ValueError(f"min_seconds must be 0 or more, got {min_seconds}.")
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more, got {warmup}.")
    if new_tokens < 0:
        raise ValueError(f"new_tokens must be 0 or more, got {new_tokens}.")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}.")
    if isolated_memory and (isinstance(orig, nn.Module) or isinstance(pruned, nn.Module)):
        raise ValueError("isolated_memory needs both models as sources (paths or names), not loaded models.")
    if orig is None:
        from .models import DEFAULT_MODEL

        orig = DEFAULT_MODEL
    if pruned is None:
        raise ValueError("No pruned model given: pass a HARP checkpoint folder or a model pruned by harp.prune.")
    if not isinstance(pruned, nn.Module):
        _check_pruned_source(pruned)
    say = progress or (lambda _msg: None)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        say("loading models")
        model_a, src_a = _load(orig, dtype, attn_implementation)
        model_b, src_b = _load(pruned, dtype, attn_implementation)
        check_pair(model_a, model_b, ctx)
        model_a.eval()
        model_b.eval()
        result = _run(model_a, model_b, ctx, new_tokens, repeats, warmup, seed, timing, min_seconds, say)
        result["models"]["original"]["source"] = src_a
        result["models"]["pruned"]["source"] = src_b
        if isolated_memory:
            for role, src in (("original", orig), ("pruned", pruned)):
                say(f"peak memory of the {role} model alone (fresh process)")
                probe = probe_memory(
                    str(src),
                    ctx,
                    new_tokens,
                    dtype=dtype,
                    threads=torch.get_num_threads(),
                    attn_implementation=attn_implementation,
                    seed=seed,
                )
                result["memory"]["isolated"][role] = probe
                for row in result["contexts"]:
                    row["peak_rss_bytes"][role] = probe["peak_rss_bytes"][str(row["context"])]
        result["memory"]["process_peak_rss_bytes"] = _peak_rss_bytes()
        result["environment"]["loadavg_end"] = _loadavg()
        return result
    finally:
        torch.set_num_threads(old_threads)


def _check_pruned_source(source: str | os.PathLike) -> None:
    from .checkpoint import read_config

    p = Path(source).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"Pruned model {source}: no such folder (expected a HARP checkpoint folder).")
    harp = read_config(p).get("harp")
    if not harp:
        raise ValueError(
            f"{p} is not a HARP checkpoint (its config.json has no 'harp' block): pass a folder written by "
            "`harp prune` or harp.save()."
        )
    if not harp.get("layers"):
        raise ValueError(f"{p} is a HARP checkpoint without pruned layers: there is nothing to compare.")


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _model_info(model: nn.Module) -> dict[str, Any]:
    cfg = model.config
    harp = getattr(cfg, "harp", None) or {}
    kinds = layer_kinds(cfg)
    return {
        "model_type": cfg.model_type,
        "class": type(model).__name__,
        "num_layers": cfg.num_hidden_layers,
        "harp_layers": list(harp.get("layers", [])),
        "harp_alphas": list(harp.get("alphas", [])),
        "layers_with_attention": kinds.count("attention"),
        "parameters": count_parameters(model),
        "weights_bytes": _weights_bytes(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
    }


def _run(
    a: nn.Module,
    b: nn.Module,
    ctx: list[int],
    new_tokens: int,
    repeats: int,
    warmup: int,
    seed: int,
    timing: str,
    min_seconds: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    cfg = a.config
    kw_a, kw_b = _cache_kwarg(a), _cache_kwarg(b)

    def one_round(x: torch.Tensor, r: int) -> tuple[dict[str, float | int], dict[str, float | int]]:
        if timing == "lockstep":  # who starts alternates from round to round
            return _lockstep_round(a, b, x, new_tokens, (kw_a, kw_b), first=r % 2)
        return _measure(a, x, new_tokens, kw_a), _measure(b, x, new_tokens, kw_b)

    plan_a = getattr(cfg, "harp", None) or {"layers": [], "alphas": []}
    plan_b = b.config.harp
    elem = next(a.parameters()).element_size()
    bounds = {r["context"]: r for r in speedup_bounds(cfg, ctx, plan_b, original=plan_a, dtype=elem)}
    ids = _tokens(cfg.vocab_size, max(ctx), seed)
    limit = getattr(cfg, "max_position_embeddings", None)
    result: dict[str, Any] = {
        "harp_bench_version": RESULT_VERSION,
        "settings": {
            "contexts": ctx,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "min_seconds": min_seconds,
            "warmup": warmup,
            "seed": seed,
            "timing": timing,
            "order": (
                "per context: warm-up rounds, then rounds of both models (at least `repeats`, more until "
                "`min_seconds` of measuring); lockstep: the two prefills take turns at every attention and "
                "MLP sub-layer (two threads, one running at a time; who starts alternates by round) and "
                "decode alternates step by step"
                if timing == "lockstep"
                else "per context: warm-up rounds, then rounds of (original forward, pruned forward), "
                "at least `repeats`, more until `min_seconds` of measuring"
            ),
            "prefill": "one forward of n tokens into an empty DynamicCache, last-token logits only",
            "decode": f"{new_tokens} greedy one-token steps on the prefilled cache",
            "tokens": "uniform random token ids (fixed seed); content does not affect speed",
            "times": "wall clock (time.perf_counter); with timing 'forward' also cpu_time: process CPU "
            "time of all threads (time.process_time; excludes waiting for a core, includes OpenMP spin-waits)",
        },
        "environment": {
            "harp": __version__,
            "torch": torch.__version__,
            "transformers": _transformers_version(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "loadavg_start": _loadavg(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "models": {"original": _model_info(a), "pruned": _model_info(b)},
        "bounds": {
            "prefill": "FLOPs(original)/FLOPs(pruned): linear maps 2*P per token, causal attention "
            "2*d*n*(n+1) per layer (d = heads*head_dim), LM head on the last token (harp.flops)",
            "decode": "bytes read per generated token, weights + KV cache, original/pruned (harp.flops)",
            "fraction_of_ideal_saving": "(1 - t_pruned/t_orig) / (1 - 1/bound), "
            "t_pruned/t_orig = median of the pair-by-pair ratios",
            "ci95": "95 % bootstrap interval of the median pair ratio (2000 resamples, fixed seed), given as speed-up",
        },
        "contexts": [],
        "memory": {
            "isolated": {},
            "process_peak_rss_bytes": None,
            "note": "peak_rss_bytes per context: peak resident memory while serving that context (prefill + "
            "decode) in a fresh process that holds only that model (isolated_memory; see isolated.*.peak_method); "
            "process_peak_rss_bytes: this benchmark's own peak, both models loaded, loading included.",
        },
    }
    for n in ctx:
        x = ids[:, :n]
        gc.collect()
        for i in range(warmup):
            say(f"context {n}: warm-up {i + 1}/{warmup}")
            one_round(x, i)
        runs: dict[str, list[dict[str, float | int]]] = {"original": [], "pruned": []}
        measured = 0.0  # seconds inside the timings of both models
        r = 0
        while r < repeats or (measured < min_seconds and r < max(repeats, MAX_ROUNDS)):
            say(f"context {n}: round {r + 1}" + ("" if min_seconds else f"/{repeats}"))
            ra, rb = one_round(x, r)
            runs["original"].append(ra)
            runs["pruned"].append(rb)
            measured += sum(float(m["prefill_s"]) + float(m["decode_s"]) for m in (ra, rb))
            r += 1
        row = _context_row(n, runs, bounds[n], new_tokens, limit)
        lo, hi = row["prefill"]["speedup_ci95"]
        say(
            f"context {n}: prefill {row['prefill']['original']['median_ms']:.0f} -> "
            f"{row['prefill']['pruned']['median_ms']:.0f} ms (x{row['prefill']['speedup']:.3f}, "
            f"95 % CI {lo:.3f}-{hi:.3f}, bound x{row['prefill']['bound']:.3f}, {r} rounds)"
        )
        result["contexts"].append(row)
    return result


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _cpu_summary(o: list[dict[str, float | int]], p: list[dict[str, float | int]], key: str) -> dict[str, Any]:
    """Process CPU time (all threads) of both models and its pair-by-pair ratio: on a busy machine,
    where wall time includes waiting for a core, it shows what the work itself cost."""
    ratio = [float(q[key]) / float(r[key]) if r[key] else float("nan") for r, q in zip(o, p, strict=True)]
    return {
        "original_median_ms": 1000.0 * statistics.median(float(r[key]) for r in o),
        "pruned_median_ms": 1000.0 * statistics.median(float(r[key]) for r in p),
        "ratio": {**_summary(ratio), "pairs": ratio},
        "speedup": 1.0 / statistics.median(ratio),
    }


def median_ci95(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap 95 % interval of the median of `values` (deterministic for a seed)."""
    if len(values) < 2:
        return float(values[0]), float(values[0])
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return meds[int(0.025 * resamples)], meds[min(resamples - 1, int(0.975 * resamples))]


def _context_row(
    n: int,
    runs: dict[str, list[dict[str, float | int]]],
    bound: dict[str, Any],
    new_tokens: int,
    limit: int | None,
) -> dict[str, Any]:
    o, p = runs["original"], runs["pruned"]
    pre_ratio = [q["prefill_s"] / r["prefill_s"] for r, q in zip(o, p, strict=True)]
    ratio = statistics.median(pre_ratio)
    ideal = bound["ideal_saving"]
    measured = 1.0 - ratio
    ci_lo, ci_hi = median_ci95(pre_ratio)

    def times(rs: list[dict[str, float | int]], key: str) -> dict[str, Any]:
        ms = [1000.0 * float(r[key]) for r in rs]
        s = _summary(ms)
        return {"median_ms": s["median"], "min_ms": s["min"], "max_ms": s["max"], "runs_ms": ms}

    row: dict[str, Any] = {
        "context": n,
        "prefill": {
            "original": times(o, "prefill_s"),
            "pruned": times(p, "prefill_s"),
            "ratio": {**_summary(pre_ratio), "pairs": pre_ratio},
            "speedup": 1.0 / ratio,
            "speedup_ci95": [1.0 / ci_hi, 1.0 / ci_lo],
            "bound": bound["prefill_bound"],
            "ideal_saving": ideal,
            "measured_saving": measured,
            "fraction_of_ideal_saving": measured / ideal if ideal > 0 else None,
            "flops_original": bound["prefill_flops_original"],
            "flops_pruned": bound["prefill_flops_pruned"],
        },
        "kv_cache_bytes": {
            "original": int(o[0]["kv_bytes"]),
            "pruned": int(p[0]["kv_bytes"]),
            "reduction": 1.0 - p[0]["kv_bytes"] / o[0]["kv_bytes"] if o[0]["kv_bytes"] else None,
            "expected_original": bound["kv_cache_bytes_original"],
            "expected_pruned": bound["kv_cache_bytes_pruned"],
        },
        "peak_rss_bytes": {},
    }
    timed_cpu = "prefill_cpu_s" in o[0]  # timing "forward" only: lockstep threads share the process clock
    if timed_cpu:
        row["prefill"]["cpu_time"] = _cpu_summary(o, p, "prefill_cpu_s")
    if new_tokens > 0:
        tps_o = [new_tokens / float(r["decode_s"]) for r in o]
        tps_p = [new_tokens / float(r["decode_s"]) for r in p]
        dec_ratio = [float(q["decode_s"]) / float(r["decode_s"]) for r, q in zip(o, p, strict=True)]
        dr = statistics.median(dec_ratio)
        d_lo, d_hi = median_ci95(dec_ratio)
        d_ideal = 1.0 - 1.0 / bound["decode_bytes_bound"]
        row["decode"] = {
            "new_tokens": new_tokens,
            "original": {
                **{f"{k}_tokens_per_s": v for k, v in _summary(tps_o).items()},
                "runs_tokens_per_s": tps_o,
            },
            "pruned": {
                **{f"{k}_tokens_per_s": v for k, v in _summary(tps_p).items()},
                "runs_tokens_per_s": tps_p,
            },
            "time_ratio": {**_summary(dec_ratio), "pairs": dec_ratio},
            "speedup": 1.0 / dr,
            "speedup_ci95": [1.0 / d_hi, 1.0 / d_lo],
            "bytes_bound": bound["decode_bytes_bound"],
            "flop_bound": bound["decode_flop_bound"],
            "ideal_saving": d_ideal,
            "measured_saving": 1.0 - dr,
            "fraction_of_ideal_saving": (1.0 - dr) / d_ideal if d_ideal > 0 else None,
        }
        if timed_cpu:
            row["decode"]["cpu_time"] = _cpu_summary(o, p, "decode_cpu_s")
        if limit is not None and n + new_tokens > limit:
            row["decode"]["note"] = (
                f"decode runs to position {n + new_tokens}, past max_position_embeddings {limit}: "
                "timing is unaffected, outputs are not meaningful"
            )
    return row


# --------------------------------------------------------------------------------------------
# Output: table, JSON, plot
# --------------------------------------------------------------------------------------------


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _mmm(med: float, lo: float, hi: float, fmt: str) -> str:
    return f"{med:{fmt}} ({lo:{fmt}}–{hi:{fmt}})"


def bench_table(result: dict[str, Any]) -> str:
    """The results as two Markdown tables: prefill (with bound and fraction of the ideal saving), and
    decode / KV cache / peak RSS. Medians with min–max in brackets."""
    with_cpu = any("cpu_time" in r["prefill"] for r in result["contexts"])
    pre_lines = [
        "| context | prefill original ms | prefill pruned ms | speed-up | 95 % CI | FLOP bound "
        "| saving / ideal saving |" + (" speed-up in CPU time |" if with_cpu else ""),
        "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if with_cpu else ""),
    ]
    dec_lines = [
        "| context | decode original tok/s | decode pruned tok/s | speed-up | 95 % CI | bytes bound "
        "| KV cache MiB original → pruned | peak RSS MiB original → pruned |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["contexts"]:
        pre = r["prefill"]
        o, p, q = pre["original"], pre["pruned"], pre["ratio"]
        frac = pre["fraction_of_ideal_saving"]
        speed = _mmm(1 / q["median"], 1 / q["max"], 1 / q["min"], ".3f")
        frac_s = "-" if frac is None else f"{100 * frac:.0f} %"
        t_o = _mmm(o["median_ms"], o["min_ms"], o["max_ms"], ".0f")
        t_p = _mmm(p["median_ms"], p["min_ms"], p["max_ms"], ".0f")
        ci = pre.get("speedup_ci95")
        ci_s = f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "-"
        cpu = pre.get("cpu_time")
        cpu_s = (f" {cpu['speedup']:.3f} |" if cpu else " - |") if with_cpu else ""
        pre_lines.append(
            f"| {r['context']} | {t_o} | {t_p} | {speed} | {ci_s} | {pre['bound']:.3f} | {frac_s} |{cpu_s}"
        )
        kv = r["kv_cache_bytes"]
        rss = r["peak_rss_bytes"]
        kv_s = f"{_mib(kv['original'])} → {_mib(kv['pruned'])}"
        rss_s = f"{_mib(rss.get('original'))} → {_mib(rss.get('pruned'))}" if rss else "-"
        dec = r.get("decode")
        if dec:
            do, dp, dq = dec["original"], dec["pruned"], dec["time_ratio"]
            cells = [
                _mmm(do["median_tokens_per_s"], do["min_tokens_per_s"], do["max_tokens_per_s"], ".1f"),
                _mmm(dp["median_tokens_per_s"], dp["min_tokens_per_s"], dp["max_tokens_per_s"], ".1f"),
                _mmm(1 / dq["median"], 1 / dq["max"], 1 / dq["min"], ".3f"),
                "{:.3f}–{:.3f}".format(*dec["speedup_ci95"]) if "speedup_ci95" in dec else "-",
                f"{dec['bytes_bound']:.3f}",
            ]
        else:
            cells = ["-"] * 5
        dec_lines.append(f"| {r['context']} | " + " | ".join(cells) + f" | {kv_s} | {rss_s} |")
    return "\n".join(pre_lines) + "\n\n" + "\n".join(dec_lines)


def _speedup_bar(part: dict[str, Any], ratio_key: str) -> tuple[float, float, float]:
    """(median, low, high) speed-up for a plot: the 95 % CI of the median where the result has one,
    else (results written before the CI existed) the min-max of the pairs."""
    if "speedup_ci95" in part:
        lo, hi = part["speedup_ci95"]
        return part["speedup"], lo, hi
    q = part[ratio_key]
    return 1 / q["median"], 1 / q["max"], 1 / q["min"]


def check_plot_available() -> None:
    """Raise ValueError early if matplotlib (needed for the PNG) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("The plot needs matplotlib: pip install 'harp-prune[plot]' (or pass --no-plot).") from None


def plot_bench(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a PNG like the paper's runtime figure: prefill time vs context for both models with
    min-max bars, measured speed-up on a second axis and the FLOP-ideal bound as a dashed line;
    a second panel does the same for decode time per token against the bytes bound."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = result["contexts"]
    ctx = [r["context"] for r in rows]
    has_decode = all("decode" in r for r in rows)
    ci = all("speedup_ci95" in r["prefill"] for r in rows)
    fig, axes = plt.subplots(1, 2 if has_decode else 1, figsize=(12 if has_decode else 6.5, 4.6), squeeze=False)
    src = result["models"]["original"].get("source") or result["models"]["original"]["class"]
    k = len(result["models"]["pruned"]["harp_layers"])
    L = result["models"]["pruned"]["num_layers"]

    def panel(
        ax: Any,
        title: str,
        ylabel: str,
        orig: list[tuple[float, float, float]],
        pruned: list[tuple[float, float, float]],
        speed: list[tuple[float, float, float]],
        bound: list[float],
        bound_label: str,
    ) -> None:
        for series, label, color, marker in (
            (orig, "original", "tab:blue", "o"),
            (pruned, f"HARP ({k}/{L} layers)", "tab:orange", "s"),
        ):
            med = [m for m, _, _ in series]
            err = [[m - lo for m, lo, _ in series], [hi - m for m, _, hi in series]]
            ax.errorbar(ctx, med, yerr=err, label=label, color=color, marker=marker, capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ctx)
        ax.set_xticklabels([str(c) for c in ctx])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax2 = ax.twinx()
        med = [m for m, _, _ in speed]
        err = [[m - lo for m, lo, _ in speed], [hi - m for m, _, hi in speed]]
        ax2.errorbar(
            ctx,
            med,
            yerr=err,
            color="tab:green",
            marker="^",
            linestyle=":",
            capsize=3,
            label="measured speed-up (95 % CI)" if ci else "measured speed-up (min–max)",
        )
        ax2.plot(ctx, bound, color="tab:red", linestyle="--", label=bound_label)
        ax2.axhline(1.0, color="grey", linewidth=0.8)
        ax2.set_ylabel("speed-up (original / pruned)")
        lo = min([1.0] + [s[1] for s in speed] + bound)
        hi = max([s[2] for s in speed] + bound)
        pad = 0.05 * (hi - lo or 1.0)
        ax2.set_ylim(lo - pad, hi + pad)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)

    seconds = max(r["prefill"][who]["max_ms"] for r in rows for who in ("original", "pruned")) >= 1000
    scale, unit = (1000.0, "s") if seconds else (1.0, "ms")

    def pre(r: dict[str, Any], who: str) -> tuple[float, float, float]:
        t = r["prefill"][who]
        return t["median_ms"] / scale, t["min_ms"] / scale, t["max_ms"] / scale

    panel(
        axes[0][0],
        "Prefill",
        f"prefill time ({unit})",
        [pre(r, "original") for r in rows],
        [pre(r, "pruned") for r in rows],
        [_speedup_bar(r["prefill"], "ratio") for r in rows],
        [r["prefill"]["bound"] for r in rows],
        "FLOP-ideal bound",
    )
    if has_decode:

        def dec(r: dict[str, Any], who: str) -> tuple[float, float, float]:
            d = r["decode"][who]
            return 1000 / d["median_tokens_per_s"], 1000 / d["max_tokens_per_s"], 1000 / d["min_tokens_per_s"]

        panel(
            axes[0][1],
            f"Decode ({rows[0]['decode']['new_tokens']} new tokens)",
            "time per new token (ms)",
            [dec(r, "original") for r in rows],
            [dec(r, "pruned") for r in rows],
            [_speedup_bar(r["decode"], "time_ratio") for r in rows],
            [r["decode"]["bytes_bound"] for r in rows],
            "bytes-read bound",
        )
    env = result["environment"]
    fig.suptitle(
        f"HARP speed: {src}, torch threads {env['torch_threads']}, "
        f"{result['models']['original']['dtype']}, {result['settings'].get('timing', 'forward')} timing; "
        f"times: medians with min–max" + ("; speed-ups: medians with 95 % CI" if ci else ""),
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}.png")
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def output_paths(out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Path]:
    """{'json', 'table', 'png'} paths inside `out_dir`; FileExistsError if any exists and not
    `overwrite`. Nothing is written."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory: choose another --out.")
    paths = {"json": out / JSON_NAME, "table": out / TABLE_NAME, "png": out / PLOT_NAME}
    if not overwrite:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise FileExistsError(f"{', '.join(existing)} already exist(s): choose another --out or pass --overwrite.")
    return paths


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_bench(
    result: dict[str, Any], out_dir: str | os.PathLike, *, overwrite: bool = False, plot: bool = True
) -> dict[str, Path]:
    """Write bench.json, bench.md (the Markdown table) and bench.png into `out_dir`, each atomically;
    refuse to clobber existing ones unless `overwrite`. Returns the paths written."""
    from .checkpoint import write_json_atomic

    paths = output_paths(out_dir, overwrite)
    if plot:
        check_plot_available()
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(paths["json"], result)
    _write_text_atomic(paths["table"], bench_table(result) + "\n")
    written = {"json": paths["json"], "table": paths["table"]}
    if plot:
        written["png"] = plot_bench(result, paths["png"])
    return written


if __name__ == "__main__":
    _probe_main(sys.argv[1:])
