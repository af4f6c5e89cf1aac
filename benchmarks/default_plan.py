"""The k = 8 plan the benchmarks apply to the default model: the alphas `make prune` finds.

One home for it: results/prune_smollm2_k8.json is the summary `harp prune` wrote on the default
settings (8 x 256 calibration tokens, seed 0). The benchmarks do not rerun the search.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "results" / "prune_smollm2_k8.json"


def default_plan() -> tuple[list[int], list[float]]:
    """(layers, alphas), top layer first, as `harp prune --layers 8` chose them on SmolLM2-135M."""
    s = json.loads(RESULT.read_text())
    return list(s["layers"]), list(s["alphas"])


PLAN_LAYERS, PLAN_ALPHAS = default_plan()
