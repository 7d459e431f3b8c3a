"""What a training run writes for people (issue 14 item 4), shared by train-ar and distill
(core/train/metrics.py): metrics.jsonl keeps each step once across resumes and only whole lines,
plain progress lines when stdout is a file, the resume line naming the checkpoint, loss.png."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.train.metrics import Curve, MetricsLog, ProgressLines

ROOT = Path(__file__).resolve().parents[1]
LOSS = Curve("loss", "loss", "loss")


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_metrics_log_keeps_each_step_once_and_whole_lines_only(tmp_path):
    log = MetricsLog(tmp_path)
    log.restart(0)
    for step in range(1, 6):
        log.append({"step": step, "loss": float(step)})
    with open(log.path, "a") as f:  # a writer killed mid-line (the old behaviour)
        f.write('{"step": 6, "lo')
    assert [r["step"] for r in log.records()] == [1, 2, 3, 4, 5]
    log.restart(3)  # resumed from the checkpoint of step 3: steps 4, 5 (and the torn 6) were discarded
    assert lines_of(log.path) == [json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3)]
    log.append({"step": 4, "loss": 0.5})
    log.append({"step": 5, "loss": 0.25})
    assert [(r["step"], r["loss"], r.get("resumed")) for r in log.records()] == \
        [(1, 1.0, None), (2, 2.0, None), (3, 3.0, None), (4, 0.5, True), (5, 0.25, None)]
    log.restart(0)  # --no-resume: a fresh run
    assert log.records() == [] and log.path.read_text() == ""


def test_progress_lines_every_n_steps_with_the_recent_step_time_and_eta():
    out: list[str] = []
    lines = ProgressLines((LOSS, Curve("grad_norm", "|g|", "")), total=10, every=4, write=out.append, window=2)
    for step, seconds in zip(range(3, 11), (9.0, 1.0, 3.0, 2.0, 2.0, 2.0, 4.0, 4.0), strict=True):
        lines({"step": step, "loss": 1 / step, "grad_norm": 0.5, "step_seconds": seconds})
    # steps 4, 8 and the last; s/step = mean of the last 2 steps; ETA = that x steps left
    assert out == ["step 4/10  loss 0.25  |g| 0.5  5.00 s/step  ETA 0:00:30",
                   "step 8/10  loss 0.125  |g| 0.5  2.00 s/step  ETA 0:00:04",
                   "step 10/10  loss 0.1  |g| 0.5  4.00 s/step  ETA 0:00:00"]


def test_loss_plot_draws_the_whole_run(tmp_path):
    log = MetricsLog(tmp_path)
    log.restart(0)
    for step in range(1, 41):
        log.append({"step": step, "loss": 2.0 / step, "critic": 1.0, "lr": 1e-4})
    log.restart(30)
    log.append({"step": 31, "loss": 0.05, "critic": 1.0, "lr": 1e-4})
    png = log.plot((LOSS, Curve("critic", "critic", "critic loss")), "test: run")
    data = png.read_bytes()
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and (width, height) == (800, 680)


def test_train_ar_logs_plain_lines_to_a_file_and_resumes_naming_the_checkpoint(tmp_path, capsys):
    """Stdout to a file: one plain line per step (log_every 1). Then a resume from the checkpoint of
    step 2 after a discarded step 3 was logged: the resume line names it, each step is logged once."""
    from longlive_cli.app import main

    logdir, stdout = tmp_path / "run", tmp_path / "stdout.txt"
    args = ["train_ar_tiny", "--logdir", str(logdir), "--set", "train.checkpoint_every=2",
            "--set", "data.latent_frames=4", "--set", "error_recycling.enabled=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(stdout, "w") as f:
        done = subprocess.run([sys.executable, "-m", "longlive_cli", "train-ar", *args, "--max-steps", "2"],
                              cwd=ROOT, env=env, stdout=f, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    progress = [line for line in lines_of(stdout) if line.startswith("train-ar: step")]
    pattern = r"train-ar: step {}/2  loss \d\.\d+  \|g\| [\d.]+  \d+\.\d\d s/step  ETA \d:\d\d:\d\d"
    assert len(progress) == 2 and all(re.fullmatch(pattern.format(i + 1), line) for i, line in enumerate(progress))

    with open(logdir / "metrics.jsonl", "a") as f:  # step 3 ran, then the process died before saving
        f.write(json.dumps({"step": 3, "loss": 123.0, "grad_norm": 1.0, "lr": 1.0, "step_seconds": 1.0}) + "\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train-ar", *args, "--max-steps", "3"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert f"train-ar: resumed from the checkpoint of step 2 ({logdir / 'checkpoints' / 'step_00000002'})" in out
    records = [json.loads(line) for line in lines_of(logdir / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[2]["loss"] != 123.0 and records[2]["resumed"] is True
    assert (logdir / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("every", [1, 3])
def test_progress_lines_of_a_short_run_end_with_the_last_step(every):
    out: list[str] = []
    lines = ProgressLines((LOSS,), total=2, every=every, write=out.append)
    for step in (1, 2):
        lines({"step": step, "loss": 1.0, "step_seconds": 1.0})
    assert [line.split("  ")[0] for line in out] == (["step 1/2", "step 2/2"] if every == 1 else ["step 2/2"])
