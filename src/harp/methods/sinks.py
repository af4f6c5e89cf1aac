"""Fitted sinks: constants that stand in for a window layer's sink tokens, so that an engine whose sliding
window keeps no first tokens (vLLM) serves the layer at nearly their quality.

A window layer that also sees the first s positions (attention sinks) gives them, far from the start, a
share of each head's attention that barely depends on the query: most heads park probability mass there.
Without them the window's keys take all of it. Per head, on calibration text, with s real sink tokens in
every window layer at once, at the queries whose window no longer reaches the sinks:

    b     = mean over queries of log sum_sinks exp(logit)       the sinks' unnormalised attention mass
    share = mean of sigmoid(b - logsumexp_window(logit))        the share b takes beside the window
    value = mean of the sinks' own attention output             (what that share carried)

The layer then gets one more softmax column with logit b and no value (vLLM's attention `sinks`, gpt-oss's
`s_aux`) and a constant `o_proj(share * value)` added to its output (an output bias): `FittedSink`. Measured
on SmolLM2 and Qwen2.5-Coder windows of 256 (docs/window-layers.md), this closes 86-100 % of the perplexity
gap between no sink tokens and 4, on text the constants were not fitted on.

The statistics come from an attention function of this module that the window layers alone call while
fitting (plain eager attention, with the family's logit softcap): the rest of the model runs as loaded.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harp.engine.text import DEFAULT_CALIB, calibration_windows, check_text
from harp.model.prune import temporarily_pruned
from harp.modeling import FittedSink, arch_for, attention_geometry, get_module
from harp.util.problems import Collector
from harp.util.progress import Progress

SINK_TOKENS = 4  # the sink tokens fitted sinks stand in for (StreamingLLM's 4)
SINK_FIT_WINDOWS = 4  # calibration windows the sinks are fitted on, each sink_fit_seq_len tokens
_ATTENTION = "harp_sink_fit"


def sink_fit_seq_len(window: int, max_positions: int | None) -> int:
    """The calibration window length fitted sinks are fitted on: 2 x window, at least 1,024, at most the
    model's maximum context (the statistics are taken past window + SINK_TOKENS)."""
    return min(max(1024, 2 * window), max_positions or 2 * window)


def sink_fit_windows(ids: torch.Tensor, window: int, max_positions: int | None, seed: int = 0, *,
                     bos: int | None = None) -> torch.Tensor:
    """The SINK_FIT_WINDOWS calibration windows (seeded, from the token stream `ids`) fitted sinks for
    windows of `window` tokens are fitted on, each `sink_fit_seq_len` tokens."""
    return calibration_windows(ids, SINK_FIT_WINDOWS, sink_fit_seq_len(window, max_positions), seed, bos=bos)


def check_sink_fit(window: int, max_positions: int | None, calib: str | None, out: Collector, *, what: str,
                   fix: str) -> bool:
    """Before loading: fitting sinks for windows of `window` tokens needs calibration windows longer than
    window + SINK_TOKENS within the model's context, and the calibration text `calib` must hold
    SINK_FIT_WINDOWS of them. `what` names the asker in the message, `fix` says what to do instead. False
    (and a problem in `out`) when the context leaves no room."""
    seq = sink_fit_seq_len(window, max_positions)
    if seq <= window + SINK_TOKENS:
        out.add(f"{what} fits the sinks past window + {SINK_TOKENS} tokens, but a window of {window} leaves no "
                f"room in this model's {max_positions:,}-token context: {fix}.")
        return False
    check_text(calib, DEFAULT_CALIB, "calib", SINK_FIT_WINDOWS, seq, out)
    return True


@dataclass
class SinkFit:
    """Fitted sinks per window layer, with what they were fitted on."""

    fitted: dict[int, FittedSink]
    sinks: int  # the real sink tokens they stand in for
    tokens: int  # calibration tokens run
    queries: int  # queries per head the statistics were taken at (past every window)
    share: dict[int, float] = field(default_factory=dict)  # the mean share b takes, per layer

    def to_dict(self) -> dict[str, Any]:
        return {"sinks": self.sinks, "tokens": self.tokens, "queries": self.queries,
                "share": {str(i): round(s, 4) for i, s in sorted(self.share.items(), reverse=True)},
                "logit": {str(i): [round(float(x), 4) for x in f.logit] for i, f in sorted(self.fitted.items(),
                                                                                           reverse=True)}}


