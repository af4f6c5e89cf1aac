"""Issue 22: does a pruned model still find what is far back in a long prompt? Passkey and needle-in-a-
haystack retrieval at several contexts, and the loss by position of long windows, for the methods
`harp compare` defines, at one k (equal KV-cache saving).

    python benchmarks/long_context.py                                    # SmolLM2-135M, k = 8, 1k/4k/8k, n = 50
    python benchmarks/long_context.py --n 2 --contexts 1024              # smoke run (minutes)
    # Qwen2.5-Coder-1.5B, after benchmarks/qwen_coder.py has cached its GGUF:
    python benchmarks/long_context.py --k 4 --n 30 --out benchmarks/results/long_context_qwen_k4 \\
        --model ~/.cache/harp/qwen2.5-coder-1.5b/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf

Methods (harp.methods.selector.Selector, as `harp compare`): original, harp (top k, greedy alpha
search), harp-ls (top k, closed-form refit), attention-drop (He et al.), harp-any-ls (Attention Drop's
layers, refit); all on the same calibration windows (--calib-windows x --seq-len tokens of WikiText-2
validation, seed 0). Retrieval: `harp.passkey_items` / `harp.niah_items` (the same prompts for every
method, seed --seed), greedy decoding, exact match (`harp.retrieval_score`). Loss by position:
`harp.position_losses` on --ppl-windows windows of the largest context from each of --ppl-texts.

Resumable: every cell (method x task x context, or method x text) is one JSON file under --out, written
atomically as soon as it is measured (a retrieval cell's items are also kept one by one in OUT/METHOD/partial/
until the cell is complete, measured in an order that spreads their depths, so a run cut mid-cell resumes at
the next item and the summary shows the part measured as "n of N"); a rerun skips the cells that are there
with the same settings (model, k, n, seed, calibration, windows) and measures the others again. The searched plans are
kept in OUT/plans.json (refit maps and window methods are recomputed: seconds). OUT/summary.md and one PNG per text
summarise whatever cells exist (every context found on disk). The loss-by-position cells run first, then
retrieval smallest context first, so a run cut short still compares every method at the contexts it reached.
The plans do not depend on --n, so a later run at another context and n (e.g. `--contexts 8192 --n 20`)
reuses them and adds its cells to the same summary.

A saved checkpoint joins the comparison as a method of its own with `--checkpoint NAME=DIR` (repeatable): its
cells run on the checkpoint as loaded (`harp.load_model(DIR)`) with the same prompts and windows, e.g. what
`harp prune --kind auto` chose, which no `harp compare` method reproduces:

    harp prune --kind auto -k 8 --context 8192 --out runs/smollm2-auto-k8
    python benchmarks/long_context.py --methods original --checkpoint kind-auto=runs/smollm2-auto-k8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = "original,harp,harp-ls,attention-drop,harp-any-ls"
GROUP = 8  # retrieval items scored together: passkey prompts share their prefix within a group (about 1.6x faster)
TEXT_NAMES = {"wikitext2-raw-test": "WikiText-2 test", "tinyshakespeare": "Tiny Shakespeare"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: Path, data: Any) -> None:
    from harp.util.fsio import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model source (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    ap.add_argument("--k", type=int, default=8, help="attention sub-layers pruned (equal KV saving), default 8")
    ap.add_argument("--contexts", default="1024,4096,8192", help="prompt lengths in tokens, e.g. 1024,4096,8192")
    ap.add_argument("--tasks", default="passkey,niah")
    ap.add_argument("--n", type=int, default=50, help="items per task and context (depths spread evenly)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ppl-texts", default="wikitext2-raw-test,tinyshakespeare",
                    help="texts for the loss by position ('' for none)")
    ap.add_argument("--ppl-context", type=int, default=None,
                    help="window length of the loss by position (default: the largest of --contexts)")
    ap.add_argument("--ppl-windows", type=int, default=2, help="windows of the largest context per text")
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--summary-only", action="store_true",
                    help="measure nothing: write OUT/summary.md and the PNGs from the cells already there")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/long_context_<model>_k<k>)")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                    help="also measure a saved (pruned) checkpoint as method NAME (repeatable)")
    a = ap.parse_args()

    import torch

    import harp
    from harp.methods.registry import METHODS
    from harp.methods.selector import ORIGINAL, Plan, Selector, applied

    if a.threads:
        torch.set_num_threads(a.threads)
    tag = "smollm2" if a.model is None else Path(str(a.model)).stem.split("-instruct")[0].lower()
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"long_context_{tag}_k{a.k}"
    checkpoints = dict(parse_checkpoint(x) for x in a.checkpoint)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    methods += [m for m in checkpoints if m not in methods]
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    contexts = harp.parse_contexts(a.contexts)
    texts = [t.strip() for t in a.ppl_texts.split(",") if t.strip()]
    command = "python benchmarks/long_context.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])

    # a cell or plan measured with other settings is measured again, not reused
    plan_settings = {"model": a.model, "k": a.k, "seed": a.seed, "calib_windows": a.calib_windows,
                     "seq_len": a.seq_len}
    settings = {**plan_settings, "n": a.n, "ppl_windows": a.ppl_windows}

    def cell_path(method: str, name: str) -> Path:
        return out / method / f"{name}.json"

    def done(path: Path) -> bool:
        return path.exists() and json.loads(path.read_text()).get("settings") == settings

    todo = [(c, t, m) for c in contexts for t in tasks for m in methods if not done(cell_path(m, f"{t}@{c}"))]
    top = a.ppl_context or max(contexts)
    todo_ppl = [(x, m) for x in texts for m in methods if not done(cell_path(m, f"loss_{x}@{top}"))]
    if a.summary_only:
        todo, todo_ppl = [], []
    log(f"{out}: {len(todo)} retrieval cell(s) and {len(todo_ppl)} loss-by-position cell(s) to measure")
    if todo or todo_ppl:
        t0 = time.perf_counter()
        model, tok = harp.load_model(a.model)
        log(f"model loaded in {time.perf_counter() - t0:.0f} s: {type(model).__name__}, "
            f"{model.config.num_hidden_layers} layers, max {model.config.max_position_embeddings} positions")
        limit = model.config.max_position_embeddings
        for c in [*contexts, top]:
            harp.check_context(c, limit)  # before any search
        bos = harp.bos_token(tok)
        stream = harp.tokenize(tok, harp.load_text("wikitext2-valid"))
        calib = harp.calibration_windows(stream, a.calib_windows, a.seq_len, 0, bos=bos)
        # the fitted-sink methods (window-W-fit) cut their own 4 windows of 2W tokens from the same text
        selector = Selector(model, calib, log=lambda m: log("  " + m), calib_ids=stream, seed=0, bos=bos)
        plans_file = out / "plans.json"
        saved = json.loads(plans_file.read_text()) if plans_file.exists() else {}
        if saved.pop("settings", None) != plan_settings:  # plans do not depend on n or the windows
            saved = {}
        plans: dict[str, Plan] = {}
        loaded: dict[str, Any] = {}

        def plan_for(method: str) -> Plan:
            if method in plans:
                return plans[method]
            if method in checkpoints:  # measured on the checkpoint itself: its plan is only described
                plan = checkpoint_plan(method, checkpoints[method])
                saved[method] = {**plan.to_dict(), "block": plan.info["block"], "describe": plan.info["describe"]}
                write_json(plans_file, {**saved, "settings": plan_settings})
            elif method == "original":
                plan = ORIGINAL
            elif method in saved and not method.endswith("-ls") and METHODS[method].kind != "window":
                d = saved[method]
                plan = Plan(method, d["kind"], d["layers"], d["alphas"], d["search_seconds"], d["calib_ppl"])
            else:
                t = time.perf_counter()
                log(f"selecting {method} (k = {a.k})")
                plan = selector.select(method, a.k)
                log(f"  {method}: {describe(plan)} ({time.perf_counter() - t:.0f} s)")
                saved[method] = plan.to_dict()
                write_json(plans_file, {**saved, "settings": plan_settings})
            plans[method] = plan
            return plan

        @contextlib.contextmanager
        def pruned(method: str) -> Iterator[Any]:
            """The model `method` is measured on: the original with the method's plan applied, or its checkpoint."""
            plan = plan_for(method)
            if method not in checkpoints:
                with applied(model, plan):
                    yield model
                return
            if method not in loaded:
                loaded.clear()  # one checkpoint resident at a time
                log(f"loading checkpoint {checkpoints[method]} for {method}")
                loaded[method] = harp.load_model(checkpoints[method], with_tokenizer=False)[0]
            yield loaded[method]

        windows: dict[str, torch.Tensor] = {}
        for x, m in todo_ppl:
            if x not in windows:
                ids = harp.tokenize(tok, harp.load_text(x))
                windows[x] = harp.evaluation_windows(ids, top, a.ppl_windows * top, bos=bos)
            plan = plan_for(m)
            with pruned(m) as mm:
                r = harp.position_losses(mm, windows[x])
            log(f"{m} loss by position on {x}, {r.windows} x {r.seq_len}: ppl {r.ppl:.2f}; "
                + ", ".join(f"{b['bucket']} {b['nll']:.3f}" for b in r.buckets))
            write_json(cell_path(m, f"loss_{x}@{top}"), {**r.to_dict(curve=True), "method": m, "text": x,
                                                        "plan": describe(plan), "settings": settings,
                                                        "command": command})
        items: dict[tuple[str, int], list] = {}
        for c, t, m in todo:
            if (t, c) not in items:
                items[(t, c)] = harp.retrieval_items(t, tok, c, a.n, a.seed, max_context=limit)
            plan = plan_for(m)
            cell = cell_path(m, f"{t}@{c}")
            part = partial_path(cell)
            # item by item, depths spread over any prefix, each kept at once: a cut run resumes where it stopped
            kept = PartialCell(part, {"method": m, "task": t, "context": c, "settings": settings, "command": command},
                               a.n)
            todo_items = [i for i in spread_order(len(items[(t, c)])) if i not in kept.measured]
            with pruned(m) as mm:
                # GROUP items at a time (spread depths first): within a group the passkey prompts share their
                # filler's computation up to each needle (harp.retrieval_score)
                for g in range(0, len(todo_items), GROUP):
                    group = todo_items[g:g + GROUP]
                    harp.retrieval_score(mm, tok, [items[(t, c)][i] for i in group],
                                         on_item=kept.keeper(group))
            rows, seconds = kept.rows, kept.seconds
            r = harp.RetrievalScore.from_rows(t, c, sorted(rows, key=lambda row: row["index"]), seconds)
            log(f"{m} {t}@{c}: acc {r.acc:.3f} ± {r.stderr:.3f} (n = {r.n}, {r.seconds:.0f} s)")
            write_json(cell, {**r.to_dict(items=True), "method": m, "plan": describe(plan),
                              "settings": settings, "command": command})
            part.unlink()
    summarise(out, methods, tasks, contexts, texts, top, command, a)


