"""What the training commands (`train-ar`, `distill`) share.

    TrainJob        one invocation as typed values, and the same job as arguments for torchrun
    run_job         checks (main process, before anything heavy) -> re-execute under torchrun when
                    more than one process is asked for -> this process's device, process group and
                    plan -> train
    ConsoleEvents   how a run reports: a rich bar when stderr is a terminal, plain progress lines
                    on stdout when it is not (log files), one line naming the checkpoint resumed from
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console

from core.config import Precision
from core.errors import UserError
from core.train.metrics import Curve, ProgressLines, RunEvents
from sp.launcher import Launch, is_main_process, local_device, process_group, relaunch, under_torchrun

Plan = TypeVar("Plan")


@dataclass(frozen=True)
class TrainJob:
    """One training invocation. `outputs` are the file flags given, e.g. `(("--export", path),)`."""

    command_name: str
    recipe: str
    sets: tuple[str, ...]
    precision: Precision | None
    logdir: Path
    launch: Launch
    max_steps: int | None = None
    resume: bool = True
    outputs: tuple[tuple[str, Path], ...] = ()
    max_seconds: float | None = None

    def output(self, flag: str) -> Path | None:
        return dict(self.outputs).get(flag)

    def command(self) -> list[str]:
        """The same job as CLI arguments, for the torchrun re-execution."""
        args = [self.command_name, self.recipe, "--logdir", str(self.logdir),
                "--resume" if self.resume else "--no-resume"]
        if self.precision is not None:
            args += ["--precision", str(self.precision)]
        if self.max_steps is not None:
            args += ["--max-steps", str(self.max_steps)]
        if self.max_seconds is not None:
            args += ["--max-seconds", repr(self.max_seconds)]
        for flag, path in self.outputs:
            args += [flag, str(path)]
        for item in self.sets:
            args += ["--set", item]
        return args


def check_max_seconds(max_seconds: float | None) -> None:
    if max_seconds is not None and not max_seconds > 0:
        raise UserError(f"--max-seconds {max_seconds}: use a positive number of seconds")


def run_job(job: TrainJob, *, check: Callable[[], None], max_restarts: int, device_name: str,
            single_plan: Callable[[torch.device], Plan], distributed_plan: Callable[[torch.device], Plan],
            train: Callable[[Plan], Any]) -> Any:
    """Check, then train here (one process, or this is a torchrun worker) or re-execute under
    torchrun. Returns what `train` returns, or torchrun's exit code. Ctrl-C is one line saying
    the checkpoints are kept; a log the disk refuses is one line naming it."""
    from longlive_cli.app import interrupted

    if is_main_process():
        check()
    kept = f"the checkpoints written so far are kept in {job.logdir}: run the same command to resume"
    with interrupted(kept), _refused_log_writes(job.logdir):
        if not under_torchrun() and job.launch.world_size > 1:
            return relaunch(Launch(**{**job.launch.__dict__, "max_restarts": max_restarts}), job.command())
        device = local_device(device_name)
        if not under_torchrun():
            return train(single_plan(device))
        with process_group(device):
            return train(distributed_plan(device))


@contextlib.contextmanager
def _refused_log_writes(logdir: Path):
    """A log written along the way (metrics, TensorBoard) that the disk refused mid-run: one line
    naming the file, as for the checkpoints and outputs (which report their own)."""
    from core.errors import SPACE_ERRNOS, write_failed

    try:
        yield
    except OSError as err:
        if err.errno not in SPACE_ERRNOS:
            raise
        raise write_failed(err.filename or logdir, err) from None


class ConsoleEvents(RunEvents):
    """Rank 0's view of a run: see the module doc. Use as a context manager around the run."""

    def __init__(self, name: str, fields: Sequence[Curve]):
        from longlive_cli.progress import step_progress

        self.name, self.fields = name, fields
        stderr = Console(stderr=True)
        self.progress = step_progress(stderr) if stderr.is_terminal else None
        self.lines: ProgressLines | None = None
        self.task = None

    def __enter__(self) -> ConsoleEvents:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def resumed(self, step: int, checkpoint: Path) -> None:
        print(f"{self.name}: resumed from the checkpoint of step {step} ({checkpoint})", flush=True)

    def started(self, start_step: int, total: int, log_every: int) -> None:
        if not sys.stdout.isatty():
            self.lines = ProgressLines(self.fields, total, log_every,
                                       lambda line: print(f"{self.name}: {line}", flush=True))
        if self.progress is not None:
            nan = float("nan")
            self.task = self.progress.add_task(self.name, total=total, completed=start_step, loss=nan,
                                               grad_norm=nan, step_time=nan)

    def stepped(self, record: Mapping[str, Any]) -> None:
        if self.lines is not None:
            self.lines(record)
        if self.progress is not None:
            loss, grad = (record.get(c.key, float("nan")) for c in self.fields[:2])
            self.progress.update(self.task, completed=record["step"], loss=loss, grad_norm=grad,
                                 step_time=record["step_seconds"])


def main_process_events(name: str, fields: Sequence[Curve]) -> ConsoleEvents | None:
    """The reporter of this process: rank 0 (or a plain process) reports, the others do not."""
    return ConsoleEvents(name, fields) if is_main_process() else None
