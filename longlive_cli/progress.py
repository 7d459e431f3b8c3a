"""Rich progress bar for chunked generation: chunks, video frames per second, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class FramesPerSecondColumn(ProgressColumn):
    """Output video frames per second, from the task's chunk rate."""

    def __init__(self, frames_per_chunk: int):
        super().__init__()
        self.frames_per_chunk = frames_per_chunk

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("-- frames/s", style="progress.data.speed")
        return Text(f"{speed * self.frames_per_chunk:.1f} frames/s", style="progress.data.speed")


def chunk_progress(frames_per_chunk: int, console: Console | None = None) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("chunks"),
        FramesPerSecondColumn(frames_per_chunk),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def step_progress(console: Console | None = None) -> Progress:
    """Training steps with the latest loss, grad norm and step time, and the ETA."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps  loss {task.fields[loss]:.4f}  |g| {task.fields[grad_norm]:.3f}  "
                   "{task.fields[step_time]:.2f} s/step"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
