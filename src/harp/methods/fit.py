"""The closed-form refit of a pruned layer: the best linear map of HARP's shape, not just the best scale.

A HARP layer computes `alpha · W_O R · V` with `V = v_proj(norm(x))` (docs/method.md). The least-squares
refit keeps that shape — `v_proj` unchanged, a `hidden x kv_dim` output map — and chooses the map that
best reproduces the layer's true attention output `A` (for Gemma: before its post-attention norm) on
calibration tokens of the *original* model:

    W = (A Vᵀ + λ P)(V Vᵀ + λ I)⁻¹

a ridge regression shrunk toward a prior map P: zero (plain ridge) or the best scalar multiple of the
layer's own `W_O R` (shrinking toward HARP's solution). No gradient step, the same parameter count and
checkpoint shapes, so loading, the exporters and the serving engines are unchanged.

Only sufficient statistics are accumulated, batch by batch, in float64: `V Vᵀ`, `A Vᵀ` and `‖A‖²`
per layer and per fold of calibration windows — memory `kv_dim · (kv_dim + hidden)` per layer and
fold, never the activations. From them the error of any map on any fold is exact:
`‖A − W V‖² = ‖A‖² − 2 tr(W (A Vᵀ)ᵀ) + tr(W (V Vᵀ) Wᵀ)`, so the ridge and the prior are chosen per
layer by cross-validation over windows (`ridge="auto"`, `prior="auto"`) without another forward.

With an output bias on `o_proj` (LLaMA with `attention_bias`) a constant 1 is appended to V and the bias
is fitted too; Qwen2's v bias is part of V itself.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harp.engine.replay import Batch, Prepare, capture_inputs, run_layers
from harp.model.prune import refuse_pruned
from harp.modeling import (
    HarpLinearAttention,
    LinearMap,
    arch_for,
    attention_geometry,
    fold_output,
    get_module,
    layer_indices,
)
from harp.util.progress import Progress

FIT_METHODS = ("none", "lstsq")
PRIORS = ("zero", "alpha")
# relative ridge strengths tried by ridge="auto": λ = r · mean(diag(V Vᵀ))
RIDGE_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
DEFAULT_FOLDS = 4


@dataclass
class FitStats:
    """Sufficient statistics of one layer's regression on one fold of windows (float64)."""

    gram: torch.Tensor  # Σ V Vᵀ      (d x d), d = kv_dim (+1 with an output bias)
    cross: torch.Tensor  # Σ A Vᵀ     (hidden x d)
    target: float = 0.0  # Σ ‖A‖²
    tokens: int = 0

    def __add__(self, other: FitStats) -> FitStats:
        return FitStats(self.gram + other.gram, self.cross + other.cross, self.target + other.target,
                      self.tokens + other.tokens)

    def __sub__(self, other: FitStats) -> FitStats:
        return FitStats(self.gram - other.gram, self.cross - other.cross, self.target - other.target,
                      self.tokens - other.tokens)

    def error(self, w: torch.Tensor) -> float:
        """‖A − W V‖² over these tokens, from the statistics alone."""
        return float(self.target - 2.0 * (w * self.cross).sum() + ((w @ self.gram) * w).sum())


@dataclass
class LayerFit:
    layer: int
    ridge: float  # relative: λ = ridge · mean(diag(V Vᵀ))
    prior: str  # "zero" | "alpha"
    calib_error: float  # relative reconstruction error ‖A − W V‖² / ‖A‖² on all calibration tokens
    heldout_error: float | None  # the same, cross-validated (each fold fitted without its windows)
    alpha: float  # the best scalar alpha for this layer in the same sense (HARP's one-parameter fit)
    alpha_error: float  # its relative reconstruction error
    target: float  # ‖A‖² summed over the calibration tokens (the errors above are relative to it)
    map: LinearMap = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "map"}


@dataclass
class FitResult:
    layers: list[int]  # fitted layers, top first
    fits: dict[int, LayerFit]
    tokens: int  # calibration tokens per layer regression
    folds: int
    seconds: float
    layer_forwards: int

    @property
    def maps(self) -> dict[int, LinearMap]:
        return {i: f.map for i, f in self.fits.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "lstsq",
            "layers": self.layers,
            "tokens": self.tokens,
            "folds": self.folds,
            "seconds": self.seconds,
            "layer_forwards": self.layer_forwards,
            "per_layer": [self.fits[i].to_dict() for i in self.layers],
        }


