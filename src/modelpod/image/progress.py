"""Progress reporting for long steps: the library calls ``Progress``; the CLI supplies rich bars."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Protocol


class Task(Protocol):
    def advance(self, n: int) -> None: ...

    def done(self) -> None: ...


class Progress(Protocol):
    def task(self, label: str, total: int | None = None) -> Task: ...

    def note(self, text: str) -> None: ...


class _SilentTask:
    def advance(self, n: int) -> None:
        pass

    def done(self) -> None:
        pass


class Silent:
    """Reports nothing (library default, ``--json``)."""

    def task(self, label: str, total: int | None = None) -> Task:
        return _SilentTask()

    def note(self, text: str) -> None:
        pass


class _RichTask:
    def __init__(self, bars: Any, task_id: Any) -> None:
        self.bars, self.task_id = bars, task_id

    def advance(self, n: int) -> None:
        self.bars.advance(self.task_id, n)

    def done(self) -> None:
        for t in self.bars.tasks:
            if t.id == self.task_id:
                # Unknown totals become what was counted, so a finished bar reads full.
                final = t.completed if t.total is None else t.total
                self.bars.update(self.task_id, total=final, completed=final)
        self.bars.stop_task(self.task_id)


class RichProgress:
    """Byte-counting bars on stderr; use as a context manager."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bars

        self.console = Console(stderr=True, highlight=False)
        self.bars = Bars(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeElapsedColumn(), console=self.console, transient=False,
        )

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.bars.stop()

    def task(self, label: str, total: int | None = None) -> Task:
        return _RichTask(self.bars, self.bars.add_task(label, total=total))

    def note(self, text: str) -> None:
        self.bars.console.print(text)
