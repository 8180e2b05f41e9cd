"""Progress on a terminal: a rich progress bar on stderr when stderr is a TTY, nothing (or
plain lines, for long-running operations) otherwise, so pipes and logs stay clean."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any

from nightjar.archive import Readable


def interactive() -> bool:
    return sys.stderr.isatty()


class Bar:
    """A byte progress bar (``total`` None: size unknown), shown only on a terminal."""

    def __init__(self, description: str, total: int | None, enabled: bool | None = None) -> None:
        self.enabled = interactive() if enabled is None else enabled
        self.description = description
        self.total = total
        self.done = 0
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Bar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total)
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, advance=n)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()


class Ticking:
    """A read stream that advances a Bar by what passes through it."""

    def __init__(self, inner: Readable, bar: Bar) -> None:
        self.inner = inner
        self.bar = bar

    def read(self, n: int = -1, /) -> bytes:
        data = self.inner.read(n)
        self.bar.advance(len(data))
        return data


class Follower:
    """Show a resource's progress while it runs: a bar with its phase and message on a terminal,
    a plain line on stderr whenever the phase or message changes (and every 10 percent)
    otherwise."""

    def __init__(self, what: str, enabled: bool | None = None) -> None:
        self.what = what
        self.enabled = interactive() if enabled is None else enabled
        self._progress: Any = None
        self._task: Any = None
        self._last: tuple[str, str, int] = ("", "", -1)
        self.started = time.monotonic()

    def __enter__(self) -> Follower:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[detail]}"),
                console=Console(stderr=True),
            )
            self._progress.start()
            self._task = self._progress.add_task(self.what, total=None, detail="")
        return self

    def update(self, phase: str, message: str, percent: float | None = None, detail: str = "") -> None:
        if self._progress is not None:
            self._progress.update(
                self._task,
                description=f"{self.what} {phase or 'Pending'}",
                total=100 if percent is not None else None,
                completed=percent or 0,
                detail=detail or message,
            )
            return
        step = int(percent // 10) if percent is not None else -1
        if (phase, message, step) != self._last:
            self._last = (phase, message, step)
            pct = f" {percent:.0f}%" if percent is not None else ""
            text = f"{self.what}: {phase or 'Pending'}{pct}"
            if detail:
                text += f" ({detail})"
            if message:
                text += f": {message}"
            print(text, file=sys.stderr, flush=True)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
