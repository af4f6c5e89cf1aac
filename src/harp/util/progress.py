"""Progress bars (rich) with ETA for every long loop; silent when disabled or HARP_NO_PROGRESS=1."""

from __future__ import annotations

import os
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress


class Progress:
    """`with Progress(total, "what") as bar: bar.advance(n)` — a rich bar on stderr with ETA."""

    def __init__(self, total: int, description: str, enabled: bool = True) -> None:
        self.enabled = enabled and not os.environ.get("HARP_NO_PROGRESS")
        self.total = total
        self.description = description
        self._p: _RichProgress | None = None
        self._task = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._p = _RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._p.__enter__()
            self._task = self._p.add_task(self.description, total=self.total)
        return self

    def advance(self, n: int = 1) -> None:
        if self._p is not None:
            self._p.advance(self._task, n)

    def describe(self, description: str) -> None:
        if self._p is not None:
            self._p.update(self._task, description=description)

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._p is not None:
            self._p.__exit__(et, e, tb)
