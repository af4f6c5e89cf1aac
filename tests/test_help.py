"""`harp --help` and every command's --help read as whole sentences at 80 and 120 columns: the
terminal wraps the text, no hard line break from a docstring cuts a sentence, and no help text
points at a file users do not have."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from harp.cli import commands, get_app, help_text

WIDTHS = ("80", "120")


def _help(args: list[str], columns: str) -> str:
    r = CliRunner().invoke(get_app(), args, env={"COLUMNS": columns})
    assert r.exit_code == 0, r.output
    return r.output


def _fits(line: str, word: str, width: int) -> bool:
    """Whether `word` would still have fitted on `line` (text already there) within `width`."""
    return len(line.rstrip()) + 1 + len(word) <= width


def _command_rows(output: str) -> dict[str, list[str]]:
    """The Commands panel of `harp --help`: per command the lines of its description, and a check
    that every line but the last is full (the next word would not have fitted)."""
    panel = output.split("─ Commands ")[1].split("╰")[0].splitlines()[1:]
    rows: dict[str, list[str]] = {}
    name, col = "", 0
    for line in panel:
        inner = line[1:-1]
        m = re.match(r" (\S+)\s+", inner)
        if m:
            name, col = m.group(1), m.end()
            rows[name] = [inner[col:]]
            continue
        text = inner[col:]
        assert inner[:col].strip() == "", line
        full = not _fits(rows[name][-1], text.split()[0], len(inner) - 1 - col)
        assert full, f"{name}: {rows[name][-1]!r} | {text!r}"
        rows[name].append(text)
    return rows


@pytest.mark.parametrize("columns", WIDTHS)
def test_command_list_wraps_whole_sentences(columns):
    rows = _command_rows(_help(["--help"], columns))
    assert list(rows) == [name for name, _ in commands()]
    for name, fn in commands():
        summary = help_text(fn.__doc__).split("\n\n")[0]
        assert " ".join(" ".join(rows[name]).split()) == summary


@pytest.mark.parametrize("columns", WIDTHS)
def test_command_pages_wrap_whole_sentences(columns):
    for name, _ in commands():
        out = _help([name, "--help"], columns)
        assert "HARP.md" not in out
        # the description: unboxed lines between the usage line and the first panel
        lines = out.split("╭")[0].splitlines()
        for prev, cur in zip(lines, lines[1:], strict=False):
            if prev.strip() and cur.strip() and not prev.lstrip().startswith("Usage:"):
                assert not _fits(prev[1:], cur.split()[0], len(cur) - 2), f"{name}: {prev!r} | {cur!r}"


def test_help_texts_hold_no_hard_line_breaks():
    """What typer renders comes from these strings: paragraphs only, no line breaks inside them."""
    group = typer.main.get_command(get_app())
    for name, cmd in group.commands.items():
        assert all("\n" not in p for p in cmd.help.split("\n\n")), name
        assert "\n" not in (cmd.short_help or ""), name
        for param in cmd.params:
            text = getattr(param, "help", None) or ""
            assert "\n" not in text and "HARP.md" not in text, (name, param.name)
    assert "HARP.md" not in _help(["--help"], "120")