class _Probe:
    """One window layer's statistics, taken by `_attention`: the window layer sets `positions` (its queries'
    and keys' absolute positions) before each attention call."""

    def __init__(self, window: int, sinks: int) -> None:
        self.window, self.sinks = window, sinks
        self.positions: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sink_lse: list[torch.Tensor] = []  # (heads, queries) each
        self.window_lse: list[torch.Tensor] = []
        self.sink_out: list[torch.Tensor] = []  # (heads, queries, head_dim)

    def take(self, logits: torch.Tensor, value: torch.Tensor) -> None:
        """Record the far queries of one call: `logits` (batch, heads, queries, keys) after scaling and
        softcap, `value` (batch, heads, keys, head_dim) repeated to the query heads."""
        if self.positions is None:
            return
        queries, keys = self.positions
        self.positions = None
        far = queries >= self.window + self.sinks  # the window has left every sink behind
        if not bool(far.any()):
            return
        q, k = queries[far].view(-1, 1), keys.view(1, -1)
        sink = (keys < self.sinks).to(logits.device)
        band = ((k <= q) & (q - k < self.window)).to(logits.device)
        lg = logits[:, :, far.to(logits.device)].double()  # (batch, heads, far, keys)
        s_logits = lg[..., sink]
        self.sink_lse.append(torch.logsumexp(s_logits, -1).transpose(0, 1).flatten(1))
        self.window_lse.append(torch.logsumexp(lg.masked_fill(~band, float("-inf")), -1).transpose(0, 1).flatten(1))
        out = torch.softmax(s_logits, -1) @ value[..., sink, :].double()  # (batch, heads, far, head_dim)
        self.sink_out.append(out.transpose(0, 1).flatten(1, 2))

    def fitted(self, o_weight: torch.Tensor) -> tuple[FittedSink, float, int]:
        sink_lse, window_lse = torch.cat(self.sink_lse, 1), torch.cat(self.window_lse, 1)
        b = sink_lse.mean(1)
        share = torch.sigmoid(b[:, None] - window_lse).mean(1)
        value = torch.cat(self.sink_out, 1).mean(1)  # (heads, head_dim)
        bias = o_weight.detach().double() @ (share[:, None] * value).flatten()
        return FittedSink(b.float(), bias.float()), float(share.mean()), sink_lse.shape[1]


def _repeat(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               softcap: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Eager attention (the family's scaling and logit softcap, a boolean or additive mask, or causal without
    one) that also hands the logits to the layer's probe."""
    heads = query.shape[1]
    k, v = _repeat(key, heads), _repeat(value, heads)
    logits = (query @ k.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    module.harp_probe.take(logits, v)
    n_q, n_k = logits.shape[-2:]
    if attention_mask is None:
        attention_mask = torch.ones(n_q, n_k, dtype=torch.bool, device=logits.device).tril(n_k - n_q)
    mask = attention_mask[..., :n_k]
    if mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    else:
        logits = logits + mask
    p = torch.softmax(logits.float(), -1).to(v.dtype)
    return (p @ v).transpose(1, 2).contiguous(), None


@contextmanager
def _probing(attns: Mapping[int, nn.Module], windows: Mapping[int, int], sinks: int) -> Iterator[dict[int, _Probe]]:
    """The window layers call `_attention` (through a copy of their config) with a probe each; the model's
    other layers and its masks are untouched."""
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTENTION, _attention)
    probes, saved = {}, {}
    try:
        for i, attn in attns.items():
            saved[i] = attn.config
            attn.config = copy.copy(attn.config)
            attn.config._attn_implementation = _ATTENTION
            probes[i] = attn.harp_probe = _Probe(windows[i], sinks)
        yield probes
    finally:
        for i, attn in attns.items():
            if i in saved:
                attn.config = saved[i]
            attn.__dict__.pop("harp_probe", None)


@torch.no_grad()
def fit_sinks(model: nn.Module, windows_ids: torch.Tensor, windows: Mapping[int, int], *, sinks: int = SINK_TOKENS,
              progress: bool = False) -> SinkFit:
    """Fit the sinks of window layers `windows` ({layer: w}) on calibration token windows `windows_ids`
    (n x seq_len; each longer than every w + `sinks`): the layers become window layers with `sinks` real
    sink tokens for the fit (the model is restored after). Pass the result's `fitted` to
    `harp.prune(..., windows=..., sinks=0, fitted_sinks=...)`. Raises ValueError naming the problem."""
    windows = dict(windows)
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 1:
        raise ValueError(f"`sinks={sinks!r}`: fitted sinks stand in for a whole number >= 1 of sink tokens.")
    if windows_ids.dim() != 2:
        raise ValueError(f"Calibration windows must be a 2-D tensor (windows x tokens), got {windows_ids.dim()}-D.")
    need = max(windows.values(), default=0) + sinks + 1
    if windows_ids.shape[1] < need:
        raise ValueError(f"Fitting sinks for windows of {max(windows.values())} tokens needs calibration windows "
                         f"longer than window + {sinks} sinks ({need} tokens or more); these have "
                         f"{windows_ids.shape[1]}. Use longer windows or a smaller window.")
    arch = arch_for(model.config)
    device = next(model.parameters()).device
    with temporarily_pruned(model, [], [], windows=windows, sinks=sinks):
        stack = get_module(model, arch.layers)
        attns = {i: getattr(stack[i], arch.attn) for i in windows}
        with _probing(attns, windows, sinks) as probes, Progress(len(windows_ids), "fitting sinks",
                                                                  enabled=progress) as bar:
            for row in windows_ids:
                model(row[None].to(device), use_cache=False)
                bar.advance()
        heads = attention_geometry(model.config)["heads"]
        fitted, share, queries = {}, {}, 0
        for i, probe in probes.items():
            fitted[i], share[i], queries = probe.fitted(attns[i].o_proj.weight)
            assert fitted[i].logit.shape == (heads,)
    return SinkFit(fitted, sinks, int(windows_ids.numel()), queries, share)
