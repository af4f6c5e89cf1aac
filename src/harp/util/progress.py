"""Progress bars (rich) with ETA for every long loop; silent when disabled or HARP_NO_PROGRESS=1.

Where stderr is not a terminal (a log file, `nohup`, CI) a live bar would only be drawn once, at the end, so
a 40-minute search would look stuck: there the bar is a plain line every `Progress.every` seconds and one
when the loop ends ("kinds: greedy plan: 3/10 (2 min 5 s, eta 4 min 52 s)")."""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h} h {m} min" if h else f"{m} min {s} s" if m else f"{s} s"


class Progress:
    """`with Progress(total, "what") as bar: bar.advance(n)` — a rich bar on stderr with ETA."""

    every = 30.0  # seconds between plain lines when stderr is not a terminal

    def __init__(self, total: int, description: str, enabled: bool = True) -> None:
        self.enabled = enabled and not os.environ.get("HARP_NO_PROGRESS")
        self.total = total
        self.description = description
        self._p: _RichProgress | None = None
        self._task = None
        self._plain = False
        self._done = 0
        self._start = self._last = 0.0

    def __enter__(self) -> Progress:
        if not self.enabled:
            return self
        console = Console(stderr=True)
        if not (console.is_terminal or console.is_jupyter):
            self._plain = True
            self._start = self._last = time.monotonic()
        else:
            self._p = _RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._p.__enter__()
            self._task = self._p.add_task(self.description, total=self.total)
        return self

    def advance(self, n: int = 1) -> None:
        self._done += n
        if self._p is not None:
            self._p.advance(self._task, n)
        elif self._plain and time.monotonic() - self._last >= self.every:
            self._line()

    def describe(self, description: str) -> None:
        self.description = description
        if self._p is not None:
            self._p.update(self._task, description=description)

    def _line(self) -> None:
        self._last = time.monotonic()
        spent = self._last - self._start
        eta = (f", eta {_duration(spent * (self.total - self._done) / self._done)}"
               if 0 < self._done < self.total else "")
        print(f"{self.description}: {self._done}/{self.total} ({_duration(spent)}{eta})", file=sys.stderr, flush=True)

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._p is not None:
            self._p.__exit__(et, e, tb)
        elif self._plain and et is None:
            self._line()
