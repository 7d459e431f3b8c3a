"""The shapes world: a coloured shape moving over a plain background, with a caption that says so.

A clip shows one `ClipSpec` (shape, colour, background, direction); its caption follows the grammar
"a|an COLOUR SHAPE moves DIRECTION on a|an BACKGROUND background" (`ClipSpec.caption`,
`parse_caption`). The shape's side is a quarter of the frame's short side; it moves at a constant
speed of 1/64 of the frame per frame (2 px at 128x128) and wraps around at the edge (the frame is a
torus along the motion), so a clip can be any length. Edges are anti-aliased by pixel coverage.

Combinations: 8 colours x 7 other backgrounds x 3 shapes x 4 directions = 672. A fixed set of them
(`is_held_out`, one in eight) never appears in training data; every single attribute value and every
pair of values still does, so held-out clips test composition, not new words.

Samples for training are several clips back to back (shots); consecutive clips always differ in
background, so every scene cut is visible in every pixel. `core.train.data` puts the official
scene-cut prefix on the first chunk of each new clip.

Layouts written by `make_synthetic_dataset`:
  official  root/video/<sample>/<n>.mp4 + root/caption/<sample>/<n>.json ({"caption": ...})
  manifest  root/videos/<sample>.mp4 (the clips of a sample back to back) + root/manifest.jsonl with
            one line per sample: {"video", "caption", "shots": [{"start", "end", "caption"}]}

Shape legend: T frames, H height, W width, C = 3 colour channels (uint8 RGB).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from core.checkpoint import atomic_write
from core.config import VIDEO_FPS
from core.decode import VideoWriter
from core.shots import SCENE_CUT_PREFIX

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
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")
LAYOUTS = ("official", "manifest")
SPLITS = ("train", "held_out", "all")
Split = Literal["train", "held_out", "all"]

DEMO_SIZE = 128  # demo resolution (square), pixels
SHAPE_FRACTION = 0.25  # the shape's side / diameter, as a fraction of the frame's short side
FRAMES_PER_CROSSING = 64  # frames the shape takes to travel once across the frame
HELD_OUT_EVERY = 8  # one combination in eight is held out of training


@dataclass(frozen=True)
class ClipSpec:
    """What one clip shows."""

    shape: str
    colour: str
    background: str
    direction: str

    def __post_init__(self) -> None:
        for name, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                     ("background", self.background, COLOURS),
                                     ("direction", self.direction, DIRECTIONS)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not in the shapes world (allowed: {', '.join(allowed)})")

    @property
    def caption(self) -> str:
        return (f"{_article(self.colour)} {self.colour} {self.shape} moves {self.direction} "
                f"on {_article(self.background)} {self.background} background")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_WORD = "|".join
_CAPTION = re.compile(
    rf"^(?:a|an) (?P<colour>{_WORD(COLOURS)}) (?P<shape>{_WORD(SHAPES)}) moves (?P<direction>{_WORD(DIRECTIONS)}) "
    rf"on (?:a|an) (?P<background>{_WORD(COLOURS)}) background\.?$")


def parse_caption(text: str) -> ClipSpec:
    """The spec a caption describes (a leading scene-cut prefix is ignored); ValueError if the text
    does not follow the shapes-world grammar."""
    body = text.strip()
    if body.startswith(SCENE_CUT_PREFIX.strip()):
        body = body[len(SCENE_CUT_PREFIX.strip()):].strip()
    match = _CAPTION.match(body.lower())
    if match is None:
        raise ValueError(f"{text!r} is not a shapes-world caption (expected "
                         f"'a|an COLOUR SHAPE moves DIRECTION on a|an BACKGROUND background')")
    return ClipSpec(match["shape"], match["colour"], match["background"], match["direction"])


# ----------------------------------------------------------------------------------------------
# Combinations and the held-out split.


def is_held_out(spec: ClipSpec) -> bool:
    """Whether a combination is kept out of training (a fixed rule on the attribute indices)."""
    names = list(COLOURS)
    key = (names.index(spec.colour) + 3 * names.index(spec.background) + 5 * SHAPES.index(spec.shape)
           + 7 * DIRECTIONS.index(spec.direction))
    return key % HELD_OUT_EVERY == 0


def all_specs(split: Split = "all") -> list[ClipSpec]:
    """Every combination (shape colour differs from the background) of a split, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    return list(_specs(split))


