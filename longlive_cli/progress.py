"""Progress of long commands: a live rich bar on a terminal, plain log lines otherwise.

Rates and ETAs come from our own clock (`Meter`): units finished since the work started, over the
time to the last finished unit. They show from the first finished unit on, however long a unit
takes (rich's own speed estimate needs two updates within 30 s, so a run of slow chunks showed
`-- frames/s` and `-:--:--` throughout).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

PLAIN_INTERVAL_SECONDS = 5.0  # at most one plain line per this interval (plus the first and last)
RateFormat = Callable[[float | None], str]  # units per second (None: not known yet) -> "12.3 frames/s"
AmountFormat = Callable[[int, int | None], str]  # (done, total) -> "3/10 chunks"


def format_duration(seconds: float | None) -> str:
    """h:mm:ss, or -:--:-- when unknown."""
    if seconds is None:
        return "-:--:--"
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def per_second(label: str, scale: float = 1.0) -> RateFormat:
    """Rate text "{units/s * scale:.1f} {label}" (e.g. chunks/s * frames per chunk = frames/s)."""
    return lambda rate: f"-- {label}" if rate is None else f"{rate * scale:.1f} {label}"


def count_of(unit: str) -> AmountFormat:
    """Amount text "{done}/{total} {unit}" (just "{done} {unit}" while the total is unknown)."""
    return lambda done, total: f"{done}/{total} {unit}" if total is not None else f"{done} {unit}"


def gigabytes(done: int, total: int | None) -> str:
    return f"{done / 1e9:.2f}/{total / 1e9:.2f} GB" if total is not None else f"{done / 1e9:.2f} GB"


def bytes_per_second(rate: float | None) -> str:
    if rate is None:
        return "-- MB/s"
    return f"{rate / 1e9:.2f} GB/s" if rate >= 1e9 else f"{rate / 1e6:.1f} MB/s"


class Meter:
    """Units done over time since `start`: seconds per unit (at the last finished unit) and ETA."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.started: float | None = None
        self.start_done = 0
        self.done = 0
        self.last: float | None = None  # when `done` last grew

    def start(self, done: int = 0) -> None:
        self.started, self.start_done, self.done, self.last = self.clock(), done, done, None

    def record(self, done: int) -> None:
        if self.started is None:
            self.start(0)
        if done != self.done:
            self.done, self.last = done, self.clock()

    @property
    def seconds_per_unit(self) -> float | None:
        finished = self.done - self.start_done
        if self.started is None or self.last is None or finished <= 0:
            return None
        return (self.last - self.started) / finished

    @property
    def rate(self) -> float | None:
        spu = self.seconds_per_unit
        return None if spu is None else (1 / spu if spu > 0 else float("inf"))

    def eta(self, total: int | None) -> float | None:
        spu = self.seconds_per_unit
        if spu is None or total is None:
            return None
        return max(0, total - self.done) * spu

    @property
    def elapsed(self) -> float:
        return 0.0 if self.started is None else self.clock() - self.started


class RateColumn(ProgressColumn):
    """The rate from a task field holding seconds per unit."""

    def __init__(self, rate: RateFormat, field: str = "seconds_per_unit"):
        super().__init__()
        self.rate, self.field = rate, field

    def render(self, task: Task) -> Text:
        spu = task.fields.get(self.field)
        return Text(self.rate(1 / spu if spu else None), style="progress.data.speed")


class AmountColumn(ProgressColumn):
    """How far: the task's completed and total through an amount format."""

    def __init__(self, amount: AmountFormat):
        super().__init__()
        self.amount = amount

    def render(self, task: Task) -> Text:
        total = None if task.total is None else int(task.total)
        return Text(self.amount(int(task.completed), total), style="progress.download")


class EtaColumn(ProgressColumn):
    """Time left: remaining units times the task field holding seconds per unit."""

    def __init__(self, field: str = "seconds_per_unit"):
        super().__init__()
        self.field = field

    def render(self, task: Task) -> Text:
        spu = task.fields.get(self.field)
        left = None if spu is None or task.total is None else max(0.0, task.total - task.completed) * spu
        return Text(f"ETA {format_duration(left)}", style="progress.remaining")


