"""`run_bench`: load and check the two models, run the rounds context by context, assemble and
write the result. See the `harp.bench` docstring for what is measured and how."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harp.bench.probe import peak_rss_bytes, probe_memory
from harp.bench.results import context_row, loadavg, result_skeleton
from harp.bench.timing import Timings, lockstep_round, measure, prompt_tokens
from harp.engine.text import bos_token
from harp.model.accounting import speedup_bounds
from harp.model.checkpoint import read_config
from harp.model.load import load_model, saved_tokenizer
from harp.model.source import ModelSource, resolve
from harp.modeling import HarpBlock, cache_kwarg
from harp.report import check_plot_available
from harp.report.bench import bench_table, plot_bench
from harp.util.fsio import require_output, write_json_atomic, write_text_atomic

JSON_NAME = "bench.json"
PLOT_NAME = "bench.png"
TABLE_NAME = "bench.md"
TIMINGS = ("lockstep", "forward")
MAX_ROUNDS = 200  # cap on rounds per context when min_seconds asks for more than `repeats`

ModelLike = nn.Module | str | os.PathLike | None  # None: the bundled default model


def parse_contexts(spec: str | Iterable[int]) -> list[int]:
    """'256,512,1024' (or a list of ints) -> sorted distinct positive context lengths."""
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("No context lengths given: pass e.g. `contexts=256,512,1024`.")
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
    if not HarpBlock.from_config(pc):
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


def _resolved(model: ModelLike) -> nn.Module | ModelSource:
    """A loaded model as it is; a source (None: the bundled default) as `harp.model.source.resolve` classifies it."""
    return model if isinstance(model, nn.Module) else resolve(model)


def _tokenizer_of(source: nn.Module | ModelSource) -> Any:
    """The tokenizer saved with a model source; None for a loaded model or a folder without one."""
    if isinstance(source, nn.Module):
        return None
    return saved_tokenizer(source)


def _load(source: nn.Module | ModelSource, dtype: Any, attn_implementation: str | None) -> tuple[nn.Module, str | None]:
    """The model and the name its results record: a loaded model's `harp_source`, a source's argument."""
    if isinstance(source, nn.Module):
        return source, getattr(source, "harp_source", None)
    model, _ = load_model(source, dtype=dtype, attn_implementation=attn_implementation, with_tokenizer=False)
    return model, source.label


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
    tokenizer: Any = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark `pruned` against `orig` (models, or sources `harp.model.source.resolve` classifies).

    Returns a JSON-serialisable dict: settings, environment, both models' structure, and per context
    the prefill times, decode throughput, pair-by-pair ratios, FLOP/bytes bounds, the measured
    saving as a fraction of the ideal one, KV-cache bytes and (with `isolated_memory`, which needs
    both models given as sources) each model's own peak RSS. See the `harp.bench` docstring.

    `timing`: "lockstep" (default) or "forward", see the `harp.bench` docstring. `min_seconds`: per
    context, keep adding rounds beyond `repeats` until the timed work of both models adds up to this
    many seconds (at most MAX_ROUNDS rounds) - cheap short contexts then get many rounds, long ones
    `repeats`. `tokenizer`: the models' tokenizer, used only to start the random prompt with BOS
    where the tokenizer adds one (`harp.text.bos_token`); by default the tokenizer saved with `orig`
    (else with `pruned`) when they are sources, none (no BOS) for loaded models.
    """
    ctx = parse_contexts(contexts)
    _check_settings(repeats, timing, min_seconds, warmup, new_tokens, threads)
    _check_models(orig, pruned, isolated_memory)
    say = progress or (lambda _msg: None)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        say("loading models")
        source_a, source_b = _resolved(orig), _resolved(pruned)
        model_a, src_a = _load(source_a, dtype, attn_implementation)
        model_b, src_b = _load(source_b, dtype, attn_implementation)
        check_pair(model_a, model_b, ctx)
        model_a.eval()
        model_b.eval()
        if tokenizer is None:
            tokenizer = _tokenizer_of(source_a) or _tokenizer_of(source_b)
        bos = bos_token(tokenizer) if tokenizer is not None else None
        result = _run(model_a, model_b, ctx, new_tokens, repeats, warmup, seed, bos, timing, min_seconds, say)
        result["models"]["original"]["source"] = src_a
        result["models"]["pruned"]["source"] = src_b
        if isolated_memory:
            sources = {"original": str(src_a), "pruned": str(src_b)}
            _probe_isolated(result, sources, ctx, new_tokens, dtype, attn_implementation, seed, bos, say)
        result["memory"]["process_peak_rss_bytes"] = peak_rss_bytes()
        result["environment"]["loadavg_end"] = loadavg()
        return result
    finally:
        torch.set_num_threads(old_threads)


def _check_settings(
    repeats: int, timing: str, min_seconds: float, warmup: int, new_tokens: int, threads: int | None
) -> None:
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


def _check_models(orig: ModelLike, pruned: ModelLike, isolated_memory: bool) -> None:
    if isolated_memory and (isinstance(orig, nn.Module) or isinstance(pruned, nn.Module)):
        raise ValueError("isolated_memory needs both models as sources (paths or names), not loaded models.")
    if pruned is None:
        raise ValueError("No pruned model given: pass a HARP checkpoint folder or a model pruned by harp.prune.")
    if not isinstance(pruned, nn.Module):
        _check_pruned_source(pruned)