def check_fit_method(name: str) -> str:
    if name not in FIT_METHODS:
        raise ValueError(f"Unknown fit {name!r}: use one of {', '.join(FIT_METHODS)} "
                         "('none' is the paper's HARP, 'lstsq' the closed-form refit).")
    return name


def check_fit_settings(method: str, ridge: float | str = "auto", prior: str = "auto") -> str:
    """Validate a fit method and its ridge/prior before any work; returns the method."""
    _resolve_ridge(ridge)
    _resolve_prior(prior)
    return check_fit_method(method)


def solve_map(stats: FitStats, ridge: float, prior: torch.Tensor | None) -> torch.Tensor:
    """(A Vᵀ + λ P)(V Vᵀ + λ I)⁻¹ with λ = ridge · mean diag; falls back to a pseudo-inverse if singular."""
    g = stats.gram
    lam = ridge * float(g.diagonal().mean().clamp_min(1e-300))
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    rhs = stats.cross if prior is None or lam == 0 else stats.cross + lam * prior
    a = g + lam * eye
    try:
        chol = torch.linalg.cholesky(a)
        return torch.cholesky_solve(rhs.T, chol).T
    except RuntimeError:  # singular without (enough) ridge: the minimum-norm least-squares map
        return (torch.linalg.pinv(a, hermitian=True) @ rhs.T).T


def heldout_errors(train: FitStats, held: FitStats, ridges: list[float],
                    priors: dict[str, torch.Tensor | None]) -> dict[tuple[float, str], float]:
    """Error on `held` of the map fitted on `train`, for every ridge and prior, from one eigendecomposition
    of the training Gram matrix (W(λ) = (C + λP) Q (Λ + λ)⁻¹ Qᵀ): every candidate costs a few matrix
    products, no factorisation."""
    evals, q = torch.linalg.eigh(train.gram)
    evals = evals.clamp_min(0.0)
    mean_diag = float(train.gram.diagonal().mean().clamp_min(1e-300))
    cq = train.cross @ q
    held_cq = held.cross @ q
    held_g = q.T @ held.gram @ q
    out: dict[tuple[float, str], float] = {}
    for name, prior in priors.items():
        pq = None if prior is None else prior @ q
        for r in ridges:
            lam = r * mean_diag
            denom = evals + lam
            inv = torch.where(denom > 1e-12 * max(float(evals.max()), 1e-300), 1.0 / denom, torch.zeros_like(denom))
            m = (cq if pq is None or lam == 0 else cq + lam * pq) * inv  # W Q, (hidden x d)
            out[(r, name)] = float(held.target - 2.0 * (m * held_cq).sum() + ((m @ held_g) * m).sum())
    return out


def _best_alpha(stats: FitStats, w0: torch.Tensor) -> float:
    """argmin_a ‖A − a W0 V‖² (unconstrained; the grid search picks from a grid, this is its optimum)."""
    den = float(((w0 @ stats.gram) * w0).sum())
    return float((w0 * stats.cross).sum()) / den if den > 0 else 0.0


def _resolve_ridge(ridge: float | str) -> list[float]:
    if ridge == "auto":
        return list(RIDGE_GRID)
    try:
        r = float(ridge)
    except (TypeError, ValueError):
        raise ValueError(f"Ridge {ridge!r}: give a number >= 0 (relative to the mean of diag(V Vᵀ)) "
                         "or 'auto'.") from None
    if not math.isfinite(r) or r < 0:
        raise ValueError(f"Ridge {ridge!r}: must be a finite number >= 0, or 'auto'.")
    return [r]


def _resolve_prior(prior: str) -> list[str]:
    if prior == "auto":
        return list(PRIORS)
    if prior not in PRIORS:
        raise ValueError(f"Unknown prior {prior!r}: use 'zero', 'alpha' or 'auto'.")
    return [prior]


