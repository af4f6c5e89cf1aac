"""Order-sensitive float64 digests of tensors, for the search's resume fingerprint."""

from __future__ import annotations

from collections.abc import Callable

import torch

_DIGEST_ELEMENTS = 1 << 22  # float64 sums of at most this many elements at a time: no full float64 copy


def digest_rows(rows: int, row_elements: int, read: Callable[[int, int], torch.Tensor]) -> float:
    """Sum of a tensor in float64, read `read(r0, r1)` a block of rows at a time. The blocks depend only
    on the shape, so a tensor in memory and the same tensor read from disk by rows give the same sum."""
    step = max(1, _DIGEST_ELEMENTS // max(1, row_elements))
    return sum(float(read(r, min(rows, r + step)).double().sum()) for r in range(0, rows, step))


def tensor_digest(t: torch.Tensor) -> float:
    t = t.detach().reshape(1, -1) if t.dim() == 0 else t.detach()
    return digest_rows(t.shape[0], t[0].numel(), lambda a, b: t[a:b])
