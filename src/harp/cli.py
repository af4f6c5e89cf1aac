"""The `harp` command line: which commands exist, their help text, and how errors reach the user.

Each command is a plain function in its own module under `harp.commands`; `commands()` lists them
and `get_app` registers them. Adding a command is a module there and one line in `commands()`.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

app = typer.Typer(
    name="harp",
    help="HARP: prune the attention of high decoder layers with rescaling, measure, save, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """HARP: prune the attention of high decoder layers with rescaling, measure, save, export."""
    # harp draws its own progress bars; transformers' per-file "Loading weights" bars are noise here
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# Errors that mean "the user asked for something wrong": shown as one clear line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError)


def help_text(doc: str | None) -> str:
    """A docstring as help text: its paragraphs, each on one line, so that the terminal wraps whole
    sentences at any width (typer keeps a docstring's hard line breaks in the command list)."""
    paragraphs = inspect.cleandoc(doc or "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def _register(name: str, fn: Callable[..., None]) -> None:
    from harp.commands import flag_errors

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> None:
        with flag_errors():  # library errors name parameters; the user typed flags
            fn(*args, **kwargs)

    text = help_text(fn.__doc__)
    app.command(name, help=text, short_help=text.split("\n\n")[0])(command)


def commands() -> list[tuple[str, Callable[..., None]]]:
    """Every command as (name, function), in the order `harp --help` lists them."""
    from harp.commands import analyze, bench, cache, compare, export, info, plan, prune
    from harp.commands import eval as eval_

    return [
        ("analyze", analyze.analyze_cmd),
        ("bench", bench.bench_cmd),
        ("cache", cache.cache_cmd),
        ("eval", eval_.eval_cmd),
        ("compare", compare.compare_cmd),
        ("export", export.export_cmd),
        ("info", info.info_cmd),
        ("plan", plan.plan_cmd),
        ("prune", prune.prune_cmd),
    ]


def get_app() -> typer.Typer:
    """The `harp` app with every command registered (the command modules are imported on first use)."""
    if not app.registered_commands:
        for name, fn in commands():
            _register(name, fn)
    return app


def main() -> None:
    try:
        get_app()()  # standalone: usage errors are printed by typer itself
    except USER_ERRORS as e:
        from rich.markup import escape

        # one logical line however long (the terminal wraps it), brackets in the message shown as they are
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
