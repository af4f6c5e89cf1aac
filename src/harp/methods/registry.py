"""What a method is: its `MethodSpec`, the `Selection` its rule returns, and `METHODS`, the one mapping
that `register` fills. The methods declare themselves in `harp.methods.catalog` (imported by
`harp.methods`, so importing this module registers every method).

    @register(MethodSpec("my-method", "attention", "what it prunes", "who proposed it"))
    def _my_method(sel: Selector, k: int) -> Selection:
        ...  # sel's shared caches: greedy prefixes, fits, scores, the SLEB order
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from harp.modeling import FittedSink, LinearMap


@dataclass
class Selection:
    """What a method decided: which layers, and (attention methods) which alphas."""

    method: str
    kind: str  # "attention" | "window" | "blocks" | "none"
    layers: list[int]  # original layer indices, in the order chosen
    alphas: list[float] | None = None  # attention methods: one per layer
    search_seconds: float = 0.0
    calib_ppl: float | None = None  # calibration perplexity of the pruned model, when the method measured it
    info: dict[str, Any] = field(default_factory=dict)
    maps: dict[int, LinearMap] | None = None  # refit methods: each layer's fitted map (alpha scales it)
    window: int | None = None  # window methods: the layers keep attention over their last `window` positions
    sinks: int = 0  # ... and over the first `sinks`
    fitted_sinks: dict[int, FittedSink] | None = None  # ... or, per layer, a fitted sink in their place

    @property
    def k(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "kind": self.kind, "layers": self.layers, "alphas": self.alphas,
                "search_seconds": self.search_seconds, "calib_ppl": self.calib_ppl, "info": self.info,
                **({"window": self.window, "sinks": self.sinks} if self.window is not None else {}),
                **({"fitted_sinks": sorted(self.fitted_sinks)} if self.fitted_sinks else {})}

    @property
    def windows(self) -> dict[int, int]:
        """{layer: window} of a window method ({} otherwise)."""
        return {i: self.window for i in self.layers} if self.kind == "window" and self.window else {}

    def describe(self) -> str:
        if self.kind == "none":
            return "-"
        pairs = sorted(zip(self.layers, self.alphas or [None] * self.k, strict=True), reverse=True)
        if self.kind == "blocks":
            return "layers " + ",".join(str(i) for i, _ in pairs) + " removed"
        if self.kind == "window":
            sinks = "+fit" if self.fitted_sinks else f"+{self.sinks}" if self.sinks else ""
            return f"window {self.window}{sinks} on layers " + ",".join(str(i) for i, _ in pairs)
        return ", ".join(f"{i}:{a:g}" for i, a in pairs)


Plan = Selection  # the earlier name ("plan" also names the {layers, alphas} block and the memory planner)

# A method's selection rule: (the `Selector` with its shared caches, k) -> its Selection. The selector is
# typed Any here because `harp.methods.selector` imports this module.
SelectFn = Callable[[Any, int], Selection]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str  # "attention" (HARP-style sub-layer pruning) | "window" (attention kept over the last w tokens)
    #            | "blocks" (whole layers removed)
    summary: str
    reference: str
    lists_alphas: bool = False  # the alphas come from a search: `harp compare`'s report lists them
    refit: bool = False  # the pruned layers get the least-squares refit (auto-k gives these a k of their own)
    sink_fit_window: int | None = None  # fits sinks for windows of this many tokens on calibration text of its own
    #                                     (such a method is asked for by name: 'all' leaves it out)
    select: SelectFn | None = field(default=None, compare=False, repr=False)  # set by `register`


METHODS: dict[str, MethodSpec] = {}  # name -> spec, in registration order (the order of compare's tables)


def register(spec: MethodSpec) -> Callable[[SelectFn], SelectFn]:
    """Decorator: `fn` is `spec.name`'s selection rule; adds the method to `METHODS`."""

    def add(fn: SelectFn) -> SelectFn:
        if spec.name in METHODS:
            raise ValueError(f"Method {spec.name!r} is registered twice.")
        METHODS[spec.name] = replace(spec, select=fn)
        return fn

    return add


def all_methods() -> list[str]:
    """What 'all' names: every method but those asked for by name only (the fitted-sink windows, which fit on
    longer calibration windows of their own and need a context of twice their window)."""
    return [m for m, spec in METHODS.items() if spec.sink_fit_window is None]


def parse_methods(spec: str | Sequence[str] | None) -> list[str]:
    """'harp,no-rescale' (or 'all') -> validated names, in the given order, duplicates dropped."""
    if spec is None or spec == "all":
        return all_methods()
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise ValueError(f"No methods given. Valid methods: {', '.join(METHODS)} (or 'all').")
    names = [n.replace("_", "-") for n in names]
    if "all" in names:  # 'all' and any method it leaves out named beside it
        names = all_methods() + [n for n in names if n != "all"]
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise ValueError(f"Unknown method(s) {', '.join(map(repr, bad))}. Valid methods: {', '.join(METHODS)}.")
    return list(dict.fromkeys(names))
