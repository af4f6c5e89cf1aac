"""The package's shape, checked from its source (no model is built): the public API is what it was, no harp
module is imported inside a function outside the command line, and the top level holds four modules.
`lint-imports` (pyproject's [tool.importlinter], run by `make test`) checks the layers and cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import harp

PKG = Path(harp.__file__).parent

# harp.__all__ as it was before the package became layered subpackages (issue 21): moving code must not
# change a public name.
PUBLIC = {
    "ARCHITECTURES", "FitResult", "LayerFit", "LinearMap", "PruneSettings", "SearchResult", "__version__",
    "bos_token", "calibration_windows", "count_parameters", "evaluation_windows", "fit_layers", "kv_cache_bytes",
    "load", "load_model", "load_text", "perplexity", "prune", "pruned_plan", "removed_parameters", "run_prune",
    "save", "search_alphas", "supported_families", "temporarily_pruned", "tokenize",
}


def _modules() -> list[tuple[str, ast.Module]]:
    out = []
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        out.append((".".join(parts), ast.parse(p.read_text())))
    return out


def test_public_api_keeps_every_name():
    assert PUBLIC <= set(harp.__all__), sorted(PUBLIC - set(harp.__all__))
    for name in harp.__all__:
        assert hasattr(harp, name), name


def test_no_harp_import_inside_a_function_outside_the_command_line():
    offenders = []
    for mod, tree in _modules():
        if mod.startswith(("harp.commands", "harp.cli")):
            continue  # start-up time: commands import their job when they run
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.col_offset > 0:
                if node.level or (node.module or "").split(".")[0] == "harp":
                    offenders.append(f"{mod}:{node.lineno} from {'.' * node.level}{node.module}")
            elif isinstance(node, ast.Import) and node.col_offset > 0:
                offenders += [f"{mod}:{node.lineno} import {a.name}" for a in node.names if a.name.startswith("harp")]
    assert not offenders, "function-level harp imports (a cycle is a layering bug):\n" + "\n".join(offenders)


def test_no_relative_imports_and_no_import_of_the_package_root():
    bad = []
    for mod, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                bad.append(f"{mod}:{node.lineno} relative import")
            if mod != "harp" and isinstance(node, ast.ImportFrom) and node.module == "harp":
                bad += [f"{mod}:{node.lineno} from harp import {a.name}" for a in node.names
                        if not (PKG / f"{a.name}.py").exists() and not (PKG / a.name).is_dir()]
    assert not bad, "\n".join(bad)


def test_top_level_is_a_handful_of_modules():
    top = sorted(p.stem for p in PKG.glob("*.py"))
    assert top == ["__init__", "_version", "cli", "modeling"], top
