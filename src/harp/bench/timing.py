"""Timing one model, or two models in lockstep: the measurements `harp bench` is built from.

Every function here runs real forwards and returns wall seconds (and, for `measure`, process CPU
seconds); nothing is aggregated. `harp.bench.run` decides how many rounds to run and in which order,
`harp.bench.results` turns the rounds into medians, ratios and intervals.

Lockstep: the prefills of two models run in two threads that hand the CPU to each other at every
attention and MLP sub-layer (A's embedding, B's embedding, A's layer-0 attention, B's layer-0
attention, ...), never at the same time; each model's time is the sum of its own segments. On a
shared machine whose speed drifts within seconds, both models then see the same drift.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from harp.model.accounting import kv_cache_bytes
from harp.modeling import arch_for, decoder_layers, get_module

Timings = dict[str, float | int]  # prefill_s, decode_s, kv_bytes (+ prefill_cpu_s, decode_cpu_s from `measure`)


def prompt_tokens(vocab_size: int, n: int, seed: int, bos: int | None = None) -> torch.Tensor:
    """A (1, n) prompt of uniform random token ids (content does not change speed), fixed by `seed`.

    With `bos` (the id `harp.text.bos_token` gives for tokenizers that add one), the first token is
    BOS, as in every prompt such a model sees; the other ids are the same as without it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (1, n), generator=g)
    if bos is not None and n > 0:
        ids[0, 0] = bos
    return ids


def _new_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _greedy_step(model: nn.Module, ids: torch.Tensor, cache: Any, kw: str, **kwargs: Any) -> torch.Tensor:
    """One forward of `ids` on `cache`; the greedy next token."""
    return model(input_ids=ids, use_cache=True, **{kw: cache}, **kwargs).logits[:, -1:].argmax(-1)


@torch.inference_mode()
def _prefill(model: nn.Module, ids: torch.Tensor, kw: str) -> tuple[float, float, Any, torch.Tensor]:
    """(wall s, process CPU s, cache, next token) of one prefill into an empty cache, last-token
    logits only (as `generate` does)."""
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


def measure(model: nn.Module, ids: torch.Tensor, new_tokens: int, kw: str) -> Timings:
    """One prefill of `ids` and `new_tokens` greedy decode steps of one model, timed as whole
    forwards: wall and process CPU seconds of each, and the KV-cache bytes after the prefill.

    `kw` is `cache_kwarg(model)`. The garbage collector is paused so it cannot land inside a timing
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


def switch_points(model: nn.Module) -> list[nn.Module]:
    """The modules where lockstep timing hands the CPU to the other model: every attention and MLP
    sub-layer, in order. A pruned layer keeps both modules, so an original model and its pruned
    version have the same points."""
    arch = arch_for(model.config)
    points: list[nn.Module] = []
    for layer in decoder_layers(model):
        points.append(get_module(layer, arch.attn))
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, nn.Module):
            points.append(mlp)
    return points


def lockstep_prefill(
    models: tuple[nn.Module, nn.Module], ids: torch.Tensor, kws: tuple[str, str], first: int
) -> list[tuple[float, Any, torch.Tensor]]:
    """Prefill `ids` on both models in lockstep (see the module docstring): per model, the wall
    seconds of its own segments, its filled cache and its greedy next token. `kws` are the models'
    `cache_kwarg`s, `first` (0 or 1) says which model starts. An error in either model is raised
    here (the other thread is released, not left waiting); the hooks are removed in any case."""
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

    handles = [p.register_forward_pre_hook(hook(i)) for i, m in enumerate(models) for p in switch_points(m)]
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
def alternating_decode(
    models: tuple[nn.Module, nn.Module],
    state: list[tuple[Any, torch.Tensor]],
    steps: int,
    kws: tuple[str, str],
    first: int,
) -> list[float]:
    """`steps` greedy steps on both models from their (cache, next token) `state`, alternating step
    by step (model `first` steps first); wall seconds per model."""
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


def lockstep_round(
    a: nn.Module, b: nn.Module, ids: torch.Tensor, new_tokens: int, kws: tuple[str, str], first: int
) -> tuple[Timings, Timings]:
    """One lockstep round of models `a` and `b`: `lockstep_prefill` of `ids`, then
    `alternating_decode` of `new_tokens` steps, garbage collector paused. Per model `prefill_s`,
    `decode_s` and `kv_bytes` (no CPU times: the two threads share the process clock)."""
    gc.disable()
    try:
        pre = lockstep_prefill((a, b), ids, kws, first)
        kv = [kv_cache_bytes(c) for _, c, _ in pre]
        dec = (
            alternating_decode((a, b), [(c, t) for _, c, t in pre], new_tokens, kws, first)
            if new_tokens > 0
            else [0.0, 0.0]
        )
    finally:
        gc.enable()
    rows: list[Timings] = [{"prefill_s": pre[i][0], "decode_s": dec[i], "kv_bytes": kv[i]} for i in (0, 1)]
    del pre
    return rows[0], rows[1]