def _check_pruned_source(source: str | os.PathLike) -> None:
    p = Path(source).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"Pruned model {source}: no such folder (expected a HARP checkpoint folder).")
    harp = read_config(p).get("harp")
    if not harp:
        raise ValueError(
            f"{p} is not a HARP checkpoint (its config.json has no 'harp' block): pass a folder written by "
            "`harp prune` or harp.save()."
        )
    if not HarpBlock.from_config({"harp": harp}):
        raise ValueError(f"{p} is a HARP checkpoint without pruned layers: there is nothing to compare.")


def _probe_isolated(
    result: dict[str, Any],
    sources: dict[str, str],
    ctx: list[int],
    new_tokens: int,
    dtype: str,
    attn_implementation: str | None,
    seed: int,
    bos: int | None,
    say: Callable[[str], None],
) -> None:
    """Each model's peak memory measured alone in a fresh process, into `result` (per role and per context)."""
    for role, src in sources.items():
        say(f"peak memory of the {role} model alone (fresh process)")
        probe = probe_memory(
            src,
            ctx,
            new_tokens,
            dtype=dtype,
            threads=torch.get_num_threads(),
            attn_implementation=attn_implementation,
            seed=seed,
            bos=bos,
        )
        result["memory"]["isolated"][role] = probe
        for row in result["contexts"]:
            row["peak_rss_bytes"][role] = probe["peak_rss_bytes"][str(row["context"])]


def _run(
    a: nn.Module,
    b: nn.Module,
    ctx: list[int],
    new_tokens: int,
    repeats: int,
    warmup: int,
    seed: int,
    bos: int | None,
    timing: str,
    min_seconds: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    cfg = a.config
    kw_a, kw_b = cache_kwarg(a), cache_kwarg(b)

    def one_round(x: torch.Tensor, r: int) -> tuple[Timings, Timings]:
        if timing == "lockstep":  # who starts alternates from round to round
            return lockstep_round(a, b, x, new_tokens, (kw_a, kw_b), first=r % 2)
        return measure(a, x, new_tokens, kw_a), measure(b, x, new_tokens, kw_b)

    plan_a = getattr(cfg, "harp", None) or {"layers": [], "alphas": []}
    plan_b = b.config.harp
    elem = next(a.parameters()).element_size()
    bounds = {r["context"]: r for r in speedup_bounds(cfg, ctx, plan_b, original=plan_a, dtype=elem)}
    ids = prompt_tokens(cfg.vocab_size, max(ctx), seed, bos)
    limit = getattr(cfg, "max_position_embeddings", None)
    settings = {
        "contexts": ctx,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "min_seconds": min_seconds,
        "warmup": warmup,
        "seed": seed,
        "timing": timing,
    }
    result = result_skeleton(a, b, settings, bos)
    for n in ctx:
        x = ids[:, :n]
        gc.collect()
        for i in range(warmup):
            say(f"context {n}: warm-up {i + 1}/{warmup}")
            one_round(x, i)
        runs: dict[str, list[Timings]] = {"original": [], "pruned": []}
        measured = 0.0  # seconds inside the timings of both models
        r = 0
        while r < repeats or (measured < min_seconds and r < max(repeats, MAX_ROUNDS)):
            say(f"context {n}: round {r + 1}" + ("" if min_seconds else f"/{repeats}"))
            ra, rb = one_round(x, r)
            runs["original"].append(ra)
            runs["pruned"].append(rb)
            measured += sum(float(m["prefill_s"]) + float(m["decode_s"]) for m in (ra, rb))
            r += 1
        row = context_row(n, runs, bounds[n], new_tokens, limit)
        lo, hi = row["prefill"]["speedup_ci95"]
        say(
            f"context {n}: prefill {row['prefill']['original']['median_ms']:.0f} -> "
            f"{row['prefill']['pruned']['median_ms']:.0f} ms (x{row['prefill']['speedup']:.3f}, "
            f"95 % CI {lo:.3f}-{hi:.3f}, bound x{row['prefill']['bound']:.3f}, {r} rounds)"
        )
        result["contexts"].append(row)
    return result


def output_paths(out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Path]:
    """{'json', 'table', 'png'} paths inside `out_dir`; FileExistsError if any exists and not
    `overwrite` (`harp.util.fsio.require_output` with these files). Nothing is written."""
    out = Path(out_dir).expanduser()
    paths = {"json": out / JSON_NAME, "table": out / TABLE_NAME, "png": out / PLOT_NAME}
    require_output(out, overwrite, files=[p.name for p in paths.values()])
    return paths


def write_bench(
    result: dict[str, Any], out_dir: str | os.PathLike, *, overwrite: bool = False, plot: bool = True
) -> dict[str, Path]:
    """Write bench.json, bench.md (the Markdown table) and bench.png into `out_dir`, each atomically;
    refuse to clobber existing ones unless `overwrite`. Returns the paths written."""

    paths = output_paths(out_dir, overwrite)
    if plot:
        check_plot_available()
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(paths["json"], result)
    write_text_atomic(paths["table"], bench_table(result) + "\n")
    written = {"json": paths["json"], "table": paths["table"]}
    if plot:
        written["png"] = plot_bench(result, paths["png"])
    return written
