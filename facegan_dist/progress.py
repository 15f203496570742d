"""Progress bars for long work (rich), silenced when stderr is not a terminal or when disabled.

One place so every command shows the same columns: description, bar, n/total, rate, ETA.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def make_progress(enabled: bool = True) -> Progress:
    """A rich Progress on stderr; `disable=True` when not wanted or not a terminal."""
    from rich.console import Console

    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and sys.stderr.isatty()),
        transient=False,
    )


def track(
    items: Iterable[T], total: int | None, description: str, unit: str = "it", enabled: bool = True
) -> Iterator[T]:
    """Iterate `items` with a progress bar showing `unit`/s."""
    import time

    with make_progress(enabled) as progress:
        task = progress.add_task(description, total=total, rate="")
        start = time.perf_counter()
        n = 0
        for item in items:
            yield item
            n += 1
            elapsed = max(time.perf_counter() - start, 1e-9)
            progress.update(task, advance=1, rate=f"{n / elapsed:,.0f} {unit}/s")
