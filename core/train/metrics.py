"""What a training run tells the outside, shared by `train-ar` and `distill`:

    metrics.jsonl   one JSON object per optimizer step, each step once: a run that starts from a
                    checkpoint first drops the records past that checkpoint's step (they belong to
                    discarded steps), and every record is written with one `write` call of a whole
                    line (a kill never leaves half a record; a torn last line is ignored on read)
    tensorboard/    the same numbers as TensorBoard scalars (`train/<key>`), every `log_every` steps
    loss.png        the whole run, read back from metrics.jsonl (so across resumes)
    progress lines  plain text every `log_every` steps, for logs that are not a terminal

Trainers report through `RunEvents` (the CLI decides how to show them).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.checkpoint import atomic_write

log = logging.getLogger(__name__)

RESUMED = "resumed"  # set on the first record written after a resume


@dataclass(frozen=True)
class Curve:
    """One logged quantity: its metrics.jsonl key, its name in progress lines and its axis label."""

    key: str
    short: str
    label: str


class RunEvents:
    """Callbacks of a trainer (rank 0 only); the default ignores them."""

    def resumed(self, step: int, checkpoint: Path) -> None:
        """The run continues from `checkpoint`, which holds `step` finished steps."""

    def started(self, start_step: int, total: int, log_every: int) -> None:
        """Steps `start_step + 1 .. total` are about to run; report every `log_every` steps."""

    def stepped(self, record: Mapping[str, Any]) -> None:
        """A step finished; `record` is its metrics.jsonl record."""


class MetricsLog:
    """`logdir/metrics.jsonl` and `logdir/tensorboard/` (see the module doc). Rank 0 writes them:
    `start` once, then `append` per step, `close` at the end."""

    def __init__(self, logdir: Path, log_every: int = 1):
        self.path = Path(logdir) / "metrics.jsonl"
        self.log_every = log_every
        self._mark_resume = False
        self._tensorboard = None

    def start(self, step: int) -> None:
        """`restart(step)`, then open the TensorBoard writer (none, with a warning, without the package)."""
        self.restart(step)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; an unusual install still trains
            log.warning("tensorboard is not installed: metrics go to metrics.jsonl only")
            return
        self._tensorboard = SummaryWriter(str(self.path.with_name("tensorboard")))

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def records(self) -> list[dict[str, Any]]:
        """The complete records, in file order."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):
                break  # torn by a crash mid-write (older writers)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                out.append(record)
        return out

    def restart(self, step: int) -> None:
        """Keep the records of steps 1..`step` (the finished steps the run starts from; 0 for a
        fresh run), rewritten atomically."""
        kept = [r for r in self.records() if r["step"] <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))
        self._mark_resume = step > 0

    def append(self, record: Mapping[str, Any]) -> None:
        """Add one step's record as one whole line."""
        if self._mark_resume:
            record = {**record, RESUMED: True}
            self._mark_resume = False
        data = (json.dumps(dict(record)) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            written = os.write(fd, data)
            while written < len(data):  # only on a full disk; the rest still goes in order
                written += os.write(fd, data[written:])
        finally:
            os.close(fd)
        step = record["step"]
        if self._tensorboard is not None and step % self.log_every == 0:
            for key, value in record.items():  # numbers only (not the step, not the resume flag)
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(f"train/{key}", value, step)

    def plot(self, curves: Sequence[Curve], title: str, lr_keys: Sequence[str] = ("lr",)) -> Path | None:
        """Draw `logdir/loss.png` from the whole file; None (and a warning) without matplotlib."""
        try:
            from core.train.plots import write_loss_plot
        except ImportError as err:  # matplotlib is a dependency; an unusual install still trains
            log.warning("no loss.png: %s", err)
            return None
        return write_loss_plot(self.path.with_name("loss.png"), self.records(), curves, title, lr_keys)


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLines:
    """Plain progress lines, e.g. `step 40/120  loss 0.8123  |g| 0.412  1.21 s/step  ETA 0:01:37`,
    every `every` steps and at the last one. s/step is the mean of the last `window` steps of
    this process (the first step, with its warm-up, drops out after `window` steps)."""

    def __init__(self, fields: Sequence[Curve], total: int, every: int, write: Callable[[str], None],
                 window: int = 20):
        self.fields, self.total, self.every, self.write = fields, total, every, write
        self.window = window
        self._seconds: list[float] = []

    def __call__(self, record: Mapping[str, Any]) -> None:
        self._seconds = (self._seconds + [float(record["step_seconds"])])[-self.window:]
        step = int(record["step"])
        if step % self.every and step != self.total:
            return
        per_step = sum(self._seconds) / len(self._seconds)
        parts = [f"step {step}/{self.total}"]
        parts += [f"{c.short} {record[c.key]:.4g}" for c in self.fields if c.key in record]
        parts += [f"{per_step:.2f} s/step", f"ETA {format_duration(per_step * (self.total - step))}"]
        self.write("  ".join(parts))
