"""The export's progress bar over pieces (or nothing, for tests and library use)."""
from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class progress:
    """A rich progress bar over pieces (or nothing)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda *a, **k: None

        self.p = Progress(TextColumn("export"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TextColumn("{task.description}"), transient=False)
        self.p.__enter__()
        self.task = self.p.add_task("", total=self.total)

        def advance(desc: str, start: bool = False, done: bool = False):
            self.p.update(self.task, description=desc, advance=0 if start else 1)

        return advance

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)
        return False
