"""What every job does before its own work: torch threads, the output folder, the calibration and
evaluation windows (disjoint), the host description, the resume-state file next to the output."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harp._version import __version__
from harp.engine.text import (
    DEFAULT_CALIB,
    DEFAULT_EVAL,
    Text,
    bos_token,
    calibration_windows,
    check_disjoint,
    evaluation_windows,
    load_text,
    tokenize,
)
from harp.util.fsio import output_lock, require_output


def set_threads(threads: int | None) -> None:
    """torch's CPU threads for this process, when the user chose a number."""
    if threads:
        torch.set_num_threads(threads)


def output_dir(out: str | os.PathLike[str] | None, overwrite: bool) -> Path | None:
    """The resolved output folder, refused early if it exists (without `overwrite`); None without one."""
    return require_output(out, overwrite) if out else None


@contextmanager
def claimed(out: Path | None, what: str) -> Iterator[None]:
    """Hold the output's lock for the whole run: a second run on the same output refuses at once instead
    of interleaving its resume state and results with this one's. Nothing to hold without an output."""
    if out is None:
        yield
        return
    with output_lock(out, what):
        yield


def state_path(out: Path, suffix: str) -> Path:
    """The hidden resume-state file next to the output folder `out`: `.NAME.<suffix>`."""
    return out.parent / f".{out.name}.{suffix}"


def host_info(*, machine: bool = False, load_average: float | None = None) -> dict[str, Any]:
    """Versions of Python, torch and harp; with `machine`, also the CPU count and the load average."""
    host: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "harp": __version__}
    if machine:
        host.update(cpus=os.cpu_count(), load_average_at_start=load_average)
    return host


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


@dataclass
class Windows:
    """The calibration and evaluation texts, their token windows and how much they overlap."""

    calib_text: Text
    eval_text: Text
    calib: torch.Tensor
    eval: torch.Tensor
    bos: int | None
    overlap: float
    seconds: float


def load_windows(tok: Any, calib: str | None, eval_: str | None, *, calib_windows: int, seq_len: int, seed: int,
                 eval_tokens: int | None, eval_seq_len: int) -> Windows:
    """Calibration windows (seeded) and evaluation windows (the standard protocol), refused if the two
    texts are the same and warned about if they overlap."""
    t = time.perf_counter()
    calib_text = load_text(calib, DEFAULT_CALIB)
    eval_text = load_text(eval_, DEFAULT_EVAL)
    bos = bos_token(tok)
    cw = calibration_windows(tokenize(tok, calib_text), calib_windows, seq_len, seed, bos=bos)
    ev = evaluation_windows(tokenize(tok, eval_text), eval_seq_len, eval_tokens, bos=bos)
    overlap = check_disjoint(calib_text, eval_text, cw, ev)
    return Windows(calib_text, eval_text, cw, ev, bos, overlap, time.perf_counter() - t)
