"""`harp bench` results for people: two Markdown tables (prefill; decode, KV cache and peak RSS) and
a PNG of time and speed-up against context length with the FLOP / bytes bounds."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harp.report import pyplot, save_figure


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


_Bar = tuple[float, float, float]  # (median, low, high)


@dataclass
class _Panel:
    """One panel of the speed figure: both models' times with bars, the speed-up and its bound."""

    title: str
    ylabel: str
    orig: list[_Bar]
    pruned: list[_Bar]
    speed: list[_Bar]
    bound: list[float]
    bound_label: str


def _prefill_panel(rows: list[dict[str, Any]]) -> _Panel:
    """Prefill time per context (in s once any time reaches a second) against the FLOP bound."""
    seconds = max(r["prefill"][who]["max_ms"] for r in rows for who in ("original", "pruned")) >= 1000
    scale, unit = (1000.0, "s") if seconds else (1.0, "ms")

    def pre(r: dict[str, Any], who: str) -> _Bar:
        t = r["prefill"][who]
        return t["median_ms"] / scale, t["min_ms"] / scale, t["max_ms"] / scale

    return _Panel(
        "Prefill",
        f"prefill time ({unit})",
        [pre(r, "original") for r in rows],
        [pre(r, "pruned") for r in rows],
        [_speedup_bar(r["prefill"], "ratio") for r in rows],
        [r["prefill"]["bound"] for r in rows],
        "FLOP-ideal bound",
    )


def _decode_panel(rows: list[dict[str, Any]]) -> _Panel:
    """Decode time per new token (ms) per context against the bytes-read bound."""

    def dec(r: dict[str, Any], who: str) -> _Bar:
        d = r["decode"][who]
        return 1000 / d["median_tokens_per_s"], 1000 / d["max_tokens_per_s"], 1000 / d["min_tokens_per_s"]

    return _Panel(
        f"Decode ({rows[0]['decode']['new_tokens']} new tokens)",
        "time per new token (ms)",
        [dec(r, "original") for r in rows],
        [dec(r, "pruned") for r in rows],
        [_speedup_bar(r["decode"], "time_ratio") for r in rows],
        [r["decode"]["bytes_bound"] for r in rows],
        "bytes-read bound",
    )


def _draw_panel(ax: Any, ctx: list[int], p: _Panel, pruned_label: str, ci: bool) -> None:
    """Times of both models on `ax` (log-2 context axis), the speed-up and its bound on a twin axis."""
    for series, label, color, marker in (
        (p.orig, "original", "tab:blue", "o"),
        (p.pruned, pruned_label, "tab:orange", "s"),
    ):
        med = [m for m, _, _ in series]
        err = [[m - lo for m, lo, _ in series], [hi - m for m, _, hi in series]]
        ax.errorbar(ctx, med, yerr=err, label=label, color=color, marker=marker, capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ctx)
    ax.set_xticklabels([str(c) for c in ctx])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(p.ylabel)
    ax.set_title(p.title)
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    med = [m for m, _, _ in p.speed]
    err = [[m - lo for m, lo, _ in p.speed], [hi - m for m, _, hi in p.speed]]
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
    ax2.plot(ctx, p.bound, color="tab:red", linestyle="--", label=p.bound_label)
    ax2.axhline(1.0, color="grey", linewidth=0.8)
    ax2.set_ylabel("speed-up (original / pruned)")
    lo = min([1.0] + [s[1] for s in p.speed] + p.bound)
    hi = max([s[2] for s in p.speed] + p.bound)
    pad = 0.05 * (hi - lo or 1.0)
    ax2.set_ylim(lo - pad, hi + pad)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)


def _bench_title(result: dict[str, Any], ci: bool) -> str:
    original = result["models"]["original"]
    src = original.get("source") or original["class"]
    env = result["environment"]
    return (
        f"HARP speed: {src}, torch threads {env['torch_threads']}, "
        f"{original['dtype']}, {result['settings'].get('timing', 'forward')} timing; "
        f"times: medians with min–max" + ("; speed-ups: medians with 95 % CI" if ci else "")
    )


def plot_bench(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a PNG like the paper's runtime figure: prefill time vs context for both models with
    min-max bars, measured speed-up on a second axis and the FLOP-ideal bound as a dashed line;
    a second panel does the same for decode time per token against the bytes bound."""
    plt = pyplot()
    rows = result["contexts"]
    has_decode = all("decode" in r for r in rows)
    ci = all("speedup_ci95" in r["prefill"] for r in rows)
    fig, axes = plt.subplots(1, 2 if has_decode else 1, figsize=(12 if has_decode else 6.5, 4.6), squeeze=False)
    pruned = result["models"]["pruned"]
    pruned_label = f"HARP ({len(pruned['harp_layers'])}/{pruned['num_layers']} layers)"
    ctx = [r["context"] for r in rows]
    _draw_panel(axes[0][0], ctx, _prefill_panel(rows), pruned_label, ci)
    if has_decode:
        _draw_panel(axes[0][1], ctx, _decode_panel(rows), pruned_label, ci)
    fig.suptitle(_bench_title(result, ci), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
