"""A distilled LoRA records the sampling steps it was distilled for (`distill --export-lora`), and
`generate` says in one line, before any model, when a run samples otherwise (other steps, or with
guidance: the shapes preset's default is guidance 3 for its AR model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.config import StreamConfig
from core.train.lora import save_lora_file
from longlive_cli.app import main
from longlive_cli.build import lora_sampling_note

TINY_LORA = {"base_model.model.blocks.0.ffn.0.lora_A.weight": torch.zeros(4, 128),
             "base_model.model.blocks.0.ffn.0.lora_B.weight": torch.zeros(256, 4)}


def _lora(folder: Path, suffix: str, steps: int | None) -> Path:
    metadata = {"source": "longlive distill"} | ({"sampling_steps": steps} if steps is not None else {})
    return save_lora_file(TINY_LORA, folder / f"lora{suffix}", step=3, metadata=metadata)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("recorded, steps, guidance, fixes", [
    (2, 2, 1.0, None),
    (2, 4, 1.0, ["--steps 2"]),
    (2, 2, 3.0, ["--set stream.guidance_scale=1"]),
    (2, 4, 3.0, ["--steps 2", "--set stream.guidance_scale=1"]),
    (3, 4, 1.0, ["--set stream.sampling_steps=3"]),
    (None, 4, 3.0, None),  # an official LoRA records nothing: no note
])
def test_note_names_what_differs_and_the_flags(tmp_path, suffix, recorded, steps, guidance, fixes):
    path = _lora(tmp_path, suffix, recorded)
    note = lora_sampling_note(path, StreamConfig(sampling_steps=steps, guidance_scale=guidance))
    if fixes is None:
        assert note is None
        return
    assert note.startswith(f"note: the LoRA {path} was distilled for {recorded} steps without guidance")
    assert note.endswith(f"(for the distilled setting: {' '.join(fixes)})"), note
    assert ("with guidance 3" in note) == (guidance != 1.0) and "\n" not in note


def test_generate_prints_the_note_before_the_video(tmp_path, capsys):
    path = _lora(tmp_path, ".safetensors", 2)
    out = tmp_path / "v.mp4"
    assert main(["generate", "x", "--preset", "tiny", "--random-weights", "--height", "32", "--width", "32",
                 "--frames", "8", "--lora", str(path), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"note: the LoRA {path} was distilled for 2 steps without guidance; this run samples 4 steps " in err
    assert out.is_file()
    assert main(["generate", "x", "--preset", "tiny", "--random-weights", "--height", "32", "--width", "32",
                 "--frames", "8", "--steps", "2", "--lora", str(path), "-o", str(out)]) == 0
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["bench", "--preset", "tiny", "--frames-per-block", "2", "--window", "6", "--sink", "2", "--frames", "10",
     "--device", "cpu", "--json"],
    ["eval-vbench", "--suite", "shapes", "--preset", "tiny", "--random-weights", "--device", "cpu",
     "--max-prompts", "1", "--seconds", "0.5", "--dimensions", "prompts", "--set", "video.height=32",
     "--set", "video.width=32", "--set", "stream.frames_per_block=2"],
])
def test_bench_and_the_eval_suite_print_the_note_too(tmp_path, capsys, command):
    path = _lora(tmp_path, ".safetensors", 2)
    extra = ["--out", str(tmp_path / "r.json")] if command[0] == "eval-vbench" else []
    assert main([*command, *extra, "--lora", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"note: the LoRA {path} was distilled for 2 steps without guidance; this run samples 4 steps " in err
