"""The progress bar of ``trajscope analyze`` (one task per run, on stderr)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def analysis_progress(console: Console, enabled: bool) -> Progress:
    """A rich progress bar (description, bar, n of N, elapsed, remaining); ``enabled`` False: a silent one."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