class _FooterProgress(Progress):
    """A rich Progress with an optional line under the bars (e.g. the prompt being typed)."""

    def __init__(self, *columns, footer: Callable[[], str] | None = None, **kwargs):
        self.footer = footer  # rich renders once while constructing
        super().__init__(*columns, **kwargs)

    def get_renderable(self) -> RenderableType:
        table = self.make_tasks_table(self.tasks)
        return table if self.footer is None else Group(table, Text(self.footer()))


class TaskProgress:
    """One task's progress: a live bar when `console` is a terminal, else a plain line at most every
    `interval` seconds (and for the first and the last unit). Use as a context manager; `start()`
    when the work begins (the clock's zero), `update(done)` after each unit, `log(text)` for a line
    above the bar. Thread-safe."""

    def __init__(self, description: str, amount: AmountFormat, *, console: Console, rate: RateFormat,
                 total: int | None = None, interval: float = PLAIN_INTERVAL_SECONDS,
                 footer: Callable[[], str] | None = None, transient: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.description, self.amount, self.console, self.rate = description, amount, console, rate
        self.total, self.interval = total, interval
        self.meter = Meter(clock)
        self.live = console.is_terminal
        self._lock = threading.Lock()
        self._last_line: float | None = None
        self._bar: _FooterProgress | None = None
        self._task = None
        if self.live:
            self._bar = _FooterProgress(
                TextColumn("[progress.description]{task.description}"), BarColumn(), AmountColumn(amount),
                RateColumn(rate), TimeElapsedColumn(), EtaColumn(),
                console=console, transient=transient, footer=footer)
            self._task = self._bar.add_task(description, total=total, start=False, seconds_per_unit=None)

    def __enter__(self) -> TaskProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def start(self, done: int = 0) -> None:
        """The work begins now (rate and ETA count from here)."""
        with self._lock:
            self.meter.start(done)
            if self._bar is not None:
                self._bar.reset(self._task, start=True, total=self.total, completed=done)

    def update(self, done: int, total: int | None = None, description: str | None = None) -> None:
        with self._lock:
            if total is not None:
                self.total = total
            self.meter.record(done)
            if self._bar is not None:
                self._bar.update(self._task, completed=done, total=self.total, description=description,
                                 seconds_per_unit=self.meter.seconds_per_unit)
                return
            now = self.meter.clock()
            first = self._last_line is None and done > self.meter.start_done
            last = self.total is not None and done >= self.total
            due = self._last_line is not None and now - self._last_line >= self.interval
            if first or last or due:
                self._last_line = now
                self.console.print(self.line(description), highlight=False, markup=False, soft_wrap=True)

    def line(self, description: str | None = None) -> str:
        """The plain progress line: what, how far, rate, elapsed time, ETA."""
        meter = self.meter
        return (f"{description or self.description}: {self.amount(meter.done, self.total)}, {self.rate(meter.rate)}, "
                f"{format_duration(meter.elapsed)} elapsed, ETA {format_duration(meter.eta(self.total))}")

    def log(self, text: str) -> None:
        """A line above the live bar (or a plain line)."""
        (self._bar.console if self._bar is not None else self.console).print(
            text, highlight=False, markup=False, soft_wrap=True)

    def refresh(self) -> None:
        if self._bar is not None:
            self._bar.refresh()


def step_progress(console: Console | None = None) -> Progress:
    """Training steps with the latest loss, grad norm and step time, and the ETA (remaining steps
    times the last step time, so it shows from the first step on). Drawn only on a terminal: in a
    log file a live bar is one line at the very end (plain progress lines are the trainer's)."""
    console = console or Console(stderr=True)
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps  loss {task.fields[loss]:.4f}  |g| {task.fields[grad_norm]:.3f}  "
                   "{task.fields[step_time]:.2f} s/step"),
        TimeElapsedColumn(),
        EtaColumn(field="step_time"),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )
