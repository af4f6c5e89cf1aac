"""`harp compare` results for people: the Markdown report (a table per k, the searched alphas, notes on
where `harp` wins or loses, the loss by position when measured, the setup), the PNG chart of perplexity
and task scores per method, and per k a PNG of loss against position (one curve per method)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harp.engine.evaluate import PERPLEXITY_TASK
from harp.methods.registry import METHODS
from harp.report import pyplot, save_figure
from harp.report.longctx import plot_position_losses


def layers_str(layers: Sequence[int]) -> str:
    """[22, 23, 24, 29] -> '22-24,29'."""
    xs = sorted(layers)
    parts: list[str] = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts)


def _fmt_time(sec: float) -> str:
    if sec < 0.05:
        return "–"
    if sec < 90:
        return f"{sec:.1f} s" if sec < 10 else f"{sec:.0f} s"
    return f"{sec / 60:.1f} min"


def _fmt_score(sc: dict[str, Any]) -> str:
    if sc["metric"] == "ppl":
        v = sc["value"]
        return f"{v:.2f}" if v < 1000 else f"{v:.3g}"
    se = sc.get("stderr")
    return f"{sc['value']:.3f}" + (f" ±{se:.3f}" if se is not None else "")


def _what(row: dict[str, Any]) -> str:
    if row["kind"] == "none":
        return "–"
    if row["kind"] == "blocks":
        return f"whole layers {layers_str(row['layers'])}"
    if row["kind"] == "window":
        return f"window {row.get('window') or row.get('info', {}).get('window')} on {layers_str(row['layers'])}"
    return f"attention {layers_str(row['layers'])}"


def _kv_cell(row: dict[str, Any]) -> str:
    """The KV saving: measured after a short prefill, or for window rows (whose saving starts past the
    window) from the accounting at the model's maximum context."""
    at = row.get("kv_at_max")
    if at:
        return f"−{100 * at['saving']:.1f} % at {at['context']:,}"
    return f"−{100 * row['kv_reduction']:.1f} %"


def compare_markdown(rep: Any) -> str:
    """compare.md: per k, one table row per method (scores, parameters removed, KV cache, search time),
    the searched alphas, notes on where `harp` wins or loses, then the setup."""
    tasks = rep.tasks
    lines: list[str] = [f"# Method comparison on {rep.model} ({rep.num_layers} layers)", ""]
    original = rep.row(0, "original")
    for k in rep.ks:
        rows = [r for r in rep.rows if r["k"] == k]
        lines.append(f"## k = {k} of {rep.num_layers} layers (KV cache −{100 * k / rep.num_layers:.1f} %)")
        lines.append("")
        head = ["method", "pruned"]
        for t in tasks:
            sc0 = original["scores"][t["name"]]
            arrow = "↓" if not sc0["higher_is_better"] else "↑"
            n = "" if sc0["metric"] == "ppl" else f" (n={sc0['samples']})"
            head.append(f"{t['title']}{n} {arrow}")
        head += ["params removed", "KV cache", "search time"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|")
        best: dict[str, float | None] = {}
        for t in tasks:
            vals = [r["scores"][t["name"]]["value"] for r in rows]
            hib = original["scores"][t["name"]]["higher_is_better"]
            best[t["name"]] = (max(vals) if hib else min(vals)) if len(set(vals)) > 1 else None  # no bold for ties
        for r in [original] + rows:
            cells = [f"`{r['method']}`" if r["k"] else "original", _what(r)]
            for t in tasks:
                sc = r["scores"][t["name"]]
                cell = _fmt_score(sc)
                if r["k"] and sc["value"] == best[t["name"]]:
                    cell = f"**{cell}**"
                cells.append(cell)
            if r["k"]:
                cells += [f"{r['params_removed'] / 1e6:.2f} M ({r['params_removed_pct']:.1f} %)",
                          _kv_cell(r), _fmt_time(r["search_seconds"])]
            else:
                cells += [f"0 of {rep.params_before / 1e6:.1f} M", "–", "–"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Alphas (layer:alpha, top first): " + "; ".join(
            f"`{r['method']}` {', '.join(f'{i}:{a:g}' for i, a in sorted(zip(r['layers'], r['alphas'], strict=True), reverse=True))}"  # noqa: E501
            for r in rows if METHODS[r["method"]].lists_alphas))
        lines.append("")
        lines += _notes(rep, k, rows)
        lines.append("")
        lines += _positions(rep, k, [original] + rows)
    lines += _footer(rep)
    return "\n".join(lines) + "\n"


