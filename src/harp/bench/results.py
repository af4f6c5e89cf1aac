"""From timed rounds to the `harp bench` result: medians, pair-by-pair ratios, bootstrap intervals,
bounds and the fixed descriptive fields of bench.json (settings, environment, models).

The result is a plain JSON-serialisable dict (`RESULT_VERSION` says its layout); `harp.report.bench`
renders it, nothing here prints.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from harp._version import __version__
from harp.bench.probe import weights_bytes
from harp.bench.timing import Timings
from harp.model.accounting import count_parameters, layer_kinds
from harp.modeling import HarpBlock

RESULT_VERSION = 1


def median_ci95(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap 95 % interval of the median of `values` (deterministic for a seed)."""
    if len(values) < 2:
        return float(values[0]), float(values[0])
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return meds[int(0.025 * resamples)], meds[min(resamples - 1, int(0.975 * resamples))]


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _cpu_summary(o: list[Timings], p: list[Timings], key: str) -> dict[str, Any]:
    """Process CPU time (all threads) of both models and its pair-by-pair ratio: on a busy machine,
    where wall time includes waiting for a core, it shows what the work itself cost."""
    ratio = [float(q[key]) / float(r[key]) if r[key] else float("nan") for r, q in zip(o, p, strict=True)]
    return {
        "original_median_ms": 1000.0 * statistics.median(float(r[key]) for r in o),
        "pruned_median_ms": 1000.0 * statistics.median(float(r[key]) for r in p),
        "ratio": {**_summary(ratio), "pairs": ratio},
        "speedup": 1.0 / statistics.median(ratio),
    }


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the platform has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def model_info(model: nn.Module) -> dict[str, Any]:
    """The structure of one benchmarked model: HARP layers and alphas, parameters, weight bytes."""
    cfg = model.config
    block = HarpBlock.from_config(cfg)
    kinds = layer_kinds(cfg)
    return {
        "model_type": cfg.model_type,
        "class": type(model).__name__,
        "num_layers": cfg.num_hidden_layers,
        "harp_layers": list(block.layers),
        "harp_alphas": list(block.alphas),
        "layers_with_attention": kinds.count("attention"),
        "parameters": count_parameters(model),
        "weights_bytes": weights_bytes(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
    }


def result_skeleton(
    a: nn.Module,
    b: nn.Module,
    settings: dict[str, Any],
    bos: int | None,
) -> dict[str, Any]:
    """The result before any context is measured: settings (with the prose that says what each
    number means), environment, both models, the bounds' definitions, empty contexts and memory."""
    timing = settings["timing"]
    tokens = "uniform random token ids (fixed seed); content does not affect speed"
    if bos is not None:
        tokens += f"; the first token is the tokenizer's BOS ({bos}), as in the model's real prompts"
    return {
        "harp_bench_version": RESULT_VERSION,
        "settings": {
            **settings,
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
            "decode": f"{settings['new_tokens']} greedy one-token steps on the prefilled cache",
            "tokens": tokens,
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
            "loadavg_start": loadavg(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "models": {"original": model_info(a), "pruned": model_info(b)},
        "bounds": {
            "prefill": "FLOPs(original)/FLOPs(pruned): linear maps 2*P per token, causal attention "
            "2*d*n*(n+1) per layer (d = heads*head_dim), LM head on the last token (harp.accounting)",
            "decode": "bytes read per generated token, weights + KV cache, original/pruned (harp.accounting)",
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


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def context_row(
    n: int,
    runs: dict[str, list[Timings]],
    bound: dict[str, Any],
    new_tokens: int,
    limit: int | None,
) -> dict[str, Any]:
    """One context's entry of the result from its rounds (`runs["original"][i]` and
    `runs["pruned"][i]` measured together), its `harp.accounting.speedup_bounds` row, and the model's
    max_position_embeddings (`limit`, None if unknown)."""
    o, p = runs["original"], runs["pruned"]
    row: dict[str, Any] = {
        "context": n,
        "prefill": _prefill(o, p, bound),
        "kv_cache_bytes": _kv_cache(o, p, bound),
        "peak_rss_bytes": {},
    }
    if new_tokens > 0:
        row["decode"] = _decode(o, p, bound, new_tokens)
        if limit is not None and n + new_tokens > limit:
            row["decode"]["note"] = (
                f"decode runs to position {n + new_tokens}, past max_position_embeddings {limit}: "
                "timing is unaffected, outputs are not meaningful"
            )
    return row


def _times_ms(rs: list[Timings], key: str) -> dict[str, Any]:
    ms = [1000.0 * float(r[key]) for r in rs]
    s = _summary(ms)
    return {"median_ms": s["median"], "min_ms": s["min"], "max_ms": s["max"], "runs_ms": ms}


def _prefill(o: list[Timings], p: list[Timings], bound: dict[str, Any]) -> dict[str, Any]:
    """Prefill times, their pair-by-pair ratio and speed-up (with its 95 % interval) against the FLOP bound."""
    pre_ratio = [q["prefill_s"] / r["prefill_s"] for r, q in zip(o, p, strict=True)]
    ratio = statistics.median(pre_ratio)
    ideal = bound["ideal_saving"]
    measured = 1.0 - ratio
    ci_lo, ci_hi = median_ci95(pre_ratio)
    pre: dict[str, Any] = {
        "original": _times_ms(o, "prefill_s"),
        "pruned": _times_ms(p, "prefill_s"),
        "ratio": {**_summary(pre_ratio), "pairs": pre_ratio},
        "speedup": 1.0 / ratio,
        "speedup_ci95": [1.0 / ci_hi, 1.0 / ci_lo],
        "bound": bound["prefill_bound"],
        "ideal_saving": ideal,
        "measured_saving": measured,
        "fraction_of_ideal_saving": measured / ideal if ideal > 0 else None,
        "flops_original": bound["prefill_flops_original"],
        "flops_pruned": bound["prefill_flops_pruned"],
    }
    if "prefill_cpu_s" in o[0]:  # timing "forward" only: lockstep threads share the process clock
        pre["cpu_time"] = _cpu_summary(o, p, "prefill_cpu_s")
    return pre


def _kv_cache(o: list[Timings], p: list[Timings], bound: dict[str, Any]) -> dict[str, Any]:
    return {
        "original": int(o[0]["kv_bytes"]),
        "pruned": int(p[0]["kv_bytes"]),
        "reduction": 1.0 - p[0]["kv_bytes"] / o[0]["kv_bytes"] if o[0]["kv_bytes"] else None,
        "expected_original": bound["kv_cache_bytes_original"],
        "expected_pruned": bound["kv_cache_bytes_pruned"],
    }


def _decode(o: list[Timings], p: list[Timings], bound: dict[str, Any], new_tokens: int) -> dict[str, Any]:
    """Decode throughput, the time ratio and speed-up (with its 95 % interval) against the bytes bound."""
    tps_o = [new_tokens / float(r["decode_s"]) for r in o]
    tps_p = [new_tokens / float(r["decode_s"]) for r in p]
    dec_ratio = [float(q["decode_s"]) / float(r["decode_s"]) for r, q in zip(o, p, strict=True)]
    dr = statistics.median(dec_ratio)
    d_lo, d_hi = median_ci95(dec_ratio)
    d_ideal = 1.0 - 1.0 / bound["decode_bytes_bound"]
    dec: dict[str, Any] = {
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
    if "prefill_cpu_s" in o[0]:  # timing "forward" times CPU too (see `_prefill`)
        dec["cpu_time"] = _cpu_summary(o, p, "decode_cpu_s")
    return dec
