"""Errors that list every problem at once (`Problems`), collected by `Collector`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Problems(ValueError):
    """One or more problems with a command's arguments or inputs, found before anything was loaded."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(self._text())

    def _text(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        items = "\n".join(f"  - {p}" for p in self.problems)
        return f"{len(self.problems)} problems (nothing was loaded):\n{items}"


class Collector:
    """Gathers problems; `raise_if_any()` raises them all at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.errors: list[Exception | None] = []

    def add(self, msg: str, error: Exception | None = None) -> None:
        if msg not in self.problems:
            self.problems.append(msg)
            self.errors.append(error)

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call `fn`; a ValueError / OSError it raises becomes a problem (returns None then)."""
        try:
            return fn(*args, **kwargs)
        except Problems as e:
            for p in e.problems:
                self.add(p)
        except (ValueError, OSError) as e:
            self.add(str(e), e)
        return None

    def raise_if_any(self) -> None:
        """One problem raised as the error it was (FileNotFoundError, ...); several as one Problems."""
        if len(self.problems) == 1 and self.errors[0] is not None:
            raise self.errors[0]
        if self.problems:
            raise Problems(self.problems)


def check_positive(out: Collector, **values: int | None) -> None:
    for name, v in values.items():
        if v is not None and (isinstance(v, bool) or v < 1):
            out.add(f"`{name}={v}`: must be at least 1.")


def check_windows(out: Collector, windows: int | None, seq_len: int | None, what: str = "seq_len") -> None:
    if windows is not None and windows < 1:
        out.add(f"`calib_windows={windows}`: need at least one calibration window.")
    if seq_len is not None and seq_len < 2:
        out.add(f"`{what}={seq_len}`: a window needs at least 2 tokens.")