@functools.cache
def _specs(split: Split) -> tuple[ClipSpec, ...]:  # built once: random_clip_spec draws from it per shot
    specs = [ClipSpec(shape, colour, background, direction)
             for colour, background, shape, direction in itertools.product(COLOURS, COLOURS, SHAPES, DIRECTIONS)
             if colour != background]
    if split == "all":
        return tuple(specs)
    return tuple(s for s in specs if is_held_out(s) == (split == "held_out"))


def random_clip_spec(rng: np.random.Generator, previous: ClipSpec | None = None,
                     split: Split = "train") -> ClipSpec:
    """A spec of `split` whose background differs from `previous`'s, so a cut shows in every pixel."""
    specs = [s for s in all_specs(split) if previous is None or s.background != previous.background]
    return specs[int(rng.integers(len(specs)))]


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of the evaluation set and whether its combination was seen in training."""

    spec: ClipSpec
    split: Literal["seen", "held_out"]

    @property
    def caption(self) -> str:
        return self.spec.caption


def evaluation_prompts(per_split: int = 24, seed: int = 0) -> list[EvalPrompt]:
    """A fixed prompt set: `per_split` seen and `per_split` held-out combinations (48 by default).

    Within each split the shape and direction cycle through all 12 pairs, and colours and
    backgrounds are picked (seeded) among the least used so far, so every value appears about
    equally often."""
    out: list[EvalPrompt] = []
    for split, pool_split in (("seen", "train"), ("held_out", "held_out")):
        rng = np.random.default_rng([seed, len(out)])
        pool = all_specs(pool_split)
        as_colour: dict[str, int] = dict.fromkeys(COLOURS, 0)
        as_background: dict[str, int] = dict.fromkeys(COLOURS, 0)
        chosen: list[ClipSpec] = []
        for i in range(per_split):
            shape, direction = SHAPES[i % len(SHAPES)], DIRECTIONS[(i // len(SHAPES)) % len(DIRECTIONS)]
            candidates = [s for s in pool if (s.shape, s.direction) == (shape, direction) and s not in chosen]
            if not candidates:
                candidates = [s for s in pool if s not in chosen]
            if not candidates:
                raise ValueError(f"per_split {per_split} is more than the {len(pool)} {split} combinations")
            uses = [as_colour[s.colour] + as_background[s.background] for s in candidates]
            fewest = [s for s, n in zip(candidates, uses, strict=True) if n == min(uses)]
            spec = fewest[int(rng.integers(len(fewest)))]
            as_colour[spec.colour] += 1
            as_background[spec.background] += 1
            chosen.append(spec)
        out += [EvalPrompt(spec, split) for spec in chosen]
    return out


# ----------------------------------------------------------------------------------------------
# Rendering.


def shape_size(height: int, width: int) -> float:
    """The shape's side / diameter in pixels."""
    return max(2.0, SHAPE_FRACTION * min(height, width))


def _array_module(x):
    """numpy, or torch for tensors: the rendering formulas below run on both (the same float64
    arithmetic; `core.train.shapes_stream` renders batches on the training device with them)."""
    return torch if isinstance(x, torch.Tensor) else np


