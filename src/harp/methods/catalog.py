"""The methods `harp compare` knows, each declared once: its `MethodSpec` and its selection rule,
`(selector, k) -> Selection`, joined by `@register`. The order here is the order of `METHODS`, of
`--methods all` and of compare's tables. Adding a method is one block in this file; selection code of
its own (a search, a score) goes in a module under `methods/` and, if several methods share it, gets
a cache on `Selector`.

All methods remove or bypass k attention sub-layers (kind "attention": layers and alphas) or k whole
layers (kind "blocks"), so they compare at equal KV-cache reduction.
"""

from __future__ import annotations

import time
from typing import Any

from harp.methods.refine import RefineResult, refine_alphas
from harp.methods.registry import MethodSpec, Selection, register
from harp.methods.scores import ATTENTION_DROP_SCORE, pick
from harp.methods.search import top_layers
from harp.methods.selector import Selector
from harp.methods.sinks import SINK_TOKENS, fit_sinks, sink_fit_windows


def _greedy(sel: Selector, method: str, layers: list[int]) -> Selection:
    g = sel.greedy(layers)
    return Selection(method, "attention", g["layers"], g["alphas"], g["seconds"], g["ppl"],
                     {"grid": sel.grid, "calib_ppl_per_layer": g["ppls"]})


def _attention_drop(sel: Selector, k: int) -> tuple[list[int], dict[str, Any]]:
    """Attention Drop's k layers (any depth) and the evidence a selection built on them carries."""
    s, sec = sel.scores("attention-drop")
    return pick(s, k, highest=True), {"scores": s, "score": ATTENTION_DROP_SCORE, "score_seconds": sec}


@register(MethodSpec("harp", "attention", "top k layers, rescaled identity attention, greedy alpha search",
                     "Liu & Liu 2025 (HARP)", lists_alphas=True))
def _harp(sel: Selector, k: int) -> Selection:
    return _greedy(sel, "harp", top_layers(sel.num_layers, k))


@register(MethodSpec("harp-refine", "attention", "as harp, then coordinate-descent refinement of the alphas",
                     "ours", lists_alphas=True))
def _harp_refine(sel: Selector, k: int) -> Selection:
    g = sel.greedy(top_layers(sel.num_layers, k))
    r: RefineResult = refine_alphas(sel.model, sel.windows, g["layers"], g["alphas"], grid=sel.grid,
                                    max_passes=sel.refine_passes, batch_size=sel.batch_size, progress=sel.progress)
    sel.log(f"  refine: calibration ppl {r.start_ppl:.3f} -> {r.final_ppl:.3f} "
            f"({100 * r.gain:.2f} % lower) in {len(r.passes)} passes")
    info = {"greedy_alphas": g["alphas"], "greedy_calib_ppl": r.start_ppl, "refined_calib_ppl": r.final_ppl,
            "gain": r.gain, "passes": r.passes, "greedy_seconds": g["seconds"],
            "refine_seconds": r.seconds, "evaluations": r.evaluations}
    return Selection("harp-refine", "attention", r.layers, r.alphas, g["seconds"] + r.seconds, r.final_ppl, info)


@register(MethodSpec("no-rescale", "attention", "top k layers, identity attention, alpha = 1", "HARP ablation"))
def _no_rescale(sel: Selector, k: int) -> Selection:
    return Selection("no-rescale", "attention", top_layers(sel.num_layers, k), [1.0] * k)


@register(MethodSpec("attn-drop-top", "attention", "top k layers, attention sub-layer removed (alpha = 0)",
                     "HARP ablation"))
def _attn_drop_top(sel: Selector, k: int) -> Selection:
    return Selection("attn-drop-top", "attention", top_layers(sel.num_layers, k), [0.0] * k)


@register(MethodSpec("harp-low", "attention", "bottom k layers, greedy alpha search", "HARP ablation",
                     lists_alphas=True))
def _harp_low(sel: Selector, k: int) -> Selection:
    return _greedy(sel, "harp-low", list(range(k - 1, -1, -1)))


@register(MethodSpec("harp-any", "attention", "k layers at any depth picked by Attention Drop's score, "
                     "greedy alpha search", "ours: HARP rescaling on He et al.'s layers", lists_alphas=True))
def _harp_any(sel: Selector, k: int) -> Selection:
    layers, evidence = _attention_drop(sel, k)
    chosen = _greedy(sel, "harp-any", layers)
    chosen.search_seconds += evidence["score_seconds"]
    chosen.info.update(evidence)
    return chosen


@register(MethodSpec("harp-ls", "attention", "top k layers, each layer's map refit by closed-form least squares",
                     "ours (docs/method.md, closed-form refit)", refit=True))
def _harp_ls(sel: Selector, k: int) -> Selection:
    chosen = sel.fit(top_layers(sel.num_layers, k))
    chosen.method = "harp-ls"
    return chosen


