"""Memory of one model alone: resident-set sizes of this process, and a probe that measures a model
in a fresh Python process so that its peak RSS belongs to that model only.

`probe_memory` starts `python -m harp.bench` (its `__main__` calls `main` below) with the interpreter
running this code, so the child imports the same installed harp; it prints one marked JSON line.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harp.bench.timing import measure, prompt_tokens
from harp.model.load import load_model
from harp.modeling import cache_kwarg

_PROBE_MARK = "HARP_BENCH_PROBE "


def peak_rss_bytes() -> int:
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


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmHWM") is not None
    except OSError:
        return False


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def probe_memory(
    source: str | os.PathLike,
    contexts: Sequence[int],
    new_tokens: int,
    *,
    dtype: str = "float32",
    threads: int | None = None,
    attn_implementation: str | None = None,
    seed: int = 0,
    bos: int | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Load one model in a fresh Python process, run a prefill + decode at each context (ascending)
    and return its RSS after loading, its peak during loading, and per context its peak RSS while
    serving that context (bytes). The prompt is `prompt_tokens(vocab, max(contexts), seed, bos)`.

    On Linux the peak (VmHWM) is reset before each context, so loading's transient peak (which
    from_pretrained can push well above the serving peak) does not mask it; elsewhere the numbers
    are ru_maxrss, the process peak so far (`peak_method` says which)."""
    cmd = [sys.executable, "-m", "harp.bench", "--probe", str(source), "--contexts", ",".join(map(str, contexts))]
    cmd += ["--new-tokens", str(new_tokens), "--dtype", dtype, "--seed", str(seed)]
    if threads:
        cmd += ["--threads", str(threads)]
    if attn_implementation:
        cmd += ["--attn", attn_implementation]
    if bos is not None:
        cmd += ["--bos", str(bos)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(_PROBE_MARK):
            return json.loads(line[len(_PROBE_MARK) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"Memory probe for {source} failed (exit {proc.returncode}): " + " | ".join(tail))


def main(argv: Sequence[str]) -> None:
    """The probe's child process: measure one model, print the result as one marked JSON line."""
    import argparse


    ap = argparse.ArgumentParser(prog="python -m harp.bench", description="harp bench memory probe (internal)")
    ap.add_argument("--probe", required=True)
    ap.add_argument("--contexts", required=True)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--attn", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bos", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    contexts = sorted(int(n) for n in a.contexts.split(","))  # written by probe_memory from checked contexts
    model, _ = load_model(a.probe, dtype=a.dtype, attn_implementation=a.attn, with_tokenizer=False)
    kw = cache_kwarg(model)
    rss = _status_bytes("VmRSS")
    out: dict[str, Any] = {
        "rss_after_load_bytes": rss,
        # VmHWM, not ru_maxrss: on Linux a child's ru_maxrss starts at its parent's RSS at fork time. The kernel
        # updates VmHWM lazily, so it can lag the current VmRSS by a page or two: the peak is at least the RSS.
        "peak_during_load_bytes": max(_status_bytes("VmHWM") or peak_rss_bytes(), rss or 0),
        "weights_bytes": weights_bytes(model),
        "peak_rss_bytes": {},
    }
    ids = prompt_tokens(model.config.vocab_size, max(contexts), a.seed, a.bos)
    resettable = True
    for n in contexts:
        gc.collect()
        resettable = resettable and _reset_peak_rss()
        measure(model, ids[:, :n], a.new_tokens, kw)
        hwm = _status_bytes("VmHWM") if resettable else None
        out["peak_rss_bytes"][str(n)] = hwm if hwm is not None else peak_rss_bytes()
    out["peak_method"] = (
        "VmHWM reset before each context (/proc/self/clear_refs): peak while serving that context"
        if resettable
        else "ru_maxrss: peak of the process so far, loading included (may include the parent's RSS at fork)"
    )
    print(_PROBE_MARK + json.dumps(out), flush=True)
