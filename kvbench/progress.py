"""Progress of long commands on stderr: a live bar on a terminal, plain lines anywhere else.

On a terminal (rich's `Console.is_terminal`) each phase is a row of rich's live display. Anywhere
else (CI, nohup, a log file) a live display shows nothing until the end, so updates become plain
lines: one when a phase starts, then at most one every `PLAIN_INTERVAL_S` with the latest figure,
and a last one per phase with its count and elapsed time:

    calibrate: swap: torch n=4096: 5.5 GB/s round trip (12 points, 14 s)
    calibrate: swap done (24 points, 31 s)

Two uses share one `Reporter`: phases with a live figure (calibrate, validate:
`on_point(phase, text)`) and counted tasks (simulate, compare-policies, sweeps, replay:
`count(phase, done, total)`). Phases follow one another; a new one ends the one before.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import monotonic

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

PLAIN_INTERVAL_S = 5.0  # at most one plain line this often within a phase


@dataclass
class Phase:
    name: str
    start_s: float
    done: int = 0
    total: int | None = None  # a counted task's size; None for a phase of points
    text: str = ""  # the latest figure


class Reporter:
    """The progress of one command (`label`, counting in `unit`) on `console`, as a context
    manager. `transient`: the live display vanishes at the end (a terminal only)."""

    def __init__(self, console: Console, label: str, unit: str, transient: bool = False):
        self.console, self.label, self.unit = console, label, unit
        self.live = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False),
                             TimeElapsedColumn(), console=console,
                             transient=transient) if console.is_terminal else None
        self.phase: Phase | None = None
        self.task: TaskID | None = None  # the live display's row of the phase
        self.printed_s: float | None = None  # the phase's last plain line; None: none yet

    def __enter__(self) -> Reporter:
        if self.live:
            self.live.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:  # an error or an interrupt prints its own last line
            self._end()
        if self.live:
            self.live.stop()

    def on_point(self, phase: str, text: str, start: bool = False) -> None:
        """A point of `phase` measured, `text` its figure; or, `start`, what the phase will do."""
        current = self._enter(phase)
        current.done += not start
        current.text = text
        self._show()

    def count(self, phase: str, done: int, total: int | None = None) -> None:
        """`done` of the `total` items of a counted task (`phase` may be ""; total None while
        unknown)."""
        current = self._enter(phase)
        current.done, current.total = done, total
        self._show()

    def _enter(self, name: str) -> Phase:
        if self.phase is None or self.phase.name != name:
            self._end()
            self.phase, self.printed_s = Phase(name, monotonic()), None
            if self.live:
                self.task = self.live.add_task("", total=None)
        return self.phase

    def _show(self) -> None:
        phase, now_s = self.phase, monotonic()
        head = self._head(phase.name, phase.text)
        if self.live:
            self.live.update(self.task, description=f"{head} ({self._count()})",
                             completed=phase.done, total=phase.total)
        elif self.printed_s is None or now_s - self.printed_s >= PLAIN_INTERVAL_S:
            self.printed_s = now_s
            self._print(head)

    def _end(self) -> None:
        """The last line of the phase, if one is open."""
        if self.phase is None:
            return
        if self.live:  # its row stays with the latest figure, its clock stopped
            self.live.update(self.task, completed=self.phase.done, total=self.phase.done)
        else:
            self._print(f"{self._head(self.phase.name)} done")
        self.phase = None

    def _head(self, *parts: str) -> str:
        return ": ".join(part for part in (self.label, *parts) if part)

    def _count(self) -> str:
        done, total = self.phase.done, self.phase.total
        return f"{done}{'' if total is None else f'/{total}'} {self.unit}"

    def _print(self, head: str) -> None:
        elapsed_s = monotonic() - self.phase.start_s
        self.console.out(f"{head} ({self._count()}, {elapsed_s:.0f} s)", highlight=False)
