"""The streamed alpha search: HARP's search (docs/method.md) without the whole model resident.

The cached search needs, from the frozen bottom of the model, only the residual stream entering the
lowest searched layer (and the arguments every decoder layer receives: masks, rotary tables). The
streamed search computes it from a safetensors checkpoint on disk one decoder layer at a time:

1. The model is built on the meta device (no weights); only its buffers (rotary tables) are real.
2. With the embedding loaded and every decoder layer replaced by the identity, one pass of the
   backbone per batch records what each layer is called with: the embedding output and the exact
   masks / rotary embeddings the model computes itself, so nothing is re-derived here.
3. Layer j = 0 .. start-1: load its tensors from the shards (only those, via the index), run every
   calibration batch through it, put it back on the meta device.
4. Load layers start .. L-1, the final norm and the LM head, and run the ordinary cached search
   (`harp.search.search_alphas`) on that partially resident model.

Peak memory is therefore the top layers + head + the calibration activations (+ one bottom layer
while streaming), independent of the depth L. Everything the search computes is the same arithmetic
as the in-memory cached search on the same batches, so alphas and perplexities are identical.
Activations can live on the compute device, on the CPU, or memory-mapped on disk (`activations=`).
The resume state is shared with the in-memory search: a search interrupted in one mode resumes in
the other.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harp.engine.replay import Batch, layer_output, record_layer_calls
from harp.model.load import resolve_device, streamable_folder
from harp.model.prune import refuse_pruned
from harp.modeling import arch_for, get_module
from harp.util.digest import digest_rows, tensor_digest
from harp.util.dtypes import torch_dtype
from harp.util.progress import Progress

ACTIVATIONS = ("device", "cpu", "disk")



# ------------------------------------------------------------------------------------------------
# Devices and dtypes
# ------------------------------------------------------------------------------------------------




# ------------------------------------------------------------------------------------------------
# A safetensors checkpoint on disk, read a few tensors at a time
# ------------------------------------------------------------------------------------------------




class SafetensorsCheckpoint:
    """The tensors of a safetensors model folder (one file, or shards with `model.safetensors.index.json`).

    Every read opens the shard, takes the named tensors and closes it again, so no mapping of a whole
    shard outlives the read (mapped pages would count as resident memory)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        self.files: dict[str, Path] = {}
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.folder / v for k, v in weight_map.items()}
            missing = sorted({str(f.name) for f in self.files.values() if not f.is_file()})
            if missing:
                raise FileNotFoundError(f"{index} names shards that are not there: {', '.join(missing[:5])}.")
        else:
            for f in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        self.files[k] = f
        if not self.files:
            raise ValueError(f"No safetensors tensors found in {self.folder}.")

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def read(self, keys: Sequence[str], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The named tensors on `device`, floating ones cast to `dtype` (as from_pretrained does)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt", device=str(device)) as h:
                for k in names:
                    t = h.get_tensor(k)
                    out[k] = t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
        return out

    def digest(self, key: str, dtype: torch.dtype) -> float:
        """`harp.search.tensor_digest` of a tensor, read a block of rows at a time (small transient)."""
        from safetensors import safe_open

        with safe_open(str(self.files[key]), framework="pt") as h:
            sl = h.get_slice(key)
            shape = list(sl.get_shape())
            if not shape:
                return tensor_digest(h.get_tensor(key).to(dtype))
            row = math.prod(shape[1:])
            return digest_rows(shape[0], row, lambda a, b: sl[a:b].to(dtype))


# ------------------------------------------------------------------------------------------------
# A model whose weights stay on disk until a part of it is needed
# ------------------------------------------------------------------------------------------------


_LIBC: Any = None


def release_freed_memory() -> None:
    """Return memory freed by dropped layers to the OS. glibc keeps freed heap pages mapped (they count
    as resident) and a streamed search frees a layer's worth of tensors per layer; without this the
    process keeps ~100 MiB more than it uses on SmolLM2-sized layers. No-op off Linux/glibc."""
    global _LIBC
    if _LIBC is False or not sys.platform.startswith("linux"):
        return
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False


def _identity_layer(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


class StreamedModel:
    """A transformers causal LM built on the meta device, whose modules are loaded from a safetensors
    folder on demand (`load`) and dropped again (`release`). `model` is an ordinary transformers model
    object, so the search code runs on it unchanged once the parts it touches are loaded."""

    def __init__(
        self,
        source: str | os.PathLike[str] | None,
        *,
        dtype: str | torch.dtype | None = "float32",
        device: str | torch.device | None = "cpu",
        attn_implementation: str | None = None,
    ) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = streamable_folder(source)
        self.dtype = torch_dtype(dtype)
        self.device = resolve_device(device)
        config = AutoConfig.from_pretrained(str(self.folder))
        refuse_pruned(config, f"{self.folder} is already a HARP-pruned checkpoint; search alphas on the original "
                      "model.")
        self.arch = arch_for(config)
        self.checkpoint = SafetensorsCheckpoint(self.folder)
        kw: dict[str, Any] = {"dtype": self.dtype}
        if attn_implementation:
            kw["attn_implementation"] = attn_implementation
        with init_empty_weights():  # parameters on the meta device, buffers (rotary tables) real
            model = AutoModelForCausalLM.from_config(config, **kw)
        model.eval()
        for name, buf in list(model.named_buffers()):
            if buf.device != self.device and buf.device.type != "meta":
                mod, leaf = self._owner(model, name)
                mod._buffers[leaf] = buf.to(self.device)
        self.model = model
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.head_key = f"{self.arch.lm_head}.weight"
        self.embed_key = f"{self.arch.embed}.weight"
        # instrumentation for tests and the benchmark: every load, in order
        self.loaded: list[list[str]] = []

    @staticmethod
    def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
        path, _, leaf = name.rpartition(".")
        return (get_module(root, path) if path else root), leaf

    def _key(self, name: str) -> str:
        if name in self.checkpoint:
            return name
        if self.tied and name == self.head_key and self.embed_key in self.checkpoint:
            return self.embed_key
        raise ValueError(
            f"Tensor {name} is not in the checkpoint {self.folder}: it does not match the transformers "
            f"layout of {type(self.model).__name__}. Re-save the model with save_pretrained."
        )

    def _params(self, paths: Iterable[str]) -> list[str]:
        prefixes = tuple(p + "." for p in paths)
        return [n for n, _ in self.model.named_parameters(remove_duplicate=False) if n.startswith(prefixes)]

    def resident(self) -> list[str]:
        """Names of the parameters currently loaded (not on the meta device)."""
        return [n for n, p in self.model.named_parameters(remove_duplicate=False) if not p.is_meta]

    @torch.no_grad()
    def load(self, paths: Iterable[str]) -> None:
        """Load the parameters of the modules at `paths` from disk (the tied head shares the embedding)."""
        paths = list(paths)
        names = [n for n in self._params(paths) if not (self.tied and n == self.head_key)]
        todo = [n for n in names if get_module(self.model, n).is_meta]
        values = self.checkpoint.read([self._key(n) for n in todo], self.device, self.dtype)
        for n in todo:
            mod, leaf = self._owner(self.model, n)
            mod._parameters[leaf] = nn.Parameter(values.pop(self._key(n)), requires_grad=False)
        if self.tied and any(self.head_key.startswith(p + ".") for p in paths):
            if get_module(self.model, self.embed_key).is_meta:
                self.load([self.arch.embed])
            head = get_module(self.model, self.arch.lm_head)
            head.weight = get_module(self.model, self.embed_key)
        self.loaded.append(todo)

    @torch.no_grad()
    def release(self, paths: Iterable[str]) -> None:
        """Put the parameters of the modules at `paths` back on the meta device (frees their memory)."""
        for n in self._params(paths):
            mod, leaf = self._owner(self.model, n)
            p = mod._parameters[leaf]
            if p is not None and not p.is_meta:
                mod._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        release_freed_memory()

    def digest(self, name: str, p: torch.Tensor) -> float:
        """The search fingerprint's digest of a state-dict entry, read from disk when not resident."""
        if not p.is_meta:
            return tensor_digest(p)
        return self.checkpoint.digest(self._key(name), p.dtype)

    @torch.no_grad()
    def capture(
        self,
        windows: torch.Tensor,
        start: int,
        batch_size: int,
        bar: Progress | None = None,
        keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[list[Batch], int]:
        """The residual stream entering layer `start` for every batch, computed one layer at a time, and
        the arguments every layer >= start receives; then layers >= start, the final norm and the head
        are loaded. Returns (batches, decoder-layer passes made)."""
        keep = keep or (lambda t: t)
        arch = self.arch
        stack = get_module(self.model, arch.layers)
        backbone = get_module(self.model, arch.backbone)
        num = len(stack)
        layer_paths = [f"{arch.layers}.{j}" for j in range(num)]
        # everything of the backbone that runs before the first layer: the embedding (and any extras)
        lower = [arch.final_norm, arch.layers]
        rel = arch.backbone + "."
        front = sorted({n.rpartition(".")[0] for n, _ in self.model.named_parameters(remove_duplicate=False)
                        if n.startswith(rel) and not n.startswith(tuple(x + "." for x in lower))})
        if bar is not None:
            bar.describe("embedding the calibration windows")
        self.load(front)

        # Pass 1: identity layers; record each layer's call and the embedding output.
        hidden: list[torch.Tensor] = []
        calls: list[dict[int, tuple[tuple, dict]]] = []
        windows_dev: list[torch.Tensor] = []
        for layer in stack:
            layer.forward = _identity_layer
        try:
            for i in range(0, len(windows), batch_size):
                w = windows[i : i + batch_size].to(self.device)
                got, first = record_layer_calls(backbone, stack, w, 0)
                windows_dev.append(w)
                calls.append(got)
                hidden.append(keep(first))
        finally:
            for layer in stack:
                del layer.forward
        if not self.tied:
            self.release([arch.embed])

        # Pass 2: the frozen bottom layers, one at a time.
        for j in range(start):
            if bar is not None:
                bar.describe(f"streaming layer {j + 1}/{start}")
            self.load([layer_paths[j]])
            for b in range(len(hidden)):
                rest, kw = calls[b][j]
                h = hidden[b].to(self.device)
                hidden[b] = keep(layer_output(stack[j](h, *rest, **kw)))
                del h
            self.release([layer_paths[j]])

        if bar is not None:
            bar.describe("loading the searched layers and the head")
        self.load(layer_paths[start:] + [arch.final_norm, arch.lm_head])
        batches = [
            Batch(w, h, {j: c[j] for j in range(start, num)})
            for w, h, c in zip(windows_dev, hidden, calls, strict=True)
        ]
        return batches, start






# ------------------------------------------------------------------------------------------------
# Where calibration activations live
# ------------------------------------------------------------------------------------------------


@contextmanager
def activation_store(
    where: str, device: torch.device, spill_dir: str | os.PathLike[str] | None = None
) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """A function that stores a hidden state: as it is on the compute device ("device"), on the CPU
    ("cpu"), or in a memory-mapped file under `spill_dir` ("disk"; the files are unlinked at once and
    vanish with the tensors). Stored tensors are moved back to the device when the search uses them."""
    if where not in ACTIVATIONS:
        raise ValueError(f"Unknown activations place {where!r}: use one of {', '.join(ACTIVATIONS)}.")
    if where == "device":
        yield lambda t: t
        return
    if where == "cpu":
        yield lambda t: t if t.device.type == "cpu" else t.to("cpu")
        return
    base = Path(spill_dir).expanduser() if spill_dir else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="harp-activations-", dir=base) as tmp:

        def spill(t: torch.Tensor) -> torch.Tensor:
            fd, path = tempfile.mkstemp(dir=tmp, suffix=".bin")
            try:
                os.ftruncate(fd, t.numel() * t.element_size())
            finally:
                os.close(fd)
            out = torch.from_file(path, shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
            os.unlink(path)  # the mapping keeps the data; the space is freed with the tensor
            out.copy_(t)
            return out

        yield spill


# ------------------------------------------------------------------------------------------------
# The streamed search
# ------------------------------------------------------------------------------------------------


