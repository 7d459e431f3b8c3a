"""Multi-process runs: re-execution under `torch.distributed.run` and the process group's life.

A command started plainly with more than one process re-executes itself under torchrun (elastic,
`max_restarts`, multi-node rendezvous); started under torchrun (or with one process) it runs.
Every cheap check runs first, in the parent, before any process group or GPU work exists.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from core.errors import UserError
from core.runtime import resolve_device


@dataclass(frozen=True)
class Launch:
    """How many processes a run has, and where (the torchrun flags of every multi-GPU command)."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    max_restarts: int = 0

    def __post_init__(self) -> None:
        for name in ("nproc_per_node", "nnodes"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: use 1 or more")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that prints and writes."""
    return not under_torchrun() or os.environ.get("RANK", "0") == "0"


def world_size(launch: Launch) -> int:
    """The world this process belongs to (torchrun's, or the one it is about to launch)."""
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else launch.world_size


def torchrun_command(launch: Launch, command: Sequence[str]) -> list[str]:
    """`python -m torch.distributed.run ... -m longlive_cli COMMAND...`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc_per_node}",
           f"--nnodes={launch.nnodes}", f"--max-restarts={launch.max_restarts}"]
    if launch.nnodes > 1:
        cmd += [f"--node-rank={launch.node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "longlive_cli", *command]


def relaunch(launch: Launch, command: Sequence[str], log_level: str | None = None) -> int:
    """Run `command` under torchrun with the project on PYTHONPATH; its exit code. `log_level`
    (e.g. "ERROR") quiets torchrun's own log lines unless the user set LOGLEVEL.

    torchrun runs in a session of its own, so a Ctrl-C at the terminal (or SIGTERM / SIGHUP, taken
    as one) reaches this process only: it then stops torchrun silently (no agent traceback, no
    failure report), hands the interrupt to the workers, waits for them to clean up, and raises
    KeyboardInterrupt."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if log_level is not None:
        env.setdefault("LOGLEVEL", log_level)
    agent = subprocess.Popen(torchrun_command(launch, command), env=env, start_new_session=True)
    with _signals_as_interrupt((signal.SIGTERM, signal.SIGHUP)):
        try:
            return agent.wait()
        except KeyboardInterrupt:
            _interrupt_workers(agent)
            raise


@contextlib.contextmanager
def _signals_as_interrupt(signals: Sequence[signal.Signals]) -> Iterator[None]:
    """While the block runs, `signals` (a `kill`, the terminal hanging up) stop the run like a
    Ctrl-C: torchrun's own session would not receive them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _interrupt_workers(agent: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGINT to the agent's workers (after killing the agent), then wait for them to exit."""
    try:
        workers = [int(pid) for pid in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()]
    except OSError:  # no /proc: the agent forwards the signal itself
        agent.send_signal(signal.SIGINT)
        agent.wait()
        return
    agent.kill()
    agent.wait()
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    for pid in workers:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Still running (an exited worker is reaped by init once the agent is gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def local_device(name: str) -> torch.device:
    """The run's device; a torchrun worker on a GPU takes the GPU of its local rank."""
    device = resolve_device(name)
    if device.type == "cuda":
        if under_torchrun():
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """The default process group of a torchrun worker (NCCL on GPUs, gloo on CPUs) for the block."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                            device_id=device if device.type == "cuda" else None)
    try:
        yield
    finally:
        dist.destroy_process_group()
