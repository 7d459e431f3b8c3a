"""Progress shown honestly (issue 14, item 5): rate and ETA from the first finished unit on, even
when every unit takes longer than rich's 30 s speed window; plain lines when not on a terminal;
Ctrl-C is one line and exit code 130."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from core import hub
from longlive_cli.app import main
from longlive_cli.progress import (
    TaskProgress,
    bytes_per_second,
    count_of,
    format_duration,
    gigabytes,
    per_second,
    step_progress,
)

ROOT = Path(__file__).resolve().parent.parent
LINE = r"{what}: \d+/\d+ {unit}, \d+\.\d {rate}, \d:\d\d:\d\d elapsed, ETA \d:\d\d:\d\d"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _chunks_progress(console: Console, clock: FakeClock) -> TaskProgress:
    return TaskProgress("generate", count_of("chunks"), console=console, total=4, clock=clock,
                        rate=per_second("frames/s", 32))


def test_plain_lines_show_rate_and_eta_from_the_first_slow_chunk():
    """Chunks of 30 s and more (the 5B on a slow GPU): rich's estimate would show `--` forever."""
    out, clock = io.StringIO(), FakeClock()
    with _chunks_progress(Console(file=out, width=200), clock) as progress:
        progress.start()
        for now, done in ((30, 1), (40, 2), (42, 3), (60, 4)):  # the third comes within 5 s: no line
            clock.now = now
            progress.update(done)
    assert out.getvalue().splitlines() == [
        "generate: 1/4 chunks, 1.1 frames/s, 0:00:30 elapsed, ETA 0:01:30",
        "generate: 2/4 chunks, 1.6 frames/s, 0:00:40 elapsed, ETA 0:00:40",
        "generate: 4/4 chunks, 2.1 frames/s, 0:01:00 elapsed, ETA 0:00:00",
    ]


def test_live_bar_shows_rate_and_eta_from_the_first_chunk():
    out, clock = io.StringIO(), FakeClock()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    progress = _chunks_progress(console, clock)
    assert progress.live
    progress.start()
    assert "-- frames/s" in _render(console, progress) and "ETA -:--:--" in _render(console, progress)
    clock.now = 45.0
    progress.update(1)
    shown = _render(console, progress)
    assert "1/4 chunks" in shown and "0.7 frames/s" in shown and "ETA 0:02:15" in shown, shown


def _render(console: Console, progress: TaskProgress) -> str:
    with console.capture() as captured:
        console.print(progress._bar.get_renderable())
    return captured.get()


def test_training_eta_from_the_last_step_time():
    console = Console(file=io.StringIO(), force_terminal=True, width=160, color_system=None)
    bar = step_progress(console)
    bar.add_task("train-ar", total=10, completed=2, loss=0.5, grad_norm=1.0, step_time=40.0)
    with console.capture() as captured:
        console.print(bar.get_renderable())
    assert "ETA 0:05:20" in captured.get()  # 8 steps of 40 s: longer than rich's window
    assert step_progress(Console(file=io.StringIO())).disable  # no bar in a log file


@pytest.mark.parametrize("value,text", [(None, "-:--:--"), (0.4, "0:00:00"), (3725, "1:02:05")])
def test_durations(value, text):
    assert format_duration(value) == text


def test_units():
    assert gigabytes(1_500_000_000, 24_000_000_000) == "1.50/24.00 GB"
    assert bytes_per_second(None) == "-- MB/s" and bytes_per_second(2.5e7) == "25.0 MB/s"
    assert count_of("layers")(3, None) == "3 layers"


def test_generate_and_multishot_log_plain_lines(tmp_path, capsys, fast_decode):
    shots = tmp_path / "shots.txt"
    shots.write_text("a cat\na dog\n")
    stream = ["stream.frames_per_block=2", "stream.local_window_frames=6", "stream.sink_frames=2"]
    args = ["--preset", "tiny", "--height", "32", "--width", "32", "--frames", "4"]
    args += [part for item in stream for part in ("--set", item)]
    assert main(["generate", "x", *args, "-o", str(tmp_path / "a.mp4")]) == 0
    assert main(["multishot", str(shots), *args, "-o", str(tmp_path / "b.mp4")]) == 0
    err = capsys.readouterr().err.splitlines()
    for what in ("generate", "multishot"):
        lines = [line for line in err if line.startswith(f"{what}: ")]
        assert [line.split(",")[0] for line in lines] == [f"{what}: 1/2 chunks", f"{what}: 2/2 chunks"], err
        assert all(re.fullmatch(LINE.format(what=what, unit="chunks", rate="frames/s"), line) for line in lines)