def _notes(rep: Any, k: int, rows: list[dict[str, Any]]) -> list[str]:
    by = {r["method"]: r for r in rows}
    notes: list[str] = []
    ppl = lambda r: r["scores"][PERPLEXITY_TASK]["value"]  # noqa: E731
    if "harp" in by:
        h = by["harp"]
        refs = [m for m in ("no-rescale", "attn-drop-top") if m in by]
        if refs:
            notes.append(f"- WikiText-2 perplexity: `harp` {ppl(h):.2f} vs " + ", ".join(
                f"`{m}` {ppl(by[m]):.2f} ({'harp lower' if ppl(h) < ppl(by[m]) else 'harp NOT lower'})"
                for m in refs) + ".")
        winners = []
        for t in rep.tasks:
            if t["name"] == PERPLEXITY_TASK:
                continue
            sc = h["scores"][t["name"]]
            hib = sc["higher_is_better"]
            better = [m for m, r in by.items() if m != "harp" and
                      ((r["scores"][t["name"]]["value"] > sc["value"]) if hib else
                       (r["scores"][t["name"]]["value"] < sc["value"]))]
            if better:
                winners.append(f"{t['title']}: " + ", ".join(
                    f"`{m}` {by[m]['scores'][t['name']]['value']:.3f}" for m in better) + f" (harp {sc['value']:.3f})")
        if winners:
            notes.append("- Where another method beats `harp`: " + "; ".join(winners) + ".")
        others = [m for m, r in by.items() if m != "harp" and ppl(r) < ppl(h)]
        if others:
            notes.append("- Lower WikiText-2 perplexity than `harp`: " + ", ".join(
                f"`{m}` {ppl(by[m]):.2f}" for m in others) + ".")
    if "harp-refine" in by:
        info = by["harp-refine"]["info"]
        line = (f"- `harp-refine`: calibration perplexity {info['greedy_calib_ppl']:.3f} (one greedy pass) → "
                f"{info['refined_calib_ppl']:.3f} ({100 * info['gain']:.2f} % lower) after {len(info['passes'])} "
                f"coordinate-descent passes ({_fmt_time(info['refine_seconds'])} on top of the greedy search)")
        if "harp" in by:
            line += f"; WikiText-2 {ppl(by['harp']):.2f} → {ppl(by['harp-refine']):.2f}"
        notes.append(line + ".")
    blocks = [m for m in ("shortgpt", "sleb") if m in by]
    if blocks and "harp" in by:
        notes.append("- Whole-layer methods remove attention and MLP: " + ", ".join(
            f"`{m}` {by[m]['params_removed_pct']:.1f} %" for m in blocks)
            + f" of parameters vs `harp`'s {by['harp']['params_removed_pct']:.1f} % at the same KV reduction.")
    return notes


def _positions(rep: Any, k: int, rows: list[dict[str, Any]]) -> list[str]:
    """The loss by position of the perplexity text, one row per method (nothing when not measured)."""
    rows = [r for r in rows if r.get("loss_by_position")]
    if not rows:
        return []
    buckets = [b["bucket"] for b in rows[0]["loss_by_position"]["buckets"]]
    lbp0 = rows[0]["loss_by_position"]
    out = [f"Loss by position at k = {k} (mean next-token loss in nats per bucket of positions, "
           f"{lbp0['windows']} x {lbp0['seq_len']} tokens of the perplexity text; loss_by_position_k{k}.png):", "",
           "| method | ppl | " + " | ".join(buckets) + " |", "|" + "---|" + "---:|" * (len(buckets) + 1)]
    for r in rows:
        d = r["loss_by_position"]
        nll = {b["bucket"]: b["nll"] for b in d["buckets"]}
        cells = [f"`{r['method']}`" if r["k"] else "original", f"{d['ppl']:.2f}"]
        cells += [f"{nll[b]:.3f}" if b in nll else "–" for b in buckets]
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def _footer(rep: Any) -> list[str]:
    d = rep.data
    st = rep.settings
    lim = d.get("limit")
    out = ["## Setup", ""]
    out.append(f"- Calibration (all methods): {d['calibration']}, {d['calib_windows']} windows x "
               f"{d['calib_seq_len']} tokens, seed {st.get('seed')}; alpha grid {st.get('grid')}.")
    out.append(f"- Perplexity: {d['evaluation']}, {d['eval_windows']} x {d['eval_seq_len']} tokens (the first "
               f"{d['eval_windows'] * d['eval_seq_len']:,} tokens, non-overlapping windows).")
    if any(t["kind"] not in ("perplexity", "longctx") for t in rep.tasks):
        out.append(f"- Tasks: lm-evaluation-harness 0.4.13, harp's offline task YAMLs on {d.get('data_dir')}; "
                   f"--limit {lim if lim is not None else 'none'} (the first N items of each set). "
                   "± is one standard error.")
    lc = getattr(rep, "long_context", None) or {}
    if lc.get("tasks"):
        n = ", ".join(f"{t} n = {lc['n'][t]}" for t in lc["tasks"])
        hay = st.get("filler") or "each task's default"
        out.append(f"- Long context: {', '.join(lc['tasks'])} at {', '.join(map(str, lc['contexts']))} tokens "
                   f"({n} per context, seed {st.get('seed')}, haystack {hay}), "
                   "generated once: every method answers the same prompts. Greedy decoding, exact match of the "
                   "answer; ± is the binomial standard error sqrt(p (1 - p) / n).")
    if rep.auto_k:
        a = rep.auto_k
        out.append(f"- auto-k: largest k with calibration perplexity ≤ {a['budget_ppl']:.3f} "
                   f"(original {a['base_ppl']:.3f} +{100 * a['max_increase']:g} %) → k = {a['k']} "
                   f"(searched {len(a['per_k'])} layers in {_fmt_time(a['seconds'])})"
                   + (f"; for the refit methods k = {a['refit']['k']} (refit {len(a['refit']['per_k'])} layers "
                      f"in {_fmt_time(a['refit']['seconds'])})" if a.get("refit") else "") + ".")
    sec = rep.seconds
    h = rep.host
    la = h.get("load_average_at_start")
    out.append(f"- Wall time {_fmt_time(sec.get('total', 0))} (load {_fmt_time(sec.get('load', 0))}, searches "
               f"{_fmt_time(sec.get('search', 0))}, evaluation {_fmt_time(sec.get('eval', 0))}) on {h.get('cpus')} "
               f"CPU cores, {st.get('threads')} torch threads"
               + (f", load average {la:.1f} at the start" if la is not None else "") + ".")
    out.append(f"- harp {h.get('harp')}, torch {h.get('torch')}, Python {h.get('python')}.")
    if st.get("command"):
        out += ["", "```", st["command"], "```"]
    return out