def summarise(out: Path, methods: list[str], tasks: list[str], contexts: list[int], texts: list[str], top: int,
              command: str, a: argparse.Namespace) -> None:
    import harp

    def load(method: str, name: str) -> dict[str, Any] | None:
        p = out / method / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def partial(method: str, task: str, context: int) -> dict[str, Any] | None:
        """A cell measured in part so far, marked as such in the table ('n of N')."""
        p = partial_path(out / method / f"{task}@{context}.json")
        if not p.exists() or not (d := json.loads(p.read_text()))["rows"]:
            return None
        return {**harp.RetrievalScore.from_rows(task, context, d["rows"]).to_dict(), "planned": d["settings"]["n"]}

    # every context measured so far (a run at --contexts 8192 --n 20 adds to one at 1024,4096 --n 50)
    found = {int(f.stem.split("@")[1]) for m in methods for t in tasks
             for f in [*(out / m).glob(f"{t}@*.json"), *(out / m / "partial").glob(f"{t}@*.json")]}
    contexts = sorted(set(contexts) | found)
    table = {m: {f"{t}@{c}": d for t in tasks for c in contexts if (d := load(m, f"{t}@{c}") or partial(m, t, c))}
             for m in methods}
    lines = [f"# Long-context retrieval and loss by position, k = {a.k}", "",
             f"Command: `{command}`  ", f"Host: Python {platform.python_version()}, {os.cpu_count()} CPUs.", "",
             "Exact-match accuracy ± binomial stderr (n items, depths spread evenly over the context):", "",
             harp.retrieval_markdown(table)]
    plans = json.loads((out / "plans.json").read_text()) if (out / "plans.json").exists() else {}
    plans.pop("settings", None)
    if plans:
        lines += ["Plans (layers, top first: alpha; refit maps for the -ls methods):", ""]
        lines += [f"- {m}: " + (p.get("describe") or ", ".join(
            f"{i}:{al:g}" if al is not None else str(i)
            for i, al in sorted(zip(p["layers"], p["alphas"] or [None] * len(p["layers"]), strict=True), reverse=True)))
            for m, p in plans.items()]
        lines.append("")
    for x in texts:
        res = {m: d for m in methods if (d := load(m, f"loss_{x}@{top}")) is not None}
        if not res:
            continue
        buckets = [b["bucket"] for b in next(iter(res.values()))["buckets"]]
        lines += [f"## Loss by position, {TEXT_NAMES.get(x, x)}, {top}-token windows (mean NLL, nats)", "",
                  "| method | ppl | " + " | ".join(buckets) + " |", "|---|---|" + "---|" * len(buckets)]
        for m, d in res.items():
            lines.append(f"| {m} | {d['ppl']:.2f} | " + " | ".join(f"{b['nll']:.3f}" for b in d["buckets"]) + " |")
        lines.append("")
        png = harp.plot_position_losses(res, out / f"loss_{x}@{top}.png",
                                        title=f"{TEXT_NAMES.get(x, x)}: loss by position, k = {a.k}")
        lines += [f"![loss by position]({png.name})", ""]
    ppl = {x: {m: d["ppl"] for m in methods if (d := load(m, f"loss_{x}@{top}")) is not None} for x in texts}
    if plans and any(ppl.values()):
        png = plot_quality_vs_kv(out / f"quality_vs_kv@{top}.png", ppl, plans, top, a)
        lines += [f"## Perplexity against KV saving at {top} tokens", "", f"![quality vs KV saving]({png.name})", ""]
    (out / "summary.md").write_text("\n".join(lines))
    log(f"wrote {out / 'summary.md'}")
    print("\n".join(lines))