@torch.no_grad()
def fit_layers(
    model: nn.Module,
    windows: torch.Tensor,
    layers: Sequence[int],
    *,
    ridge: float | str = "auto",
    prior: str = "auto",
    folds: int = DEFAULT_FOLDS,
    batch_size: int = 4,
    progress: bool = False,
    prepare: Prepare | None = None,
) -> FitResult:
    """Least-squares refit of the output map of each layer in `layers`, from the original model.

    Args:
        model: the original (unpruned) model; it is not changed. Prune with the result afterwards:
            `harp.prune(model, layers, alphas, maps=result.maps)` (alpha 1 uses the fit as it is).
        windows: calibration token windows (N, S).
        layers: decoder layer indices (any depth); every one is fitted on the original model's inputs.
        ridge: relative ridge strength, or "auto" (chosen per layer by cross-validation over windows
            from `RIDGE_GRID`).
        prior: what the ridge shrinks toward: "zero", "alpha" (the best scalar multiple of the layer's
            own `W_O R`), or "auto" (chosen per layer with the ridge).
        folds: cross-validation folds over windows (ridge/prior "auto"); at most N.
        prepare: supplies the replay batches entering the lowest layer (the streamed model); default
            one forward of `model`.

    Returns a `FitResult` with one `LayerFit` (map, errors, chosen ridge and prior) per layer.
    """
    refuse_pruned(model, "This model is already HARP-pruned; fit the layers of the original model.")
    arch = arch_for(model.config)
    stack = get_module(model, arch.layers)
    order = sorted(layer_indices(list(layers), len(stack)), reverse=True)
    if not order:
        raise ValueError("fit_layers needs at least one layer.")
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError("Calibration windows must be a (N, seq_len) tensor with N >= 1 and seq_len >= 2.")
    ridges, priors = _resolve_ridge(ridge), _resolve_prior(prior)
    n_folds = max(1, min(int(folds), windows.shape[0]))
    search_cv = len(ridges) * len(priors) > 1
    if search_cv and n_folds < 2:
        raise ValueError(f"Choosing the ridge needs at least 2 calibration windows for cross-validation "
                         f"(got {windows.shape[0]}); give more windows or a fixed ridge.")
    geo = attention_geometry(model.config)
    t0 = time.perf_counter()
    with Progress(len(windows), "fitting pruned layers", enabled=progress) as bar:
        batches, forwards = _stream_entering(model, windows, order[-1], batch_size, prepare, bar)
        stats = _accumulate_stats(model, batches, order, n_folds, bar)
    forwards += len(batches) * (order[0] - order[-1] + 1)

    fits: dict[int, LayerFit] = {}
    for i in order:
        parts = [s for s in stats[i] if s is not None]
        total = parts[0]
        for s in parts[1:]:
            total = total + s
        fits[i] = _fit_one(i, stack[i], arch, geo, total, parts, ridges, priors, search_cv)
    return FitResult(
        layers=order, fits=fits, tokens=total.tokens, folds=len(parts),
        seconds=time.perf_counter() - t0, layer_forwards=forwards,
    )


def _stream_entering(model: nn.Module, windows: torch.Tensor, lo: int, batch_size: int, prepare: Prepare | None,
                     bar: Progress) -> tuple[list[Batch], int]:
    """The replay batches entering layer `lo`, and how many decoder-layer passes producing them took."""
    if prepare is not None:
        return prepare(lo, bar)
    bar.describe("caching the residual stream")
    return capture_inputs(model, windows, lo, batch_size), lo


def _accumulate_stats(model: nn.Module, batches: list[Batch], order: list[int], n_folds: int,
                      bar: Progress) -> dict[int, list[FitStats | None]]:
    """Replay layers lowest..highest of `order` on every batch, adding each fitted layer's (V, A) statistics to
    the fold of each window (windows are dealt to folds round-robin)."""
    arch = arch_for(model.config)
    stack = get_module(model, arch.layers)
    lo, hi = order[-1], order[0]
    stats: dict[int, list[FitStats | None]] = {i: [None] * n_folds for i in order}
    first = 0
    for b in batches:
        fold_of = [(first + r) % n_folds for r in range(b.windows.shape[0])]
        first += b.windows.shape[0]
        h = b.hidden
        for j in range(lo, hi + 1):
            handle = None
            if j in stats:
                attn = getattr(stack[j], arch.attn)
                with_bias = attn.o_proj.bias is not None
                handle = attn.register_forward_hook(_accumulator(stats[j], fold_of, with_bias), with_kwargs=True)
            try:
                h = run_layers(model, b, h, j, j + 1)
            finally:
                if handle is not None:
                    handle.remove()
        bar.advance(b.windows.shape[0])
    return stats


