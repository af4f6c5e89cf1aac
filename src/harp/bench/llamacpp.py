"""Running exported GGUFs in llama.cpp (through llama-cpp-python), to check and time them.

llama-cpp-python is optional for harp itself; these helpers raise a clear error without it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MIN_VERSION = (0, 3, 6)  # first release whose llama.cpp has the `deci` architecture
BUILD_HINT = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" '
    'pip install "llama-cpp-python==0.3.36"'
)


def require_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ImportError(f"llama-cpp-python is not installed. Install it with:\n    {BUILD_HINT}") from None
    version = tuple(int(x) for x in llama_cpp.__version__.split(".")[:3] if x.isdigit())
    if version < MIN_VERSION:
        raise ImportError(
            f"llama-cpp-python {llama_cpp.__version__} predates llama.cpp's 'deci' architecture; "
            f"need >= {'.'.join(map(str, MIN_VERSION))}:\n    {BUILD_HINT}"
        )
    return llama_cpp


def open_gguf(
    path: str | os.PathLike[str],
    *,
    n_ctx: int = 512,
    logits_all: bool = False,
    n_threads: int | None = None,
    n_batch: int = 512,
    flash_attn: bool = False,
) -> Any:
    """A `llama_cpp.Llama` for `path`, quiet, CPU only."""
    llama_cpp = require_llama_cpp()
    if not Path(path).is_file():
        raise FileNotFoundError(f"GGUF {path} not found.")
    threads = n_threads or os.cpu_count() or 1
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        flash_attn=flash_attn,
        n_gpu_layers=0,
        seed=0,
        verbose=False,
    )


def logits(llm: Any, ids: Sequence[int]) -> np.ndarray:
    """Logits llama.cpp computes at every position of `ids` (needs `logits_all=True`), float32 T x vocab."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm: Any, ids: Sequence[int], n: int) -> list[int]:
    """`n` tokens of greedy continuation of `ids`, chosen by llama.cpp's own sampler (temperature 0)."""
    llm.reset()
    out: list[int] = []
    for tok in llm.generate(
        list(ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
    ):
        out.append(int(tok))
        if len(out) >= n:
            break
    return out


def nll(llm: Any, ids: Sequence[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given their prefixes, and the number of scored tokens."""
    lg = logits(llm, ids).astype(np.float64)
    lg -= lg.max(axis=-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(axis=-1, keepdims=True))
    tgt = np.asarray(ids[1:])
    return float(-logp[np.arange(len(tgt)), tgt].sum()), len(tgt)