class PartialCell:
    """The items of one retrieval cell measured so far, kept in its partial file (`partial_path`) as each is
    scored; rows of a run with other settings are not resumed."""

    def __init__(self, path: Path, head: dict[str, Any], planned: int) -> None:
        self.path, self.head, self.planned = path, head, planned
        kept = json.loads(path.read_text()) if path.exists() else {}
        same = kept.get("settings") == head["settings"]
        self.rows: list[dict[str, Any]] = kept.get("rows", []) if same else []
        self.seconds: float = kept.get("seconds", 0.0) if self.rows else 0.0
        self.measured = {row["index"] for row in self.rows}
        if self.rows:
            log(f"{head['method']} {head['task']}@{head['context']}: resuming after {len(self.rows)} of {planned} "
                "items")

    def keep(self, index: int, row: dict[str, Any], seconds: float) -> None:
        self.rows.append({**row, "index": index})
        self.seconds += seconds
        right = sum(bool(r["correct"]) for r in self.rows)
        log(f"  {self.head['method']} {self.head['task']}@{self.head['context']} item {len(self.rows)}/{self.planned} "
            f"(depth {row['depth']:.2f}): {'right' if row['correct'] else 'wrong'}, {right}/{len(self.rows)} so far "
            f"({seconds:.0f} s)")
        write_json(self.path, {**self.head, "rows": self.rows, "seconds": self.seconds})

    def keeper(self, indices: list[int]) -> Callable[[int, dict[str, Any], float], None]:
        """`harp.retrieval_score`'s `on_item` for a call on the items `indices` (its index j is indices[j])."""
        return lambda j, row, seconds: self.keep(indices[j], row, seconds)


