"""Prompt-only training data of DMD distillation (the official `MultiTextConcatDataset`): one
prompt per chunk, the scene-cut prefix on the first chunk of every shot after the first.

Sources:
  `.txt` file      one caption per line; a sample is one line, the same prompt for every chunk
  caption folder   `caption/<sample>/<n>.json` (or `<sample>/<n>.json` directly) with a "caption";
                   a sample's captions, in integer-stem order, are consecutive shots. Chunks per
                   shot: `shot_durations.txt` in the sample folder (integers), else
                   `chunks_per_shot`, else an even split of the sample's chunks
  synthetic        captions of `core/train/synthetic.py` (moving shapes), two shots a sample
Every sample has exactly `num_chunks` prompts: too many are cut, too few repeat the last one
(unprefixed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError, first_line

SYNTHETIC_SAMPLES = 16


def shot_lengths(num_chunks: int, num_shots: int, durations: Sequence[int] | None, chunks_per_shot: int) -> list[int]:
    """Chunks of each shot, summing to `num_chunks`: the given durations (clamped, the last shot
    stretched to fill), else `chunks_per_shot` each, else an even split (earlier shots longer)."""
    if durations is None:
        if chunks_per_shot > 0:
            durations = [chunks_per_shot] * num_shots
        else:
            base, extra = divmod(num_chunks, num_shots)
            durations = [base + (1 if i < extra else 0) for i in range(num_shots)]
    durations = list(durations)[:num_shots]
    lengths, remaining = [], num_chunks
    for duration in durations:
        if remaining <= 0:
            break
        take = min(duration, remaining)
        lengths.append(take)
        remaining -= take
    if remaining > 0 and lengths:
        lengths[-1] += remaining
    return lengths


def chunk_prompts(captions: Sequence[str], lengths: Sequence[int], num_chunks: int, prefix: str) -> list[str]:
    """One prompt per chunk: shot i's caption for its chunks, `prefix` on each later shot's first."""
    prompts = []
    for shot, (caption, length) in enumerate(zip(captions, lengths, strict=False)):
        for chunk in range(length):
            prompts.append(prefix + caption if shot > 0 and chunk == 0 else caption)
    prompts = prompts[:num_chunks]
    return prompts + [prompts[-1]] * (num_chunks - len(prompts))


def _caption(path: Path) -> str:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read caption {path} ({first_line(err)}): fix or remove the file") from None
    caption = data.get("caption") if isinstance(data, dict) else None
    return caption.strip() if isinstance(caption, str) else ""


def _stem_order(path: Path) -> tuple[int, int, str]:
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)


def _durations(folder: Path) -> list[int] | None:
    path = folder / "shot_durations.txt"
    if not path.exists():
        return None
    parts = path.read_text().replace(",", " ").split()
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"{path} must hold positive integers (chunks per shot), got {' '.join(parts)!r}")
    return [int(p) for p in parts]


class PromptDataset(torch.utils.data.Dataset):
    """Items are lists of `num_chunks` prompts (see the module doc)."""

    def __init__(self, path: str | Path | None, num_chunks: int, *, chunks_per_shot: int = 0,
                 scene_cut_prefix: str, seed: int = 0):
        self.num_chunks, self.chunks_per_shot, self.prefix = num_chunks, chunks_per_shot, scene_cut_prefix
        if path is None:
            self.samples = _synthetic_samples(seed)
            self.durations: list[list[int] | None] = [None] * len(self.samples)
        elif Path(path).is_file():
            self.samples, self.durations = _read_txt(Path(path))
        else:
            self.samples, self.durations = _read_folder(Path(path))

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Items do not depend on the epoch (the sampler reshuffles); here for the loader's protocol."""

    def __getitem__(self, index: int) -> list[str]:
        captions = self.samples[index]
        lengths = shot_lengths(self.num_chunks, len(captions), self.durations[index], self.chunks_per_shot)
        return chunk_prompts(captions, lengths, self.num_chunks, self.prefix)


def _read_txt(path: Path) -> tuple[list[list[str]], list[list[int] | None]]:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read the prompt file {path} ({first_line(err)})") from None
    samples = [[line] for line in lines if line]
    if not samples:
        raise UserError(f"the prompt file {path} holds no prompts: one caption per line")
    return samples, [None] * len(samples)


def _read_folder(path: Path) -> tuple[list[list[str]], list[list[int] | None]]:
    if not path.is_dir():
        raise UserError(f"data.path {path} does not exist: give a .txt of prompts or a caption folder")
    root = path / "caption" if (path / "caption").is_dir() else path
    samples, durations = [], []
    for folder in sorted(d for d in root.iterdir() if d.is_dir()):
        files = sorted((f for f in folder.glob("*.json") if f.name != "global.json"), key=_stem_order)
        captions = [c for c in map(_caption, files) if c]
        if captions:
            samples.append(captions)
            durations.append(_durations(folder))
    if not samples:
        raise UserError(f"no captions under {root}: expected <sample>/<n>.json files with a \"caption\"")
    return samples, durations


def _synthetic_samples(seed: int) -> list[list[str]]:
    from core.train.synthetic import random_clip_spec

    samples = []
    for index in range(SYNTHETIC_SAMPLES):
        rng = np.random.default_rng([seed, index])
        first = random_clip_spec(rng)
        samples.append([first.caption, random_clip_spec(rng, first).caption])
    return samples
