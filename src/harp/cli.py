"""The `harp` command line. Each command lives in its own module under `harp.commands`."""

from __future__ import annotations

import importlib
import pkgutil
import sys

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


def _load_commands() -> None:
    from . import commands

    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{mod.name}")


def get_app() -> typer.Typer:
    _load_commands()
    return app


def main() -> None:
    _load_commands()
    try:
        app()  # standalone: usage errors are printed by typer itself
    except USER_ERRORS as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
