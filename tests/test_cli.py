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
        "--frames", "10", "--device", "cpu"]


def test_module_entry_point_lists_only_working_commands():
    out = subprocess.run([sys.executable, "-m", "longlive_cli", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    # Rows of the rich help panels: "│ name  description"; wrapped lines start with spaces.
    commands = [line[2:].split()[0] for line in out.stdout.splitlines()
                if line.startswith("│ ") and line[2] not in " -"]
    assert commands == ["bench", "convert-nvfp4", "distill", "download", "eval-vbench", "generate", "multishot",
                        "train-ar", "train-vae"]


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
    (["bench", "--preset", "tiny", "--frames", "16"], "frames must exceed the 32 frames"),
    (["bench", *FAST[:-4], "--frames", "13"],
     "frames: 13 latent frames are not a multiple of frames_per_block=2; use 12 or 14"),
    (["bench", "--preset", "tiny", "--attention", "fast"], "bad value for 'runtime.attention'"),
    (["bench", "--nope"], "No such option: --nope"),
    (["bench", "--preset", "wan2.2-ti2v-5b", "--device", "cpu"], "needs a CUDA GPU"),
    (["bench", *FAST, "--gpu-busy"], "--gpu-busy profiles the DiT's chunks on one CUDA GPU"),
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


class _RunsCode:
    """A pickle payload that would create a marker file if it were ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _official_checkpoint(path: Path) -> None:
    from core.checkpoint import to_official_keys
    from tests.conftest import tiny_model

    torch.save({"generator": to_official_keys(tiny_model(3).state_dict()),
                "checkpoint_format": "longlive_generator_merged_lora"}, path)


def test_bench_loads_official_checkpoint_and_lora(tmp_path, capsys):
    ckpt = tmp_path / "model_bf16.pt"
    _official_checkpoint(ckpt)
    g = torch.Generator().manual_seed(0)
    lora = {f"base_model.model.blocks.0.ffn.0.lora_{part}.weight":
            torch.randn(shape, generator=g) for part, shape in (("A", (4, 128)), ("B", (256, 4)))}
    torch.save({"generator_lora": lora, "step": 1}, tmp_path / "lora.pt")
    assert main(["bench", *FAST, "--checkpoint", str(ckpt), "--lora", str(tmp_path / "lora.pt"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == 622144


@pytest.mark.parametrize("kind", ["truncated", "pickled_code", "wrong_model"])
def test_bad_checkpoint_is_one_line_exit_2(tmp_path, capsys, kind):
    path = tmp_path / "generator.pt"
    marker = tmp_path / "executed"
    if kind == "truncated":
        _official_checkpoint(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "pickled_code":
        torch.save({"generator": {"model.x": torch.zeros(1)}, "hook": _RunsCode(marker)}, path)
    else:
        torch.save({"generator": {"model.blocks.0.bogus": torch.zeros(3)}}, path)
    assert main(["bench", *FAST, "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and err.strip().count("\n") == 0 and "Traceback" not in err
    assert not marker.exists()
    expected = {"truncated": "truncated or corrupt", "pickled_code": "refuse to unpickle",
                "wrong_model": "does not match the model"}[kind]
    assert expected in err


@pytest.mark.parametrize("writer, bound", [(0.5, False), (0.95, True), (1.2, True), (None, False)])
def test_bench_table_names_a_writer_bound_run(writer, bound):
    from types import SimpleNamespace

    from longlive_cli.bench import _writer_note

    note = _writer_note(SimpleNamespace(writer_seconds_per_block=writer, e2e_seconds_per_block=1.0))
    assert ("writer bounds" in note) == bound
    assert ("H.264 writer" in note) == (writer is not None)


def test_bench_end_to_end_and_vae_modes(capsys):
    assert main(["bench", *FAST, "--height", "64", "--width", "64", "--decode", "sync", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["decode"] == "sync" and result["e2e_fps"] > 0
    # the DiT time excludes the in-line decode, so end-to-end is slower than the DiT alone
    assert result["e2e_over_dit"] < 1.0
    # the writer's own time per chunk is reported beside it (64 x 64 frames: far from bounding it)
    assert 0 < result["writer_seconds_per_block"] < result["e2e_seconds_per_block"]
    assert main(["bench", "--preset", "tiny", "--height", "64", "--width", "64", "--vae", "--json"]) == 0
    vae = json.loads(capsys.readouterr().out)
    assert vae["frames_per_chunk"] == 32 and vae["seconds_per_chunk"] > 0


def test_bench_table_lists_the_profiled_chunks_kernels(capsys):
    from rich.console import Console

    from core.benchmark import BenchResult
    from longlive_cli.bench import result_table

    assert main(["bench", *FAST, "--json"]) == 0
    result = BenchResult(**json.loads(capsys.readouterr().out))
    result.gpu_busy_fraction, result.gpu_idle_ms_per_block, result.gpu_kernels_per_block = 0.98, 11.0, 4247
    result.gpu_top_kernels = [{"name": f"kernel_{i}", "ms": 10.0 - i, "calls": 90, "share": 0.1} for i in range(10)]
    console = Console(width=200, record=True)
    console.print(result_table(result))
    text = console.export_text()
    assert "GPU busy" in text and "kernel_0" in text and "kernel_7" in text
    assert "kernel_8" not in text  # the first eight only; the JSON has them all