def _accumulator(slots: list[FitStats | None], fold_of: list[int], with_bias: bool) -> Callable:
    """A forward hook on an attention module that adds its (V, A) statistics to `slots[fold]`."""

    def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        a = out[0] if isinstance(out, tuple) else out
        v = mod.v_proj(x).double()
        if with_bias:
            v = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)
        a = a.double()
        for r, f in enumerate(fold_of):
            vr, ar = v[r], a[r]
            s = FitStats(vr.T @ vr, ar.T @ vr, float((ar * ar).sum()), vr.shape[0])
            slots[f] = s if slots[f] is None else slots[f] + s

    return hook


def _fit_one(idx: int, layer: nn.Module, arch: Any, geo: dict[str, int], total: FitStats, parts: list[FitStats],
             ridges: list[float], priors: list[str], search_cv: bool) -> LayerFit:
    attn = getattr(layer, arch.attn)
    if isinstance(attn, HarpLinearAttention):  # already folded (a teacher in the tests)
        w0 = attn.o_proj.weight.detach().double().to(total.gram.device)
    else:
        w0 = fold_output(attn.o_proj.weight, geo["heads"], geo["kv_heads"], geo["head_dim"]).to(total.gram.device)
    with_bias = attn.o_proj.bias is not None  # the statistics carry a constant-1 column exactly then
    if with_bias:
        w0 = torch.cat([w0, attn.o_proj.bias.detach().double().to(w0.device)[:, None]], dim=1)
    unknowns = total.gram.shape[0]
    if total.tokens < unknowns:
        warnings.warn(
            f"Layer {idx}: {total.tokens} calibration tokens for {unknowns} unknowns per output: the fit is "
            f"under-determined and only the ridge keeps it unique. Give at least {unknowns} tokens (better "
            f"{10 * unknowns}): more or longer `calib_windows`.",
            stacklevel=3,
        )
    target = max(total.target, 1e-300)

    def prior_map(s: FitStats, name: str) -> torch.Tensor | None:
        return None if name == "zero" else _best_alpha(s, w0) * w0

    best = (math.inf, ridges[0], priors[0])
    if search_cv:
        errs = {(r, p): 0.0 for r in ridges for p in priors}
        for held in parts:
            train = total - held
            priors_now = {p: prior_map(train, p) for p in priors}
            for (r, p), e in heldout_errors(train, held, ridges, priors_now).items():
                errs[(r, p)] += e
        best = min((e, r, p) for (r, p), e in errs.items())
    _, r, p = best
    w = solve_map(total, r, prior_map(total, p))
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"Layer {idx}: the least-squares fit is not finite (degenerate calibration "
                         "activations); use a larger ridge.")
    if total.gram.diagonal().min() <= 0 or r == 0:
        cond = torch.linalg.cond(total.gram)
        if not torch.isfinite(cond) or cond > 1e12:
            warnings.warn(f"Layer {idx}: V Vᵀ is singular or nearly so (condition {float(cond):.2g}); "
                          "the ridge keeps the fit solvable.", stacklevel=3)
    alpha = _best_alpha(total, w0)
    calib_error = total.error(w) / target
    bias = None
    if with_bias:
        w, bias = w[:, :-1].contiguous(), w[:, -1].contiguous()
    return LayerFit(
        layer=idx, ridge=r, prior=p,
        calib_error=calib_error,
        heldout_error=best[0] / target if search_cv else None,
        alpha=alpha, alpha_error=total.error(alpha * w0) / target, target=total.target,
        map=LinearMap(w.cpu(), None if bias is None else bias.cpu()),
    )