def partial_path(cell: Path) -> Path:
    """Where the items of `cell` measured so far are kept until the cell is complete."""
    return cell.parent / "partial" / cell.name


def spread_order(n: int) -> list[int]:
    """The indices 0..n-1 (items at evenly spread depths) in van der Corput order: 0, the middle, the quarters,
    ..., so the items measured before a run is cut cover every depth instead of the shallow ones."""
    order: list[int] = []
    seen: set[int] = set()
    j = 0
    while len(order) < n:
        x, f, k = 0.0, 0.5, j
        while k:
            x, k, f = x + f * (k & 1), k >> 1, f / 2
        i = min(n - 1, round(x * (n - 1)))
        if i not in seen:
            seen.add(i)
            order.append(i)
        j += 1
        if j > 4 * n + 64:  # every index is reached long before this; guard against a silent endless loop
            order += [i for i in range(n) if i not in seen]
    return order


def describe(plan: Any) -> str:
    """A plan in one line (a checkpoint's own description, else the method's)."""
    return plan.info.get("describe") or plan.describe()


def parse_checkpoint(spec: str) -> tuple[str, str]:
    """'NAME=DIR' -> (name, dir), refused in one line when DIR is not a harp checkpoint."""
    from harp.model.checkpoint import is_harp_checkpoint

    name, sep, folder = spec.partition("=")
    if not sep or not name.strip() or not folder.strip():
        sys.exit(f"error: --checkpoint {spec!r}: give NAME=DIR, e.g. kind-auto=runs/smollm2-auto-k8")
    if not is_harp_checkpoint(Path(folder).expanduser()):
        sys.exit(f"error: --checkpoint {spec!r}: {folder} is not a harp checkpoint folder (harp prune --out ...)")
    return name.strip(), str(Path(folder).expanduser())


