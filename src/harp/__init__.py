"""harp: HARP (High-Layer Attention Pruning with Rescaling) for Hugging Face causal language models.

    import harp
    model, tok = harp.load_model()                       # bundled SmolLM2-135M, or a folder / .gguf / hub id
    fit = harp.fit_layers(model, calib_windows, [29, 28, 27, 26])  # closed-form refit of the pruned layers
    harp.prune(model, fit.layers, [1.0] * 4, maps=fit.maps)
    # or the paper's HARP: r = harp.search_alphas(model, calib_windows, 4); harp.prune(model, r.layers, r.alphas)
    harp.save(model, "out/", tokenizer=tok)
    model = harp.load("out/")
"""

from harp._version import __version__
from harp.engine.longctx import (
    PositionLosses,
    RetrievalItem,
    RetrievalScore,
    check_context,
    niah_items,
    parse_contexts,
    passkey_items,
    position_losses,
    retrieval_items,
    retrieval_score,
)
from harp.engine.perplexity import perplexity
from harp.engine.text import bos_token, calibration_windows, evaluation_windows, load_text, tokenize
from harp.jobs.prune import PruneSettings, run_prune
from harp.methods.fit import FitResult, LayerFit, fit_layers
from harp.methods.search import SearchResult, search_alphas
from harp.methods.sinks import SinkFit, fit_sinks
from harp.model.accounting import count_parameters, kv_cache_bytes, removed_parameters
from harp.model.checkpoint import load, save
from harp.model.load import load_model
from harp.model.prune import prune, pruned_plan, temporarily_pruned
from harp.modeling import ARCHITECTURES, FittedSink, LinearMap, supported_families
from harp.report.longctx import plot_position_losses, retrieval_markdown

__all__ = [
    "ARCHITECTURES",
    "FitResult",
    "FittedSink",
    "LayerFit",
    "LinearMap",
    "PositionLosses",
    "PruneSettings",
    "RetrievalItem",
    "RetrievalScore",
    "SearchResult",
    "SinkFit",
    "__version__",
    "bos_token",
    "calibration_windows",
    "check_context",
    "count_parameters",
    "evaluation_windows",
    "fit_layers",
    "fit_sinks",
    "kv_cache_bytes",
    "load",
    "load_model",
    "load_text",
    "niah_items",
    "parse_contexts",
    "passkey_items",
    "perplexity",
    "plot_position_losses",
    "position_losses",
    "prune",
    "pruned_plan",
    "removed_parameters",
    "retrieval_items",
    "retrieval_markdown",
    "retrieval_score",
    "run_prune",
    "save",
    "search_alphas",
    "supported_families",
    "temporarily_pruned",
    "tokenize",
]
