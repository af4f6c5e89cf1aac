"""harp: HARP (High-Layer Attention Pruning with Rescaling) for Hugging Face causal language models."""

__version__ = "0.1.0"

from .checkpoint import load, save  # noqa: E402
from .core import prune, pruned_plan  # noqa: E402
from .modeling import ARCHITECTURES, supported_families  # noqa: E402
from .stats import count_parameters, kv_cache_bytes, removed_parameters  # noqa: E402

__all__ = [
    "ARCHITECTURES",
    "__version__",
    "count_parameters",
    "kv_cache_bytes",
    "load",
    "prune",
    "pruned_plan",
    "removed_parameters",
    "save",
    "supported_families",
]
