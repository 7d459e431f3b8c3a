"""docs/benchmarks/train_step_profile.py on the CPU (tiny recipe): it profiles the steps asked for
and attributes each labelled stage once per micro-step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "train_step_profile.py"


@pytest.mark.parametrize("at, steps", [(2, 2)])
def test_profiles_the_steps_asked_for_with_every_stage(tmp_path, at: int, steps: int) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--at", str(at), "--steps", str(steps), "--top", "5", "--",
                          "train_ar_tiny", "--logdir", str(tmp_path / "run"), "--max-steps", str(at + steps - 1),
                          "--set", "train.checkpoint_every=100"],
                         capture_output=True, text=True, timeout=300, check=True)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    stages = {r["stage"]: r for r in map(json.loads, lines)}
    assert set(stages) == {"step", "data", "vae_encode", "text", "recycle_inject", "dit_forward", "micro_step",
                           "recycle_update", "ema"}
    assert all(r["calls"] == steps for r in stages.values())  # the profiled steps only, one micro-step each
    inner = sum(stages[s]["host_ms_per_step"] for s in ("vae_encode", "text", "recycle_inject", "dit_forward"))
    assert 0 < inner <= stages["micro_step"]["host_ms_per_step"] <= stages["step"]["host_ms_per_step"]
    assert "top operators by host self time" in run.stdout


def test_a_run_that_ends_before_the_profiled_steps_says_so(tmp_path) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--at", "5", "--steps", "1", "--",
                          "train_ar_tiny", "--logdir", str(tmp_path / "run"), "--max-steps", "2",
                          "--set", "train.checkpoint_every=100"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "before step 5 was profiled" in run.stderr
