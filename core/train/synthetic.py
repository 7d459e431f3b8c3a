"""Tiny synthetic training videos: a coloured shape moving over a plain background, one caption per clip.

Every clip differs in shape, colours or motion, so consecutive clips are real shot changes. Used by
tests and by `train-ar` smoke runs on a CPU; the output is deterministic for a seed.

Layouts written by `make_synthetic_dataset`:
  official  root/video/<sample>/<n>.mp4 + root/caption/<sample>/<n>.json ({"caption": ...})
  manifest  root/videos/<sample>.mp4 (the clips of a sample back to back) + root/manifest.jsonl with
            one line per sample: {"video", "caption", "shots": [{"start", "end", "caption"}]}

Shape legend: T frames, H height, W width, C = 3 colour channels (uint8 RGB).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.checkpoint import atomic_write
from core.config import VIDEO_FPS
from core.decode import VideoWriter

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square")
DIRECTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")
LAYOUTS = ("official", "manifest")


@dataclass(frozen=True)
class ClipSpec:
    """What one synthetic clip shows."""

    shape: str
    colour: str
    background: str
    direction: str

    @property
    def caption(self) -> str:
        return (f"{_article(self.colour)} {self.colour} {self.shape} moves {self.direction} "
                f"on {_article(self.background)} {self.background} background")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_clip_spec(rng: np.random.Generator, previous: ClipSpec | None = None) -> ClipSpec:
    """A clip spec whose background differs from `previous`'s, so the cut is visible in every frame."""
    names = list(COLOURS)
    while True:
        colour, background = rng.choice(names, size=2, replace=False)
        spec = ClipSpec(str(rng.choice(SHAPES)), str(colour), str(background), str(rng.choice(DIRECTIONS)))
        if previous is None or spec.background != previous.background:
            return spec


def render_clip(spec: ClipSpec, frames: int, height: int, width: int) -> np.ndarray:
    """uint8 `[T, H, W, C]`: the shape crosses the frame once at constant speed."""
    size = max(2, min(height, width) // 4)  # shape's side / diameter in pixels
    progress_T = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    ys, xs = np.mgrid[0:height, 0:width]
    video_THWC = np.empty((frames, height, width, 3), dtype=np.uint8)
    video_THWC[:] = COLOURS[spec.background]
    for t, p in enumerate(progress_T):
        if spec.direction in ("left to right", "right to left"):
            travel = p if spec.direction == "left to right" else 1.0 - p
            cx, cy = size / 2 + travel * (width - size), height / 2
        else:
            travel = p if spec.direction == "top to bottom" else 1.0 - p
            cx, cy = width / 2, size / 2 + travel * (height - size)
        if spec.shape == "circle":
            inside = (xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2 <= (size / 2) ** 2
        else:
            inside = (np.abs(xs + 0.5 - cx) <= size / 2) & (np.abs(ys + 0.5 - cy) <= size / 2)
        video_THWC[t][inside] = COLOURS[spec.colour]
    return video_THWC


def write_video(path: str | os.PathLike, frames_THWC: np.ndarray, fps: int = VIDEO_FPS) -> Path:
    """Write uint8 RGB frames as an H.264 mp4 (near-lossless, fast preset); atomic."""
    path = Path(path)
    height, width = frames_THWC.shape[1:3]
    with VideoWriter(path, width, height, fps=fps, crf=10, preset="ultrafast") as writer:
        writer.write(frames_THWC)
    return path


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def make_synthetic_dataset(root: str | os.PathLike, samples: int = 4, clips_per_sample: int = 2, frames: int = 48,
                           height: int = 64, width: int = 64, fps: int = VIDEO_FPS, seed: int = 0,
                           layout: str = "official") -> Path:
    """Write `samples` samples of `clips_per_sample` clips of `frames` frames each.

    Returns what `VideoClipDataset` takes: `root` for the official layout, the manifest file for the
    manifest layout. Height and width must be even (H.264 with yuv420p)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if height % 2 or width % 2:
        raise ValueError(f"height and width must be even for H.264 (got {height}x{width})")
    root = Path(root)
    manifest_lines = []
    for sample in range(samples):
        name = f"sample_{sample:03d}"
        rng = np.random.default_rng([seed, sample])
        specs: list[ClipSpec] = []
        for _ in range(clips_per_sample):
            specs.append(random_clip_spec(rng, specs[-1] if specs else None))
        clips = [render_clip(spec, frames, height, width) for spec in specs]
        if layout == "official":
            for n, (spec, clip_THWC) in enumerate(zip(specs, clips, strict=True)):
                write_video(root / "video" / name / f"{n}.mp4", clip_THWC, fps)
                _write_text(root / "caption" / name / f"{n}.json", json.dumps({"caption": spec.caption}))
        else:
            video = f"videos/{name}.mp4"
            write_video(root / video, np.concatenate(clips), fps)
            shots = [{"start": n * frames / fps, "end": (n + 1) * frames / fps, "caption": spec.caption}
                     for n, spec in enumerate(specs)]
            manifest_lines.append(json.dumps({"video": video, "caption": specs[0].caption, "shots": shots}))
    if layout == "official":
        return root
    manifest = root / "manifest.jsonl"
    _write_text(manifest, "\n".join(manifest_lines) + "\n")
    return manifest
