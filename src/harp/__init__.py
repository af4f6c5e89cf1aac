"""harp: HARP (High-Layer Attention Pruning with Rescaling) for Hugging Face causal language models.

    import harp
    model, tok = harp.load_model()                       # bundled SmolLM2-135M, or a folder / .gguf / hub id
    fit = harp.fit_layers(model, calib_windows, [29, 28, 27, 26])  # closed-form refit of the pruned layers
    harp.prune(model, fit.layers, [1.0] * 4, maps=fit.maps)
    # or the paper's HARP: r = harp.search_alphas(model, calib_windows, 4); harp.prune(model, r.layers, r.alphas)
    harp.save(model, "out/", tokenizer=tok)
    model = harp.load("out/")
"""

from ._version import __version__
from .accounting import count_parameters, kv_cache_bytes, removed_parameters  # noqa: E402
from .checkpoint import load, save  # noqa: E402
from .core import prune, pruned_plan, temporarily_pruned  # noqa: E402
from .fit import FitResult, LayerFit, fit_layers  # noqa: E402
from .modeling import ARCHITECTURES, LinearMap, supported_families  # noqa: E402
from .models import load_model  # noqa: E402
from .perplexity import perplexity  # noqa: E402
from .pipeline import PruneSettings, run_prune  # noqa: E402
from .search import SearchResult, search_alphas  # noqa: E402
from .text import bos_token, calibration_windows, evaluation_windows, load_text, tokenize  # noqa: E402

__all__ = [
    "ARCHITECTURES",
    "FitResult",
    "LayerFit",
    "LinearMap",
    "PruneSettings",
    "SearchResult",
    "__version__",
    "bos_token",
    "calibration_windows",
    "count_parameters",
    "evaluation_windows",
    "fit_layers",
    "kv_cache_bytes",
    "load",
    "load_model",
    "load_text",
    "perplexity",
    "prune",
    "pruned_plan",
    "removed_parameters",
    "run_prune",
    "save",
    "search_alphas",
    "supported_families",
    "temporarily_pruned",
    "tokenize",
]
