"""Rich output helpers: tables on stdout, progress bars and notes on stderr."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

StageCallback = Callable[[str, float], None]


def out_console() -> Console:
    """Console on the current ``sys.stdout`` (CliRunner swaps it per invocation)."""
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def err_console() -> Console:
    """Console on the current ``sys.stderr``: progress bars and notes never touch stdout."""
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def note(message: str, quiet: bool = False) -> None:
    """An informational one-liner on stderr (silenced by ``--quiet``)."""
    if not quiet:
        sys.stderr.write(f"{message}\n")
        sys.stderr.flush()


@contextlib.contextmanager
def stage_progress(enabled: bool, description: str = "explaining") -> Iterator[StageCallback]:
    """A one-bar progress display fed by ``callback(stage, fraction in [0, 1])``.

    Yields the callback; with ``enabled`` False it does nothing.
    """
    console = err_console()
    if not enabled or not console.is_terminal:
        yield lambda stage, fraction: None
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = progress.add_task(description, total=1.0)

    def update(stage: str, fraction: float) -> None:
        progress.update(task, description=stage, completed=min(max(float(fraction), 0.0), 1.0))

    with progress:
        yield update


def throughput(done: int, seconds: float, left: int, unit: str = "scans") -> str:
    """``"2.4 scans/min, 0:12:30 left"``: the rate of the ``done`` items that took
    ``seconds`` and the time the ``left`` ones need at that rate ("" before the first)."""
    if done <= 0 or seconds <= 0:
        return ""
    per_min = 60.0 * done / seconds
    remaining = round(left * seconds / done)
    h, rest = divmod(remaining, 3600)
    return f"{per_min:.1f} {unit}/min, {h}:{rest // 60:02d}:{rest % 60:02d} left"


def items_progress(enabled: bool) -> Progress:
    """A multi-item progress display (``M/N`` items, then the task's ``rate`` field, e.g.
    :func:`throughput`) on stderr.

    Disabled when not ``enabled`` or when stderr is not a terminal (logs stay clean).
    """
    console = err_console()
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not (enabled and console.is_terminal),
    )