def checkpoint_plan(method: str, folder: str) -> Any:
    """A `Plan` describing a saved checkpoint (its `harp` block in info), for the summary and the KV plot."""
    from harp.methods.selector import Plan
    from harp.model.checkpoint import read_config
    from harp.modeling import HarpBlock

    cfg = read_config(folder)
    hb = HarpBlock.from_config(cfg)  # the one parser of a harp block
    kinds = {i: f"window {w}" for i, w in hb.windows_plan.items()} | {
        i: "drop" if al == 0 else "refit" if al == 1 else f"alpha {al:g}" for i, al in hb.plan.items()}
    describe = f"checkpoint {folder}: " + ", ".join(f"{i} {kinds[i]}" for i in sorted(kinds, reverse=True))
    return Plan(method, "checkpoint", sorted(kinds, reverse=True), None,
                info={"block": cfg["harp"], "describe": describe})


def kv_saving_of(plan: dict[str, Any], config: Any, context: int) -> float:
    """The KV saving of a saved plan at `context` tokens (exact accounting: a window layer holds w - 1 + sinks)."""
    from harp.methods.kinds import kv_saving
    from harp.model.accounting import kv_cache_bytes_expected

    if "block" in plan:  # a checkpoint: its own harp block, mixed kinds included
        before = kv_cache_bytes_expected(config, context, {"layers": [], "alphas": []})
        return 1.0 - kv_cache_bytes_expected(config, context, plan["block"]) / before

    kind = "window" if plan["kind"] == "window" else "refit"  # any bypass frees the layer's whole cache
    return kv_saving(config, {i: kind for i in plan["layers"]}, plan.get("window") or 1, plan.get("sinks") or 0,
                     context)


def plot_quality_vs_kv(path: Path, ppl: dict[str, dict[str, float]], plans: dict[str, Any], top: int,
                       a: argparse.Namespace) -> Path:
    """Perplexity at `top` tokens (relative to the original, one series per text) against the KV saving at `top`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from harp.model.load import converted_gguf
    from harp.model.source import load_config

    # a GGUF has no config.json: read the one of its converted folder (measuring converted it; if it is not
    # there, load_config names the problem instead of silently reading the default model's)
    gguf = a.model is not None and str(a.model).endswith(".gguf")
    config = load_config((converted_gguf(a.model) or a.model) if gguf else a.model)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j, (x, marker) in enumerate(zip(ppl, "os^D", strict=False)):
        base = ppl[x].get("original")
        pts = [(100 * kv_saving_of(plans[m], config, top), v / base, m)
               for m, v in ppl[x].items() if m in plans and base]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=TEXT_NAMES.get(x, x))
        if j == 0:
            labelled = pts  # one label per method, beside its first text's point
    ax.axhline(1.05, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.margins(x=0.25)  # room for the labels left of the leftmost column
    ax.set_xlabel(f"KV-cache saving at {top} tokens (%)")
    ax.set_ylabel(f"perplexity at {top} tokens / original's")
    ax.set_title(f"k = {a.k}: quality against KV saving (dashed: +5 %)")
    ax.legend()
    fig.tight_layout()  # the final axes box first: labels are spaced in screen units
    label_points(ax, labelled)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def label_points(ax: Any, pts: list[tuple[float, float, str]], fontsize: float = 7.0) -> None:
    """Label each point on its left; labels of points in one column are spread apart so none overlap.

    Points within 0.4 % KV saving of each other share a column (same saving, e.g. all top-block rows); their
    labels are stacked at least one line apart in screen space, as near their points as that allows, with a
    thin line back to the point when a label had to move.
    """
    gap = 1.25 * fontsize  # points
    to_screen = ax.transData.transform
    pt_per_px = 72.0 / ax.figure.dpi
    columns: list[list[tuple[float, float, str]]] = []
    for p in sorted(pts):
        if columns and abs(p[0] - columns[-1][0][0]) < 0.4:
            columns[-1].append(p)
        else:
            columns.append([p])
    for col in columns:
        col.sort(key=lambda p: p[1])
        ys = [to_screen((kv, rel))[1] * pt_per_px for kv, rel, _ in col]
        placed: list[float] = []
        for y in ys:  # bottom up: each label at least a line above the one below it
            placed.append(max(y, placed[-1] + gap) if placed else y)
        shift = max(0.0, (sum(placed) - sum(ys)) / len(ys))  # centre the stack on its points
        placed = [y - shift for y in placed]
        for i in range(1, len(placed)):  # the shift must not undo the spacing
            placed[i] = max(placed[i], placed[i - 1] + gap)
        for (kv, rel, m), y, y0 in zip(col, placed, ys, strict=True):
            moved = abs(y - y0) > 0.5
            ax.annotate(m, (kv, rel), fontsize=fontsize, xytext=(-10, y - y0), textcoords="offset points",
                        ha="right", va="center",
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"} if moved else None)


if __name__ == "__main__":
    main()
