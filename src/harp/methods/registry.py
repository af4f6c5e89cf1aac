"""The methods `harp compare` knows: one `MethodSpec` each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str  # "attention" (HARP-style sub-layer pruning) | "blocks" (whole layers removed)
    summary: str
    reference: str
    lists_alphas: bool = False  # the alphas come from a search: `harp compare`'s report lists them
    refit: bool = False  # the pruned layers get the least-squares refit (auto-k gives these a k of their own)


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("harp", "attention", "top k layers, rescaled identity attention, greedy alpha search",
                   "Liu & Liu 2025 (HARP)", lists_alphas=True),
        MethodSpec("harp-refine", "attention", "as harp, then coordinate-descent refinement of the alphas",
                   "ours", lists_alphas=True),
        MethodSpec("no-rescale", "attention", "top k layers, identity attention, alpha = 1", "HARP ablation"),
        MethodSpec("attn-drop-top", "attention", "top k layers, attention sub-layer removed (alpha = 0)",
                   "HARP ablation"),
        MethodSpec("harp-low", "attention", "bottom k layers, greedy alpha search", "HARP ablation",
                   lists_alphas=True),
        MethodSpec("harp-any", "attention", "k layers at any depth picked by Attention Drop's score, "
                   "greedy alpha search", "ours: HARP rescaling on He et al.'s layers", lists_alphas=True),
        MethodSpec("harp-ls", "attention", "top k layers, each layer's map refit by closed-form least squares",
                   "ours (docs/method.md, closed-form refit)", refit=True),
        MethodSpec("harp-any-ls", "attention", "k layers at any depth picked by Attention Drop's score, maps "
                   "refit by closed-form least squares", "ours", refit=True),
        MethodSpec("attention-drop", "attention", "k most redundant attention sub-layers (cosine), removed",
                   "He et al. 2024"),
        MethodSpec("shortgpt", "blocks", "k whole layers with the lowest Block Influence, removed",
                   "Men et al. 2024"),
        MethodSpec("sleb", "blocks", "k whole layers removed greedily by calibration perplexity",
                   "Song et al. 2024"),
    )
}


def parse_methods(spec: str | Sequence[str] | None) -> list[str]:
    """'harp,no-rescale' (or 'all') -> validated names, in the given order, duplicates dropped."""
    if spec is None or spec == "all":
        return list(METHODS)
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise ValueError(f"No methods given. Valid methods: {', '.join(METHODS)} (or 'all').")
    names = [n.replace("_", "-") for n in names]
    if "all" in names:
        return list(METHODS)
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise ValueError(f"Unknown method(s) {', '.join(map(repr, bad))}. Valid methods: {', '.join(METHODS)}.")
    return list(dict.fromkeys(names))