def shape_coverage(shape: str, xs, ys, cx, cy, size: float):
    """Fraction of each pixel `[y, y+1) x [x, x+1)` inside the shape centred at (cx, cy): exact for the
    square, a one-pixel ramp across the edge for the circle and the triangle. numpy arrays or tensors
    (broadcast: centres may be arrays of frames)."""
    xp = _array_module(xs)
    half = size / 2
    if shape == "square":
        cover_x = xp.clip(xp.minimum(xs + 1, cx + half) - xp.maximum(xs, cx - half), 0, 1)
        cover_y = xp.clip(xp.minimum(ys + 1, cy + half) - xp.maximum(ys, cy - half), 0, 1)
        return cover_x * cover_y
    px, py = xs + 0.5 - cx, ys + 0.5 - cy  # pixel centres relative to the shape centre
    if shape == "circle":
        return xp.clip(half - xp.hypot(px, py) + 0.5, 0, 1)
    # Triangle pointing up, base = height = size: signed distance inside each of the three edges.
    slope_norm = float(np.hypot(2.0, 1.0))
    inside = xp.minimum(half - py, xp.minimum((2 * px + py + half) / slope_norm, (-2 * px + py + half) / slope_norm))
    return xp.clip(inside + 0.5, 0, 1)


def is_horizontal(direction: str) -> bool:
    return direction in ("left to right", "right to left")


def shape_centre(direction: str, frame, height: int, width: int, phase=0.125, offset: float = 0.5):
    """Centre (x, y) in pixels at `frame`: `phase` is the fraction of the way across at frame 0,
    `offset` the position across the motion (fraction); wraps around (modulo the frame). `frame`
    (and `phase`) may be numpy arrays or float64 tensors of frames."""
    xp = _array_module(frame)
    frame = frame if xp is not np else np.asarray(frame, dtype=np.float64)
    travel = (phase + frame / FRAMES_PER_CROSSING) % 1.0
    if is_horizontal(direction):
        along = travel if direction == "left to right" else 1.0 - travel
        return along * width, xp.full_like(along, offset * height)
    along = travel if direction == "top to bottom" else 1.0 - travel
    return xp.full_like(along, offset * width), along * height


def render_clip(spec: ClipSpec, frames: int, height: int, width: int, *, phase: float = 0.125,
                offset: float = 0.5) -> np.ndarray:
    """uint8 `[T, H, W, C]`: the shape moves at constant speed and wraps around at the edge."""
    size = shape_size(height, width)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    background = np.array(COLOURS[spec.background], dtype=np.float64)
    colour = np.array(COLOURS[spec.colour], dtype=np.float64)
    centres_x, centres_y = shape_centre(spec.direction, np.arange(frames), height, width, phase, offset)
    horizontal = is_horizontal(spec.direction)
    video_THWC = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        cover = np.zeros((height, width))
        for wrap in (-1, 0, 1):  # the copies one frame-width away draw the part that wrapped around
            cx = centres_x[t] + (wrap * width if horizontal else 0)
            cy = centres_y[t] + (0 if horizontal else wrap * height)
            cover = np.maximum(cover, shape_coverage(spec.shape, xs, ys, cx, cy, size))
        pixels = background + cover[..., None] * (colour - background)
        video_THWC[t] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return video_THWC


def random_shots(rng: np.random.Generator, shots: int, split: Split = "train") -> list[tuple[ClipSpec, float]]:
    """`shots` (spec, phase) pairs, each background differing from the one before."""
    out: list[tuple[ClipSpec, float]] = []
    for _ in range(shots):
        spec = random_clip_spec(rng, out[-1][0] if out else None, split)
        out.append((spec, float(rng.random())))
    return out


def render_training_clip(rng: np.random.Generator, frames: int, world_size: int = DEMO_SIZE, crop: int | None = None,
                          split: Split = "train", cut_probability: float = 0.0,
                          latent_stride: int = 4) -> tuple[np.ndarray, list[ClipSpec]]:
    """One clip for autoencoder training: uint8 `[T, crop, crop, C]` cut from the world rendered at
    `world_size` (same shape size and speed as the demo), and the specs it shows.

    With probability `cut_probability` a second shot starts at a latent-frame boundary (frame
    1 + 4k, where the generator's chunks start). Most crops (3 in 4) hold the shape's centre."""
    crop = crop or world_size
    if not 0 < crop <= world_size:
        raise ValueError(f"crop {crop} must be in (0, world_size={world_size}]")
    latents = (frames - 1) // latent_stride
    with_cut = latents > 1 and rng.random() < cut_probability
    cut = 1 + latent_stride * int(rng.integers(1, latents)) if with_cut else frames
    shots = random_shots(rng, 2 if cut < frames else 1, split)
    offsets = rng.uniform(0.2, 0.8, size=len(shots))  # across the motion: more places than the demo's centre
    video_THWC = np.concatenate([
        render_clip(spec, n, world_size, world_size, phase=phase, offset=float(offset))
        for (spec, phase), offset, n in zip(shots, offsets, (cut, frames - cut)[:len(shots)], strict=True)])
    if rng.random() < 0.75:  # around the first shot's shape
        spec, phase = shots[0]
        cx, cy = shape_centre(spec.direction, 0, world_size, world_size, phase, float(offsets[0]))
        x0 = int(np.clip(float(cx) - rng.uniform(0, crop), 0, world_size - crop))
        y0 = int(np.clip(float(cy) - rng.uniform(0, crop), 0, world_size - crop))
    else:
        x0, y0 = (int(v) for v in rng.integers(0, world_size - crop + 1, size=2))
    return video_THWC[:, y0:y0 + crop, x0:x0 + crop], [spec for spec, _ in shots]


