"""Perplexity, the standard way: non-overlapping windows, mean token NLL over the whole set, and the
LM-head loss computed in chunks so memory never holds vocab x all-tokens logits."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harp.modeling import arch_for, get_module
from harp.util.progress import Progress


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens (windows x (seq_len - 1))
    windows: int
    seq_len: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def head_nll(model: nn.Module, hidden: torch.Tensor, windows: torch.Tensor, chunk_tokens: int = 1024) -> float:
    """Sum of next-token NLL (float64) given final-normed hidden states (B, S, H) of `windows` (B, S).

    Position t predicts token t+1; logits are made `chunk_tokens` rows at a time (with Gemma's final
    soft-capping when the config has it) and never all at once.
    """
    arch = arch_for(model.config)
    head = get_module(model, arch.lm_head)
    cap = getattr(model.config, "final_logit_softcapping", None)
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    t = windows[:, 1:].reshape(-1).to(h.device)
    total = 0.0
    for i in range(0, h.shape[0], chunk_tokens):
        logits = head(h[i : i + chunk_tokens]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        total += float(F.cross_entropy(logits, t[i : i + chunk_tokens], reduction="sum", ).double())
    return total


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    chunk_tokens: int = 1024,
    progress: bool | str = False,
) -> PerplexityResult:
    """Perplexity of `model` over `windows` (N, S): exp(mean NLL of the N x (S-1) predicted tokens)."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError("windows must be a 2-D tensor (N, seq_len) with seq_len >= 2.")
    arch = arch_for(model.config)
    backbone = get_module(model, arch.backbone)
    dev = model_device(model)
    total = 0.0
    desc = progress if isinstance(progress, str) else "perplexity"
    with Progress(len(windows), desc, enabled=bool(progress)) as bar:
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size].to(dev)
            hidden = backbone(input_ids=batch, use_cache=False).last_hidden_state
            total += head_nll(model, hidden, batch, chunk_tokens)
            bar.advance(len(batch))
    n = windows.shape[0] * (windows.shape[1] - 1)
    nll = total / n
    return PerplexityResult(math.exp(nll), nll, n, windows.shape[0], windows.shape[1])
