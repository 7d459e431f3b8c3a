"""A distilled LoRA records the sampling steps it was distilled for (`distill --export-lora`): a run
with it samples that way (those steps, no guidance) unless a flag or --set says otherwise, and then
`generate` says in one line, before any model, that the run samples otherwise (other steps, or with
guidance: the shapes preset's default is guidance 3 for its AR model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from core.config import StreamConfig
from core.train.lora import save_lora_file
from longlive_cli.app import main
from longlive_cli.build import lora_sampling_note

TINY_LORA = {"base_model.model.blocks.0.ffn.0.lora_A.weight": torch.zeros(4, 128),
             "base_model.model.blocks.0.ffn.0.lora_B.weight": torch.zeros(256, 4)}


def _lora(folder: Path, suffix: str, steps: int | None, shift: float | None = None) -> Path:
    metadata = {"source": "longlive distill"} | ({"sampling_steps": steps} if steps is not None else {})
    metadata |= {"timestep_shift": shift} if shift is not None else {}
    return save_lora_file(TINY_LORA, folder / f"lora{suffix}", step=3, metadata=metadata)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("shift, steps, fixes", [
    (2.0, 2, ["--set stream.timestep_shift=2"]),
    (2.0, 4, ["--steps 2", "--set stream.timestep_shift=2"]),
    (5.0, 2, None),  # the run's shift is the recorded one
])
def test_note_names_a_timestep_shift_that_differs(tmp_path, suffix, shift, steps, fixes):
    path = _lora(tmp_path, suffix, 2, shift)
    note = lora_sampling_note(path, StreamConfig(sampling_steps=steps, guidance_scale=1.0, timestep_shift=5.0))
    if fixes is None:
        assert note is None
        return
    assert note.startswith(f"note: the LoRA {path} was distilled for 2 steps at timestep shift {shift:g} "
                           f"without guidance; this run samples {steps} steps at timestep shift 5"), note
    assert note.endswith(f"(for the distilled setting: {' '.join(fixes)})"), note


@pytest.mark.parametrize("shift, sets, expected", [
    (2.0, [], 2.0),  # the recorded schedule, not the preset's shift 5
    (2.0, ["stream.timestep_shift=3"], 3.0),  # --set wins
    (None, [], 5.0),  # a LoRA that records only its steps: the preset's shift
])
def test_a_distilled_lora_samples_its_recorded_timestep_shift(tmp_path, shift, sets, expected):
    from longlive_cli.options import resolve_recipe

    stream = resolve_recipe("shapes", None, sets, {"stream": {}}, _lora(tmp_path, ".safetensors", 2, shift)).stream
    assert (stream.sampling_steps, stream.timestep_shift, stream.guidance_scale) == (2, expected, 1.0)


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


@pytest.mark.parametrize("recorded, flags, sets, expected", [
    (2, {}, [], (2, 1.0)),  # the LoRA's own sampling instead of the preset's 16 steps with guidance 3
    (4, {}, [], (4, 1.0)),
    (2, {"sampling_steps": 4}, [], (4, 1.0)),  # a flag wins for its value, the other stays the LoRA's
    (2, {}, ["stream.guidance_scale=3"], (2, 3.0)),
    (2, {}, ["stream.sampling_steps=8", "stream.guidance_scale=2"], (8, 2.0)),
    (None, {}, [], (16, 3.0)),  # an official LoRA records nothing: the preset's sampling
])
@pytest.mark.parametrize("in_file", [False, True], ids=["set", "recipe-file"])
def test_a_distilled_lora_samples_as_distilled_unless_told(tmp_path, recorded, flags, sets, expected, in_file):
    from longlive_cli.options import resolve_recipe

    path = _lora(tmp_path, ".safetensors", recorded)
    recipe = None
    if in_file:  # the same values from a recipe file instead of --set
        recipe = tmp_path / "r.yaml"
        recipe.write_text("preset: shapes\nstream:\n" + "".join(f"  {s.split('.', 1)[1].replace('=', ': ')}\n"
                                                                 for s in sets) if sets else "preset: shapes\n")
        recipe, sets = str(recipe), []
    stream = resolve_recipe("shapes", recipe, sets, {"stream": flags}, path).stream
    assert (stream.sampling_steps, stream.guidance_scale) == expected
    if not sets:  # without the LoRA: the preset's sampling (the flag aside)
        plain = resolve_recipe("shapes", None, sets, {"stream": flags}).stream
        assert (plain.sampling_steps, plain.guidance_scale) == (flags.get("sampling_steps", 16), 3.0)


def test_generate_samples_the_loras_steps_and_notes_an_override(tmp_path, capsys):
    path = _lora(tmp_path, ".safetensors", 2)
    out = tmp_path / "v.mp4"
    args = ["generate", "x", "--preset", "tiny", "--random-weights", "--height", "32", "--width", "32",
            "--frames", "8", "--lora", str(path), "-o", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "note:" not in captured.err and out.is_file()
    assert re.search(r"steps / precision\s*│\s*2 /", captured.out), captured.out  # the run's summary
    assert main([*args, "--steps", "4"]) == 0
    err = capsys.readouterr().err
    assert f"note: the LoRA {path} was distilled for 2 steps without guidance; this run samples 4 steps " in err


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
    assert main([*command, *extra, "--lora", str(path), "--steps", "4"]) == 0
    err = capsys.readouterr().err
    assert f"note: the LoRA {path} was distilled for 2 steps without guidance; this run samples 4 steps " in err
