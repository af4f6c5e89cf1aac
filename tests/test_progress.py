"""Progress bars outside a terminal: plain lines a log file can show while a long loop runs."""

from __future__ import annotations

import re

from harp.util.progress import Progress


def test_plain_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    """Under pytest stderr is captured (not a terminal): a line per `every` seconds with count, elapsed time
    and ETA, and a last one when the loop ends; none at all when disabled or with HARP_NO_PROGRESS."""
    monkeypatch.delenv("HARP_NO_PROGRESS", raising=False)
    monkeypatch.setattr(Progress, "every", 0.0)
    with Progress(3, "kinds: greedy plan") as bar:
        for _ in range(3):
            bar.advance()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4  # one per step, then the closing line
    assert re.fullmatch(r"kinds: greedy plan: 1/3 \(\d+ s, eta \d+ s\)", lines[0])
    assert re.fullmatch(r"kinds: greedy plan: 3/3 \(\d+ s\)", lines[-1])

    monkeypatch.setattr(Progress, "every", 3600.0)
    with Progress(100, "fitting") as bar:
        bar.describe("fitting pruned layers")
        for _ in range(100):
            bar.advance()
    out = capsys.readouterr().err.splitlines()  # rate-limited: only the closing line, under its new name
    assert len(out) == 1 and re.fullmatch(r"fitting pruned layers: 100/100 \(\d+ s\)", out[0])
    with Progress(5, "quiet", enabled=False) as bar:
        bar.advance(5)
    monkeypatch.setenv("HARP_NO_PROGRESS", "1")
    with Progress(5, "quiet") as bar:
        bar.advance(5)
    assert capsys.readouterr().err == ""
