"""`generate` / `multishot` / `bench` on several processes from the CLI (tiny preset, CPU, gloo).

Bad layouts are one line, exit 2, before any work (no re-execution); the re-executed command is
the parsed one written back; one torchrun run of 2 SP ranks with the split decode writes the same
video as one process. (A bench rank runs in tests/test_sp_inference.py's workers.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import longlive_cli.parallel_inference as parallel
from longlive_cli.app import main
from tests.test_generate import SMALL, no_leftovers, read_video

# The tiny VAE decodes several times faster on one thread than on a busy pool.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_relaunch(monkeypatch):
    """Record the torchrun re-executions instead of running them."""
    calls = []
    monkeypatch.setattr(parallel, "relaunch", lambda launch, argv, **options: calls.append((launch, list(argv))) or 0)
    return calls


@pytest.mark.parametrize("args, needle", [
    (["--sp", "2"], "needs 2 processes: add --nproc-per-node 2"),
    (["--nproc-per-node", "3", "--sp", "2"], "3 processes are not divisible by --sp 2"),
    (["--nproc-per-node", "3", "--sp", "3"], "4 attention heads are not divisible"),
    (["--nproc-per-node", "4", "--sp", "4", "--set", "stream.frames_per_block=2", "--frames", "8"],
     "2 latent frames of a chunk are not divisible"),
    (["--nproc-per-node", "2", "--cfg-parallel"], "guidance is off"),
    (["--nproc-per-node", "2", "--decode", "device:1"], "needs a CUDA GPU"),
    (["--nproc-per-node", "0"], "--nproc-per-node 0: use 1 or more"),
])
def test_bad_layout_is_one_line_exit_2_before_any_work(tmp_path, capsys, no_relaunch, args, needle):
    if "device:1" in args and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert main(["generate", "x", *SMALL, "--device", "cpu", "-o", str(tmp_path / "v.mp4"), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert no_relaunch == [] and no_leftovers(tmp_path)


@pytest.mark.parametrize("command, needle", [
    (["multishot", "{shots}", "--interactive", "--nproc-per-node", "2"], "--interactive drives one video"),
    (["bench", "--decode", "split", "--nproc-per-node", "2", "--sp", "2"], "bench --decode split"),
    (["multishot", "{shots}", "--nproc-per-node", "3", "--sp", "3"], "4 attention heads are not divisible"),
    (["multishot", "{shots}", "--sp", "4"], "needs 4 processes: add --nproc-per-node 4"),
    (["bench", "--nproc-per-node", "3", "--sp", "2"], "3 processes are not divisible by --sp 2"),
    (["bench", "--nproc-per-node", "4", "--sp", "4", "--set", "stream.frames_per_block=2"],
     "2 latent frames of a chunk are not divisible"),
])
def test_bad_parallel_requests(tmp_path, capsys, no_relaunch, command, needle):
    shots = tmp_path / "shots.txt"
    shots.write_text("a\nb\n")
    args = [a.format(shots=shots) for a in command] + ["--preset", "tiny", "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert no_relaunch == []


def test_reexecuted_command_is_the_parsed_command(tmp_path, no_relaunch):
    args = ["generate", "a fox, at night", *SMALL, "--device", "cpu", "--seconds", "1.5", "--decode", "split",
            "--nproc-per-node", "2", "--sp", "2", "--set", "stream.sampling_steps=2", "--set", "runtime.seed=4",
            "--precision", "bf16", "-o", str(tmp_path / "v.mp4")]
    assert main(args) == 0
    (launch, argv), = no_relaunch
    assert launch.world_size == 2 and argv[:2] == ["generate", "a fox, at night"]
    for pair in (["--sp", "2"], ["--decode", "split"], ["--seconds", "1.5"], ["--precision", "bf16"],
                 ["--set", "runtime.seed=4"]):
        assert any(argv[i:i + 2] == pair for i in range(len(argv))), pair
    assert main(argv) == 0  # the workers' parse gives the same command back
    assert no_relaunch[1][1] == argv


def test_torchrun_sp2_split_decode_equals_one_process(tmp_path):
    # --crf 0: lossless H.264, so the frames compare; at a lossy crf the encoder's decisions flip
    # on the last-bit differences of the latents (1e-5 from the split matmuls) and move pixels by tens.
    common = ["generate", "a red ball bounces", *SMALL, "--device", "cpu", "--frames", "16", "--crf", "0"]
    assert main([*common, "-o", str(tmp_path / "one.mp4"), "--latents-out", str(tmp_path / "one.st")]) == 0
    assert main([*common, "-o", str(tmp_path / "sp2.mp4"), "--latents-out", str(tmp_path / "sp2.st"),
                 "--nproc-per-node", "2", "--sp", "2", "--decode", "split"]) == 0
    one, sp2 = (load_file(tmp_path / f"{name}.st")["latents"] for name in ("one", "sp2"))
    assert (one - sp2).abs().max().item() <= 1e-5 and one.abs().max() > 0.5
    frames_one, frames_sp2 = (np.stack(read_video(tmp_path / f"{name}.mp4")[0]) for name in ("one", "sp2"))
    assert frames_one.shape == frames_sp2.shape == (61, 64, 64, 3)
    gap = np.abs(frames_one.astype(np.int16) - frames_sp2.astype(np.int16))
    assert gap.max() <= 2 and gap.mean() < 0.01, (gap.max(), gap.mean())  # uint8 rounding, 4:2:0 chroma
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.mp4", "one.st", "sp2.mp4", "sp2.st"]