@register(MethodSpec("harp-any-ls", "attention", "k layers at any depth picked by Attention Drop's score, maps "
                     "refit by closed-form least squares", "ours", refit=True))
def _harp_any_ls(sel: Selector, k: int) -> Selection:
    layers, evidence = _attention_drop(sel, k)
    chosen = sel.fit(layers)
    chosen.method = "harp-any-ls"
    chosen.search_seconds += evidence["score_seconds"]
    chosen.info.update(evidence)
    return chosen


@register(MethodSpec("attention-drop", "attention", "k most redundant attention sub-layers (cosine), removed",
                     "He et al. 2024"))
def _attention_drop_method(sel: Selector, k: int) -> Selection:
    layers, evidence = _attention_drop(sel, k)
    return Selection("attention-drop", "attention", layers, [0.0] * k, evidence["score_seconds"], None,
                     {"scores": evidence["scores"], "score": evidence["score"]})


SINKS = 4  # the first tokens window methods keep visible (harp prune --window's default --sinks)


def _window(method: str, layers: list[int], window: int, sinks: int = SINKS) -> Selection:
    return Selection(method, "window", layers, None, window=window, sinks=sinks,
                     info={"window": window, "sinks": sinks})


# Window layers keep their attention over the last w tokens and the first SINKS (attention sinks): at long
# context their KV cache and attention cost approach those of a removed layer (k/L x (1 - (w + s)/n));
# below w tokens they are the original layer.
for _w in (64, 256, 1024):
    register(MethodSpec(f"window-{_w}", "window", f"top k layers keep attention over their last {_w} tokens "
                        f"and the first {SINKS}", "ours (issue 23; sliding windows as Mistral / Gemma, sinks "
                        "as StreamingLLM)"))(
        lambda sel, k, _w=_w: _window(f"window-{_w}", top_layers(sel.num_layers, k), _w))


@register(MethodSpec("window-256-nosink", "window", "top k layers keep attention over their last 256 tokens "
                     "only (no sink tokens)", "ablation of window-256"))
def _window_nosink(sel: Selector, k: int) -> Selection:
    return _window("window-256-nosink", top_layers(sel.num_layers, k), 256, sinks=0)


# Fitted sinks (harp.methods.sinks): a sink logit per head and an output bias in place of the sink tokens,
# fitted on calibration text with real ones; what vLLM serves (its sliding window keeps no first tokens).
for _w in (256, 1024):
    register(MethodSpec(f"window-{_w}-fit", "window", f"top k layers keep attention over their last {_w} tokens, "
                        f"with fitted sinks standing in for the first {SINK_TOKENS}",
                        "ours (sinks as gpt-oss / vLLM's attention sinks)", sink_fit_window=_w))(
        lambda sel, k, _w=_w: _window_fit(sel, f"window-{_w}-fit", top_layers(sel.num_layers, k), _w))


def _window_fit(sel: Selector, method: str, layers: list[int], window: int) -> Selection:
    """`layers` become window layers whose fitted sinks are fitted on the selector's calibration text."""
    if sel.calib_ids is None:
        raise ValueError(f"`{method}` fits its sinks on calibration text: give the Selector the calibration "
                         "token stream (`calib_ids`).")
    t0 = time.perf_counter()
    ids = sink_fit_windows(sel.calib_ids, window, getattr(sel.model.config, "max_position_embeddings", None),
                           sel.seed, bos=sel.bos)
    fit = fit_sinks(sel.model, ids, {i: window for i in layers}, progress=sel.progress)
    chosen = _window(method, layers, window, sinks=0)
    chosen.fitted_sinks = fit.fitted
    chosen.search_seconds = time.perf_counter() - t0
    chosen.info.update(sinks="fit", sink_fit=fit.to_dict())
    return chosen


@register(MethodSpec("window-any-256", "window", "k layers at any depth picked by Attention Drop's score keep "
                     f"attention over their last 256 tokens and the first {SINKS}", "ours"))
def _window_any(sel: Selector, k: int) -> Selection:
    layers, evidence = _attention_drop(sel, k)
    chosen = _window("window-any-256", layers, 256)
    chosen.search_seconds = evidence["score_seconds"]
    chosen.info.update(evidence)
    return chosen


@register(MethodSpec("shortgpt", "blocks", "k whole layers with the lowest Block Influence, removed",
                     "Men et al. 2024"))
def _shortgpt(sel: Selector, k: int) -> Selection:
    s, sec = sel.scores("shortgpt")
    return Selection("shortgpt", "blocks", pick(s, k, highest=False), None, sec, None, {"block_influence": s})


@register(MethodSpec("sleb", "blocks", "k whole layers removed greedily by calibration perplexity",
                     "Song et al. 2024"))
def _sleb(sel: Selector, k: int) -> Selection:
    r = sel.sleb_order(k)
    return Selection("sleb", "blocks", r["layers"], None, r["seconds"], r["ppls"][-1],
                     {"calib_ppl_per_step": r["ppls"], "base_calib_ppl": r["base_ppl"]})
