"""Prompt suites for the generate source of `eval-vbench`, and the plug point for other suites.

A suite is a list of prompts, each with the VBench dimensions it serves and the
`auxiliary_info` those dimensions read (object, colour, scene, style ...). Sources: VBench's
standard suite (`VBench_full_info.json`, shipped in the vbench wheel, read from the VBench
environment), a VBench-style JSON file (`[{"prompt_en", "dimension", "auxiliary_info"}]`, e.g.
a VBench-Long prompt file) or a text file (one prompt per line, serving every dimension asked).
Suites that evaluate something else entirely (the offline shapes-world probe) register a module
in EXTERNAL_SUITES exposing `run_eval_suite(out: Path, device: str, dimensions, *, source:
VideoSource, max_prompts: int | None, seconds: float | None, seed: int, videos_dir: Path | None)
-> dict` (`dimensions`: the names given to --dimensions, None for the suite's default; the suite
checks them). It plans its videos as `SuiteVideo`s and has `source.generate` make them with the
command's generation options (the one generation path, `longlive_cli/eval.py`).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from core.errors import UserError
from core.eval.vbench import DIMENSIONS

VBENCH_SUITE = "vbench"
EXTERNAL_SUITES = {"shapes": "core.eval.shapes"}  # name -> module with run_eval_suite(...)
DEFAULT_SAMPLES = 5
_SEPARATORS = re.compile(r"[/\\\\]")
FLICKERING_SAMPLES = 25  # VBench samples temporal-flickering prompts 25 times (then filters static ones)


@dataclass(frozen=True)
class SuitePrompt:
    prompt: str
    dimensions: tuple[str, ...]
    auxiliary: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SuiteVideo:
    """One video an external suite asks for. `interactive`: the schedule's `continue` shots arrive
    as live prompt switches (as typed in `multishot --interactive`), not as a scripted schedule."""

    schedule: object  # core.shots.PromptSchedule, built with the source's frames_per_block
    seed: int
    output: Path
    interactive: bool = False


class VideoSource(Protocol):
    """What an external suite generates with: the command's model and options."""

    frames_per_block: int
    settings: dict  # JSON-ready: at least the resolved `preset` and sampling `steps`

    def claim(self, videos: Sequence[SuiteVideo]) -> None:
        """Before any part is generated: refuse (UserError) videos already written that this run
        would make otherwise, and record this run's (a source that keeps nothing may do nothing)."""

    def generate(self, videos: Sequence[SuiteVideo]) -> None:
        """Write every video (checked before the first; the models built once)."""


def vbench_suite_file(python: Path) -> Path:
    """VBench_full_info.json inside the VBench environment's vbench package."""
    code = "import os, vbench; print(os.path.join(os.path.dirname(vbench.__file__), 'VBench_full_info.json'))"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"cannot import vbench with {python}: run `longlive download --eval --env-only`")
    return Path(proc.stdout.strip())


def load_prompts(path: Path, dimensions: tuple[str, ...]) -> list[SuitePrompt]:
    """A VBench-style JSON list or a text file (one prompt per line) -> prompts serving `dimensions`."""
    if not path.is_file():
        raise UserError(f"prompt file {path} not found: give a .json (VBench format) or .txt file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".json":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"prompt file {path} has no prompts: write one prompt per line")
        return [SuitePrompt(p, dimensions) for p in prompts]
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"prompt file {path}: not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "prompt_en" in e for e in entries):
        raise UserError(f"prompt file {path}: expected VBench's format, a list of {{\"prompt_en\", \"dimension\"}}")
    out = []
    for entry in entries:
        dims = tuple(d for d in entry.get("dimension", DIMENSIONS) if d in dimensions)
        if dims:
            out.append(SuitePrompt(entry["prompt_en"], dims, entry.get("auxiliary_info") or {}))
    if not out:
        raise UserError(f"prompt file {path} has no prompt for {', '.join(dimensions)}")
    return out


def samples_for(prompt: SuitePrompt, samples: int | None) -> int:
    """--samples, else VBench's protocol: 25 for temporal-flickering prompts, 5 otherwise."""
    if samples is not None:
        return samples
    return FLICKERING_SAMPLES if "temporal_flickering" in prompt.dimensions else DEFAULT_SAMPLES


def video_stem(prompt: str, index: int) -> str:
    """VBench's file name for sample `index` of `prompt`: `{prompt}-{index}` (no path separators)."""
    return f"{_SEPARATORS.sub(' ', prompt)}-{index}"
