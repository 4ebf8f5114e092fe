"""Rich progress bars and console output shared by every step."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Messages go to stderr so that `radpath query --format csv > out.csv` stays clean.
console = Console(stderr=True)


def _enabled() -> bool:
    return os.environ.get("RADPATH_PROGRESS", "1") != "0" and sys.stderr is not None


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n=1)`; draws a bar with count, rate and ETA on a terminal, nothing otherwise."""
    if not _enabled():
        yield lambda n=1: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def info(message: str) -> None:
    console.print(message, highlight=False)


_warned: set[str] | None = None  # inside `each_warning_once`: the warnings printed so far


@contextlib.contextmanager
def each_warning_once() -> Iterator[None]:
    """Print a repeated warning once within the block: `radpath run` reads the same predictions
    in its fuse, report and summary steps, and each would say the same thing about them."""
    global _warned
    outer, _warned = _warned, set() if _warned is None else _warned
    try:
        yield
    finally:
        _warned = outer


def warn(message: str) -> None:
    if _warned is not None:
        if message in _warned:
            return
        _warned.add(message)
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)
