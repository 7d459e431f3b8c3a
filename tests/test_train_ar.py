"""`longlive train-ar` end to end on the tiny recipe: training, logs, export -> generate, resume
after SIGKILL (bit-identical to an uninterrupted run), torchrun + SP + FSDP on gloo, and the
start-up errors (one line, exit 2, before any work)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longlive_cli.app import main
from tests.conftest import run_cli_here

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--set", "train.checkpoint_every=2", "--set", "train.deterministic=true"]


def metrics(logdir: Path) -> list[dict]:
    path = logdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_tiny_recipe_trains_logs_checkpoints_and_exports(tmp_path):
    logdir, export = tmp_path / "run", tmp_path / "generator.safetensors"
    assert main(["train-ar", "train_ar_tiny", "--logdir", str(logdir), "--max-steps", "4", "--export", str(export),
                 *FAST]) == 0
    steps = metrics(logdir)
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all(m["loss"] > 0 and m["grad_norm"] > 0 and m["tokens_per_second"] > 0 for m in steps)
    png = (logdir / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 800
    assert any((logdir / "tensorboard").iterdir())
    done = sorted(p.name for p in (logdir / "checkpoints").iterdir())
    assert done == ["step_00000002", "step_00000004"]
    assert all((logdir / "checkpoints" / name / "COMPLETE").exists() for name in done)
    # The export is a generator file the tiny preset loads, and generate makes a video from it.
    from core.checkpoint import check_state_dict, read_shapes
    from tests.conftest import tiny_model

    check_state_dict(tiny_model(), read_shapes(export), str(export))
    video = tmp_path / "from-training.mp4"
    assert main(["generate", "a red circle moves", "--preset", "tiny", "--checkpoint", str(export), "--frames", "8",
                 "--height", "64", "--width", "64", "-o", str(video)]) == 0
    assert video.stat().st_size > 0


def test_sigkill_then_resume_reaches_the_uninterrupted_parameters(tmp_path, capsys):
    steps = 6
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["train_ar_tiny", "--max-steps", str(steps), *FAST]
    # the uninterrupted run and the resumed one here (one thread), the killed one as a CLI process (one thread)
    export = str(straight / "out.safetensors")
    assert run_cli_here("train-ar", *args, "--logdir", str(straight), "--export", export) == 0

    kill_after = random.Random(os.getpid()).choice([3, 4, 5])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "longlive_cli", "train-ar", *args, "--logdir", str(resumed)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(metrics(resumed)) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(metrics(resumed))
    assert killed_at < steps, "the run finished before it could be killed"
    # Leftovers of a crash mid-save: neither may ever be picked.
    (resumed / "checkpoints" / ".tmp-step_00000099").mkdir(parents=True)
    (resumed / "checkpoints" / "step_00000098").mkdir()

    capsys.readouterr()
    assert run_cli_here("train-ar", *args, "--logdir", str(resumed), "--export", str(resumed / "out.safetensors")) == 0
    assert "train-ar: resumed from the checkpoint of step " in capsys.readouterr().out
    history = [m["step"] for m in metrics(resumed)]
    restart = history.index(history[killed_at], killed_at) if killed_at < len(history) else None
    assert restart == killed_at
    first_after = history[killed_at]
    assert killed_at - 2 < first_after <= killed_at + 1  # lost at most one checkpoint interval (2)
    assert history[-1] == steps
    expected, got = load_file(straight / "out.safetensors"), load_file(resumed / "out.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def _no_caption_data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "video" / "0").mkdir(parents=True)
    (root / "video" / "0" / "0.mp4").write_bytes(b"not a video")
    return root


def _incompatible_resume_dir(tmp_path: Path) -> Path:
    from core.config import ModelConfig
    from core.train.state import CheckpointManager
    from tests.conftest import tiny_model

    logdir = tmp_path / "old"
    config = ModelConfig.preset("tiny")
    CheckpointManager(logdir).save(1, tiny_model(), None, {"preset": "tiny", **config.__dict__})
    return logdir


@pytest.mark.parametrize("case, make_args, needle", [
    ("frames", lambda p: ["--nproc-per-node", "2", "--set", "parallel.sp=2", "--set", "data.latent_frames=6"],
     "not divisible by SP size"),
    ("data", lambda p: ["--set", "data.synthetic=false", "--set", f"data.path={_no_caption_data(p)}"], "caption"),
    ("logdir", lambda p: ["--logdir", str(p / "file.txt" / "run")], "not writable"),
    ("resume", lambda p: ["--logdir", str(_incompatible_resume_dir(p)), "--set", "model.dim=64"], "different model"),
    ("key", lambda p: ["--set", "optim.learning_rate=1"], "unknown key"),
    ("dropout", lambda p: ["--set", "data.caption_dropout=1"], "data.caption_dropout must be in [0, 1)"),
    ("warmup", lambda p: ["--set", "optim.warmup_steps=-1"], "warmup_steps >= 0"),
    ("heads", lambda p: ["--nproc-per-node", "3", "--set", "parallel.sp=3"], "heads"),
    ("world", lambda p: ["--set", "parallel.sp=2"], "world size 1 is not divisible"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, case, make_args, needle):
    (tmp_path / "file.txt").write_text("x")
    args = make_args(tmp_path)
    if "--logdir" not in args:
        args += ["--logdir", str(tmp_path / "run")]
    assert main(["train-ar", "train_ar_tiny", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_tiny_recipe_lowers_the_loss(tmp_path):
    """Recorded run (docs/BENCHMARKS.md): 120 steps, mean loss of the first 10 steps 2.94 -> last 10
    1.00. Here 30 steps, the same seeds: the last 10 must average well below the first 10."""
    logdir = tmp_path / "run"
    assert main(["train-ar", "train_ar_tiny", "--logdir", str(logdir), "--max-steps", "30",
                 "--set", "train.checkpoint_every=30"]) == 0
    losses = [m["loss"] for m in metrics(logdir)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)


def test_nvfp4_training_runs_the_official_ar_rules_on_the_block_linears(tmp_path):
    from core.config import Precision
    from core.train.ar import TrainPlan
    from core.train.config import load_train_recipe
    from longlive_cli.parallelize import parallelize
    from quant.nvfp4_train import NVFP4TrainLinear
    from tests.conftest import tiny_model

    recipe = load_train_recipe("train_ar_tiny", ["quant.precision=nvfp4"])
    assert recipe.quant.precision == Precision.nvfp4
    model = parallelize(tiny_model(), recipe, TrainPlan(torch.device("cpu")))
    layers = [m for m in model.modules() if isinstance(m, NVFP4TrainLinear)]
    assert len(layers) == 2 * 10  # 2 blocks x 10 linears
    assert {(m.rules.weight_rule, m.rules.activation_rule, m.rules.gradient_rule, m.rules.weight_2d)
            for m in layers} == {("static_6", "mse", "mse", True)}
    logdir = tmp_path / "nvfp4"
    assert main(["train-ar", "train_ar_tiny", "--precision", "nvfp4", "--logdir", str(logdir), "--max-steps", "2"]) == 0
    assert [m["step"] for m in metrics(logdir)] == [1, 2]


def test_max_seconds_stops_with_a_checkpoint_and_export_then_resumes(tmp_path):
    """--max-seconds ends the run at the first step past the budget, saved and exported as at the
    end; the same command with more time continues from that step."""
    logdir, export = tmp_path / "run", tmp_path / "generator.safetensors"
    args = ["train-ar", "train_ar_tiny", "--logdir", str(logdir), "--max-steps", "6", "--export", str(export),
            "--set", "train.checkpoint_every=100", "--set", "train.deterministic=true"]
    assert main([*args, "--max-seconds", "1e-6"]) == 0
    assert [m["step"] for m in metrics(logdir)] == [1]
    assert sorted(p.name for p in (logdir / "checkpoints").iterdir()) == ["step_00000001"]
    first = load_file(export)
    assert main([*args, "--max-seconds", "3600"]) == 0
    assert [m["step"] for m in metrics(logdir)] == list(range(1, 7))
    assert sorted(p.name for p in (logdir / "checkpoints").iterdir()) == ["step_00000001", "step_00000006"]
    assert any(not torch.equal(first[k], v) for k, v in load_file(export).items())


@pytest.mark.parametrize("command, recipe", [("train-ar", "train_ar_tiny"), ("distill", "distill_tiny")])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_max_seconds_must_be_positive(capsys, tmp_path, value, command, recipe):
    assert main([command, recipe, "--logdir", str(tmp_path / "run"), "--max-seconds", value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-seconds" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("warmup", [0, 4])
def test_lr_warmup_scales_the_first_steps_from_trained_weights(tmp_path, warmup):
    """optim.warmup_steps: the lr rises linearly over the first steps, and the first step from given
    weights (train.init, fresh optimizer) moves no weight by more than that step's lr: with
    beta1 = 0 Adam's first step is lr * g / (|g| + eps), the full lr on every weight with a gradient."""
    from core.checkpoint import save_generator
    from tests.conftest import tiny_model

    init = tmp_path / "init.safetensors"
    save_generator(tiny_model(), init)
    warm = ["--set", f"optim.warmup_steps={warmup}", "--set", f"train.init={init}"]
    assert main(["train-ar", "train_ar_tiny", "--logdir", str(tmp_path / "six"), "--max-steps", "6", *FAST, *warm]) == 0
    lrs = [m["lr"] for m in metrics(tmp_path / "six")]
    lr = lrs[-1]
    expected = [lr * min(1, (i + 1) / warmup) for i in range(6)] if warmup else [lr] * 6
    assert lrs == pytest.approx(expected, rel=1e-6)

    # lr 1 so that the step shows through the bf16 export (half an ulp is <= 0.008 for weights < 2)
    one = tmp_path / "one.safetensors"
    assert main(["train-ar", "train_ar_tiny", "--logdir", str(tmp_path / "one"), "--max-steps", "1", *FAST, *warm,
                 "--set", "optim.lr=1.0", "--export", str(one)]) == 0
    before, after = load_file(init), load_file(one)
    largest = max(float((after[k].float() - before[k].float()).abs().max()) for k in before)
    assert largest == pytest.approx(1 / warmup if warmup else 1.0, abs=0.02), largest
