"""The `longlive` command line: listed commands, bench, and the one-line error policy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longlive_cli.app import main

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--preset", "tiny", "--frames-per-block", "2", "--window", "6", "--sink", "2",
        "--chunks", "5", "--device", "cpu"]


def test_module_entry_point_lists_only_working_commands():
    out = subprocess.run([sys.executable, "-m", "longlive_cli", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    # Rows of the rich help panels: "│ name  description"; wrapped lines start with spaces.
    commands = [line[2:].split()[0] for line in out.stdout.splitlines()
                if line.startswith("│ ") and line[2] not in " -"]
    assert commands == ["bench"]


def test_bench_tiny_json(capsys):
    assert main(["bench", *FAST, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["preset"] == "tiny" and result["device"] == "cpu"
    assert result["chunks"] == 5 and result["steady_chunks"] == 2  # 3 chunks fill the window
    assert result["seconds_per_block"] > 0
    assert result["fps"] == pytest.approx(8 / result["seconds_per_block"])
    assert result["latent_height"] == 8 and result["tokens_per_frame"] == 16


def test_bench_table(capsys):
    assert main(["bench", *FAST]) == 0
    out = capsys.readouterr().out
    assert "s / block" in out and "video fps" in out and "tiny" in out


@pytest.mark.parametrize("args,needle", [
    (["bench", "--preset", "tiny", "--set", "stream.foo=1"], "unknown key 'stream.foo'"),
    (["bench", "--preset", "tiny", "--steps", "0"], "stream.sampling_steps must be a positive integer"),
    (["bench", "--preset", "tiny", "--height", "100"], "video.height must be a positive multiple of 32"),
    (["bench", "--recipe", "missing.yaml"], "recipe 'missing.yaml' not found"),
    (["bench", "--preset", "tiny", "--chunks", "2"], "chunks must be > 4"),
    (["bench", "--preset", "tiny", "--attention", "fast"], "bad value for 'runtime.attention'"),
    (["bench", "--nope"], "No such option: --nope"),
    (["bench", "--preset", "wan2.2-ti2v-5b", "--device", "cpu"], "needs a CUDA GPU"),
])
def test_bad_input_is_one_line_exit_2(capsys, args, needle):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_only_option_without_gpu(capsys):
    assert main(["bench", "--preset", "tiny", "--device", "cuda"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