def write_video(path: str | os.PathLike, frames_THWC: np.ndarray, fps: int = VIDEO_FPS) -> Path:
    """Write uint8 RGB frames as an H.264 mp4 (near-lossless, fast preset); atomic."""
    path = Path(path)
    height, width = frames_THWC.shape[1:3]
    with VideoWriter(path, width, height, fps=fps, crf=10, preset="ultrafast") as writer:
        writer.write(frames_THWC)
    return path


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def _write_sample(root: Path, sample: int, clips_per_sample: int, frames: int, height: int, width: int, fps: int,
                  seed: int, layout: str, split: Split) -> str | None:
    """Render and write one sample; its manifest line (manifest layout) or None."""
    name = f"sample_{sample:03d}"
    shots = random_shots(np.random.default_rng([seed, sample]), clips_per_sample, split)
    clips = [render_clip(spec, frames, height, width, phase=phase) for spec, phase in shots]
    specs = [spec for spec, _ in shots]
    if layout == "official":
        for n, (spec, clip_THWC) in enumerate(zip(specs, clips, strict=True)):
            write_video(root / "video" / name / f"{n}.mp4", clip_THWC, fps)
            _write_text(root / "caption" / name / f"{n}.json", json.dumps({"caption": spec.caption}))
        return None
    video = f"videos/{name}.mp4"
    write_video(root / video, np.concatenate(clips), fps)
    shots_json = [{"start": n * frames / fps, "end": (n + 1) * frames / fps, "caption": spec.caption}
                  for n, spec in enumerate(specs)]
    return json.dumps({"video": video, "caption": specs[0].caption, "shots": shots_json})


def make_synthetic_dataset(root: str | os.PathLike, samples: int = 4, clips_per_sample: int = 2, frames: int = 48,
                           height: int = 64, width: int = 64, fps: int = VIDEO_FPS, seed: int = 0,
                           layout: str = "official", split: Split = "train", workers: int = 1) -> Path:
    """Write `samples` samples of `clips_per_sample` clips of `frames` frames each, drawn from `split`
    (each clip starts at a random point of its motion; `workers` processes write samples in parallel,
    the output does not depend on their number).

    Returns what `VideoClipDataset` takes: `root` for the official layout, the manifest file for the
    manifest layout. Height and width must be even (H.264 with yuv420p)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if height % 2 or width % 2:
        raise ValueError(f"height and width must be even for H.264 (got {height}x{width})")
    root = Path(root)
    write = functools.partial(_write_sample, root, clips_per_sample=clips_per_sample, frames=frames, height=height,
                              width=width, fps=fps, seed=seed, layout=layout, split=split)
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        # spawn: the caller may hold torch threads that a forked child must not inherit
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            manifest_lines = list(pool.map(write, range(samples), chunksize=max(1, samples // (4 * workers))))
    else:
        manifest_lines = [write(sample) for sample in range(samples)]
    if layout == "official":
        return root
    manifest = root / "manifest.jsonl"
    _write_text(manifest, "\n".join(manifest_lines) + "\n")
    return manifest