def test_bench_and_convert_log_plain_lines(tmp_path, capsys):
    from core.checkpoint import save_generator
    from tests.conftest import tiny_model

    assert main(["bench", "--preset", "tiny", "--frames-per-block", "2", "--window", "6", "--sink", "2",
                 "--frames", "10", "--device", "cpu", "--json"]) == 0
    source = save_generator(tiny_model(), tmp_path / "gen.safetensors")
    assert main(["convert-nvfp4", str(source), str(tmp_path / "q.safetensors"), "--preset", "tiny",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err.splitlines()
    bench = [line for line in err if line.startswith("bench tiny: ")]
    assert bench[0].startswith("bench tiny: 1/5 chunks") and bench[-1].startswith("bench tiny: 5/5 chunks")
    assert all(re.fullmatch(LINE.format(what="bench tiny", unit="chunks", rate="frames/s"), line) for line in bench)
    layers = [line for line in err if line.startswith("quantizing ")]
    assert layers[0].split(": ")[1].startswith("2/20 layers") and layers[-1].split(": ")[1].startswith("20/20")
    assert all(re.fullmatch(LINE.format(what=r"quantizing [\w.]+", unit="layers", rate="layers/s"), line)
               for line in layers), layers


def test_download_logs_bytes_rate_and_eta(tmp_path, capsys, monkeypatch):
    """The Hub library's byte bars (it keeps one for bytes received, one for bytes written) feed
    our line; its own file-count bar does not."""
    import huggingface_hub

    sizes = {"Efficient-Large-Model/LongLive-2.0-5B": [("model_bf16.pt", 600_000_000)],
             "Wan-AI/Wan2.2-TI2V-5B": [("Wan2.2_VAE.pth", 400_000_000)]}

    class Api:
        def __init__(self, endpoint=None):
            pass

        def model_info(self, repo_id, revision=None, files_metadata=False):
            return SimpleNamespace(siblings=[SimpleNamespace(rfilename=n, size=s) for n, s in sizes[repo_id]])

    def fetch(repo_id, tqdm_class, **kwargs):
        files = tqdm_class(total=1, desc="Fetching 1 files")
        received = tqdm_class(total=0, unit="B", desc="Downloading bytes")
        written = tqdm_class(total=0, unit="B", desc="Reconstructing")
        for _ in range(4):
            received.update(sizes[repo_id][0][1] // 4)
            written.update(sizes[repo_id][0][1] // 4)
        files.update(1)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    assert main(["download", "--local-dir", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("download: ")]
    assert lines[0].startswith("download: 0.15/1.00 GB, ") and lines[-1].startswith("download: 1.00/1.00 GB, ")
    assert all(re.fullmatch(r"download: \d\.\d\d/1\.00 GB, [\d.]+ [MG]B/s, \d:\d\d:\d\d elapsed, ETA \d:\d\d:\d\d",
                            line) for line in lines), lines


def test_a_resumed_download_counts_the_files_already_there(tmp_path):
    repo = hub.REPOS["wan"]
    planned = [hub.PlannedFile(repo, "Wan2.2_VAE.pth", 5), hub.PlannedFile(repo, "google/umt5-xxl/spiece.model", 3)]
    (tmp_path / repo.folder).mkdir()
    (tmp_path / repo.folder / "Wan2.2_VAE.pth").write_bytes(b"12345")
    assert hub.present_bytes(planned, tmp_path) == 5


def _sigint_as_at_a_terminal() -> None:
    """Run in the child before exec: a suite started from a background job (`pytest &`, nohup)
    passes SIGINT on ignored, and a Python started so never sees the Ctrl-C these tests send."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_is_one_line_exit_130_and_writes_nothing(tmp_path):
    """SIGINT to a real run, after its first chunk: the video's temp file and the latents are
    gone, and stderr ends with the one line."""
    out = tmp_path / "v.mp4"
    process = subprocess.Popen(
        [sys.executable, "-m", "longlive_cli", "generate", "x", "--preset", "tiny", "--height", "32", "--width", "32",
         "--frames", "800", "-o", str(out), "--latents-out", str(tmp_path / "z.safetensors")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_as_at_a_terminal)
    seen = []
    for line in process.stderr:  # wait for the first finished chunk
        seen.append(line)
        if line.startswith("generate: 1/100 chunks"):
            break
    process.send_signal(signal.SIGINT)
    stdout, rest = process.communicate(timeout=120)
    assert process.returncode == 130, "".join(seen) + rest
    assert rest.splitlines()[-1] == "interrupted; nothing was written"
    assert "Traceback" not in rest and stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_ctrl_c_of_a_parallel_run_is_one_line_exit_130_and_writes_nothing(tmp_path, how):
    """SIGINT to the terminal's process group of a torchrun run (2 ranks, SP 2) after its first
    chunk, or SIGTERM to the command alone (torchrun, in its own session, does not see either):
    the parent stops torchrun quietly, the workers clean up silently and are gone, one line,
    exit 130."""
    out = tmp_path / "v.mp4"
    process = subprocess.Popen(
        [sys.executable, "-m", "longlive_cli", "generate", "x", "--preset", "tiny", "--height", "32", "--width", "32",
         "--frames", "800", "-o", str(out), "--nproc-per-node", "2", "--sp", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=_sigint_as_at_a_terminal)
    seen = []
    for line in process.stderr:  # wait for the first finished chunk
        seen.append(line)
        if line.startswith("generate: 1/100 chunks"):
            break
    if how == "ctrl-c":
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
    else:
        process.send_signal(signal.SIGTERM)
    stdout, rest = process.communicate(timeout=120)
    assert process.returncode == 130, "".join(seen) + rest
    assert rest.splitlines() == ["interrupted; nothing half-written was left (videos finished before it are kept)"]
    assert stdout == "" and list(tmp_path.iterdir()) == []
    workers = [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_has(pid, str(out))]
    assert workers == []


def _cmdline_has(pid: str, text: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return text.encode() in f.read()
    except OSError:
        return False


def test_ctrl_c_while_training_is_one_line_exit_130(tmp_path):
    """SIGINT to a real training run after its first step: one line saying the checkpoints are
    kept (a resume picks them up), exit 130, no traceback."""
    import time

    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "longlive_cli", "train-ar", "train_ar_tiny", "--logdir", str(run), "--max-steps",
         "100000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_sigint_as_at_a_terminal)
    deadline = time.monotonic() + 240
    while not (run / "metrics.jsonl").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # the first step's record: training is under way
    process.send_signal(signal.SIGINT)
    stdout, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.splitlines()[-1] == (f"interrupted; the checkpoints written so far are kept in {run}: "
                                    f"run the same command to resume")
    assert "Traceback" not in err + stdout  # stdout: the plain progress lines of a log file
    assert not list(run.glob("checkpoints/.tmp-*"))


CTRL_C_BOOKKEEPING = r"""
import os, signal, sys, threading, time
from core.errors import Interrupted
from longlive_cli.app import _exit_code_decided_by_ctrl_c, interrupted

class Swallowed:  # what Python hands the unraisable hook for a Ctrl-C that landed in a finalizer
    exc_type, exc_value, exc_traceback, err_msg, object = KeyboardInterrupt, KeyboardInterrupt(), None, None, None

# 1. two Ctrl-Cs swallowed while the block runs: one redelivery, and it lands in the block
try:
    with interrupted("kept"):
        sys.unraisablehook(Swallowed())
        sys.unraisablehook(Swallowed())
        timers = sum(isinstance(t, threading.Timer) for t in threading.enumerate())
        time.sleep(2)
    print("not interrupted")
except Interrupted as err:
    print("interrupted;", err, "timers", timers)
time.sleep(0.2)  # no second interrupt after it

# 2. swallowed just before the block ends: the redelivery is cancelled with the block
with interrupted("kept"):
    sys.unraisablehook(Swallowed())
time.sleep(0.2)
print("quiet after the block")

# 3. a caller's process keeps its Ctrl-C; the command's own process ignores it once 130 is decided
_exit_code_decided_by_ctrl_c(["generate"])
assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
_exit_code_decided_by_ctrl_c(None)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.2)
print("still running")
"""


def test_a_swallowed_ctrl_c_is_redelivered_once_and_never_after_the_exit_code_is_decided():
    """`interrupted` redelivers a Ctrl-C that a finalizer swallowed, once however many were
    swallowed and never after its block; a command run as a process ignores SIGINT once Ctrl-C
    has decided its exit code (a late one ended the process by the signal, exit -2, in 1 of 12
    runs of the training case above). In a process of its own: a failure here is a KeyboardInterrupt."""
    done = subprocess.run([sys.executable, "-c", CTRL_C_BOOKKEEPING], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["interrupted; kept timers 1", "quiet after the block", "still running"]