def plot_compare_positions(rep: Any, folder: str | os.PathLike) -> list[Path]:
    """loss_by_position_k<k>.png per k in `folder`: loss against position, the original and every method
    at that k (the rows' `loss_by_position`)."""
    paths = []
    original = rep.row(0, "original")
    for k in rep.ks:
        rows = [r for r in [original] + [r for r in rep.rows if r["k"] == k] if r.get("loss_by_position")]
        if not rows:
            continue
        seq = rows[0]["loss_by_position"]["seq_len"]
        paths.append(plot_position_losses(
            {r["method"]: r["loss_by_position"] for r in rows}, Path(folder) / f"loss_by_position_k{k}.png",
            title=f"{rep.model}, k = {k} of {rep.num_layers}: loss by position ({seq}-token windows)"))
    return paths


def plot_compare(rep: Any, path: str | os.PathLike) -> Path:
    """compare.png: per k, WikiText-2 perplexity (log scale) and task scores, one bar per method."""
    plt = pyplot()
    from matplotlib.ticker import ScalarFormatter

    ks = rep.ks
    tasks = [t for t in rep.tasks if t["name"] != PERPLEXITY_TASK]
    ncols = 2 if tasks else 1
    size = (6.5 * ncols + (1.3 if tasks else 0), 3.6 * len(ks))
    fig, axes = plt.subplots(len(ks), ncols, figsize=size, squeeze=False)
    original = rep.row(0, "original")
    cmap = plt.get_cmap("tab10")
    for i, k in enumerate(ks):
        rows = [original] + [r for r in rep.rows if r["k"] == k]
        labels = [r["method"] for r in rows]
        palette = [cmap(j) for j in (0, 1, 2, 3, 4, 5, 6, 8, 9)]  # tab10 without its grey (grey = original)
        colors = ["0.6"] + [palette[j % len(palette)] for j in range(len(rows) - 1)]
        ax = axes[i][0]
        vals = [r["scores"][PERPLEXITY_TASK]["value"] for r in rows]
        ax.bar(range(len(rows)), vals, color=colors)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("WikiText-2 perplexity (log)")
        ax.set_title(f"k = {k} of {rep.num_layers}: perplexity (lower is better)", fontsize=9)
        for x, v in enumerate(vals):
            ax.text(x, v, f"{v:.1f}" if v < 1000 else f"{v:.2g}", ha="center", va="bottom", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        if tasks:
            ax = axes[i][1]
            width = 0.8 / len(rows)
            for j, r in enumerate(rows):
                ys = [r["scores"][t["name"]]["value"] for t in tasks]
                errs = [r["scores"][t["name"]]["stderr"] or 0.0 for t in tasks]
                ax.bar([x + j * width for x in range(len(tasks))], ys, width, yerr=errs, color=colors[j],
                       label=labels[j], error_kw={"elinewidth": 0.6, "capsize": 1.5})
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))], [t["title"] for t in tasks], fontsize=8)
            ax.set_ylabel("score (higher is better)")
            ax.set_title(f"k = {k}: downstream tasks (±1 s.e.)", fontsize=9)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{rep.model}: methods at equal KV-cache reduction", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
