"""Help (issue 14, items 7 and 8): examples for every subcommand, shown defaults, plain boolean
flags, the committed docs/cli-help.md up to date; and the wording of shot lines and summaries."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.shots import PromptSchedule, Shot
from longlive_cli.app import cli_command
from longlive_cli.generate import _summary, shot_line
from longlive_cli.help import EXAMPLES

ROOT = Path(__file__).resolve().parent.parent


def _docs_script():
    spec = importlib.util.spec_from_file_location("cli_help", ROOT / "docs" / "cli_help.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def docs():
    return _docs_script()


COMMANDS = sorted(cli_command().commands)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_subcommand_has_examples_and_plain_flags(docs, name):
    text = docs.help_text([name])
    examples = text.split(" Examples\n", 1)[1].splitlines()
    examples = [line for line in examples if line.strip()]
    assert 2 <= len(examples) <= 4 and examples == [f" {example}" for example in EXAMPLES[name]], text
    assert all(len(example) <= docs.WIDTH - 4 for example in EXAMPLES[name])  # one line each
    assert "<bool>" not in text
    assert re.search(r"--help\s+Show this message", text)


@pytest.mark.parametrize("name,defaults", [
    ("generate", {"--preset": "wan2.2-ti2v-5b", "--steps": "4", "--seed": "0", "--frames": "the recipe's: 128; tiny 24",
                  "--seconds": "the recipe's length: 128 latent frames = 509 video frames, 21.2 s"}),
    ("multishot", {"--preset": "wan2.2-ti2v-5b", "--steps": "4", "--seed": "0"}),
    ("bench", {"--preset": "wan2.2-ti2v-5b", "--steps": "4", "--seed": "0",
               "--frames": "the window fill + 6 chunks (80 for the 5B)"}),
    ("eval-vbench", {"--preset": "wan2.2-ti2v-5b", "--steps": "4", "--seed": "0", "--mode": "long",
                     "--seconds": "the recipe's length"}),
])
def test_defaults_are_shown(docs, name, defaults):
    options = _options(docs.help_text([name]))
    for option, value in defaults.items():
        assert f"[default: {value}" in options[option], options[option]
    if name in ("generate", "multishot"):
        assert "not both" in options["--seconds"] and "not both" in options["--frames"]


def _options(text: str) -> dict[str, str]:
    """Option -> its help text, joined over the wrapped lines of the rich panel."""
    options: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"│ (--[\w-]+)", line)
        if match:
            current = match.group(1)
            options[current] = ""
        if current is not None and line.startswith("│"):
            options[current] += " " + " ".join(line.strip("│ ").split()[1:] if match else line.strip("│ ").split())
    return {key: " ".join(value.split()) for key, value in options.items()}


def test_committed_help_is_up_to_date(docs):
    assert (ROOT / "docs" / "cli-help.md").read_text(encoding="utf-8") == docs.render(), \
        "docs/cli-help.md is out of date: run `python docs/cli_help.py`"


def test_shot_lines_say_how_each_shot_starts():
    schedule = PromptSchedule((Shot("a", 1, "cut"), Shot("b", 2, "cut"), Shot("c", 1, "continue")), 8)
    assert [shot_line(span) for span in schedule.spans] == [
        "shot 1: chunk 0, frame 0 (0.00 s), opening shot: 'a'",  # its `transition: cut` means nothing
        "shot 2: chunks 1-2, frame 29 (1.21 s), cut: 'b'",
        "shot 3: chunk 3, frame 93 (3.88 s), same scene: 'c'",
    ]


@pytest.mark.parametrize("command", ["generate", "multishot"])
def test_the_summary_is_titled_by_its_command(command):
    report = SimpleNamespace(video_frames=29, width=64, height=64, steps=4, precision="float32", device="cpu",
                             decode="sync", denoise_fps=1.0, denoise_seconds=1.0, end_to_end_fps=1.0,
                             end_to_end_seconds=1.0, peak_gpu_memory_gib=None, switches=[])
    assert _summary(report, command).title == f"longlive {command}"
