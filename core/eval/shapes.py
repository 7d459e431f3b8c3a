"""The offline shapes-world probe: does a video show what its prompt schedule asks for?

For every frame the probe reads, with no model and no download (`read_frame`):
  background  the palette colour (`core.train.synthetic.COLOURS`) covering at least half the frame
  colour      the palette colour whose blends with the background explain the shape's pixels (a
              blurred edge lies on the segment background -> colour)
  shape       the world's shape (drawn at its known size, blurred as the frame is) that overlaps the
              mask of shape pixels best, placed on the mask's centroid (IoU >= MIN_SHAPE_IOU)
  position    the shape's centroid; the frame is a torus (shapes wrap around at the edge)
A frame of noise, or one with no clear background or shape, reads `None` for what is missing.
Every frame is first smoothed by a 3x3 mean, which keeps the readings stable under pixel noise.

Per shot of the schedule (`probe_video`): the reading of each attribute over the shot's frames (the
most frequent one; the direction from the mean frame-to-frame motion of the centre) and whether it
is the prompt's, the fraction of frames read right, identity kept (the fraction of consecutive frame
pairs whose colour and shape readings agree), and for a shot that starts with a scene cut or an
interactive prompt switch the frames until background, colour and shape all hold the new prompt's
values (for `OBEY_HOLD_FRAMES` frames in a row).

`evaluate_videos(videos, schedules)` gives a JSON-ready report (`write_report` writes it and its
Markdown table, `markdown_table`), with accuracies split into combinations seen in training and
held out of it (`core.train.synthetic.is_held_out`).

Legend: T frames, H height, W width, C = 3 colour channels; pixel values 0..255.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.checkpoint import atomic_write
from core.shots import PromptSchedule, Shot
from core.train.synthetic import (
    COLOURS,
    SHAPES,
    evaluation_prompts,
    is_held_out,
    parse_caption,
    random_shots,
    shape_coverage,
    shape_size,
)

ATTRIBUTES = ("background", "colour", "shape", "direction")
PALETTE_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[n] for n in PALETTE_NAMES], dtype=np.float32)  # [8, 3]

COLOUR_TOLERANCE = 60.0  # RGB distance within which a pixel / median counts as a palette colour
BACKGROUND_MIN_FRACTION = 0.5  # the background covers at least this much of a frame
SHAPE_MIN_CONTRAST = 40.0  # RGB distance from the background that marks a shape pixel
MIN_SHAPE_IOU = 0.6  # overlap with the best-matching template for a shape to count as one
MIN_SPEED = 0.3  # pixels per frame of centre motion that count as moving (the world moves 2 at 128)
OBEY_HOLD_FRAMES = 4


@dataclass(frozen=True)
class FrameReading:
    """What one frame shows (None: not readable)."""

    background: str | None
    colour: str | None
    shape: str | None
    centre: tuple[float, float] | None  # (x, y) in pixels


@dataclass(frozen=True)
class ProbeShot:
    """A shot to check: frames `[start, end)` should show `prompt`; `transition` is how it starts."""

    prompt: str
    start: int
    end: int
    transition: str = "first"  # first | cut | continue


# ----------------------------------------------------------------------------------------------
# One frame.


def _box_blur(image: np.ndarray) -> np.ndarray:
    """3x3 mean with wrap-around (the world is a torus): tames pixel noise before thresholds."""
    out = np.zeros_like(image)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out += np.roll(image, (dy, dx), axis=(0, 1))
    return out / 9.0


def _shape_colour(offsets_NC: np.ndarray, background_C: np.ndarray, exclude: int) -> str | None:
    """The palette colour whose blends with the background explain the shape's pixels best.

    A pixel of a shape drawn (or blurred) over the background lies on the segment from the
    background to the shape's colour; each candidate colour is scored by the median distance of the
    pixels (`offsets` = pixel - background) from its segment. It must also be reached: 75 % of the
    way or more by a tenth of the pixels (a blurred small shape never gets all the way). None when
    no colour fits within COLOUR_TOLERANCE / 2."""
    best, best_score = None, COLOUR_TOLERANCE / 2
    for index, colour in enumerate(PALETTE):
        if index == exclude:
            continue
        direction = colour - background_C
        along = np.clip(offsets_NC @ direction / float(direction @ direction), 0.0, 1.0)
        score = float(np.median(np.linalg.norm(offsets_NC - along[:, None] * direction, axis=1)))
        if score <= best_score and np.quantile(along, 0.9) >= 0.75:
            best, best_score = PALETTE_NAMES[index], score
    return best


def _background(pixels_NC: np.ndarray) -> int | None:
    """Index of the palette colour that at least half the pixels are close to, or None."""
    squared = (pixels_NC**2).sum(1, keepdims=True) - 2 * pixels_NC @ PALETTE.T + (PALETTE**2).sum(1)  # [N, 8]
    nearest = squared.argmin(axis=1)
    close = squared.min(axis=1) <= COLOUR_TOLERANCE**2
    counts = np.bincount(nearest[close], minlength=len(PALETTE))
    best = int(counts.argmax())
    return best if counts[best] >= BACKGROUND_MIN_FRACTION * len(pixels_NC) else None


def _unwrap_shift(occupied: np.ndarray) -> int:
    """The shift that puts the longest circular run of empty lines at the end (a shape split by the
    edge becomes contiguous)."""
    n = len(occupied)
    best_len, best_end, run = 0, 0, 0
    for i, filled in enumerate(np.concatenate([occupied, occupied])):
        run = 0 if filled else run + 1
        if min(run, n) > best_len:
            best_len, best_end = min(run, n), (i + 1) % n
    return best_end


@functools.lru_cache(maxsize=8)
def _templates(height: int, width: int) -> dict[str, tuple[np.ndarray, float]]:
    """Each shape drawn at the frame centre, blurred and thresholded as `read_frame` sees it, with its
    centroid's vertical offset from the drawing centre (the triangle's centroid is lower)."""
    side = shape_size(height, width)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    out = {}
    for kind in SHAPES:
        mask = _box_blur(shape_coverage(kind, xs, ys, width / 2, height / 2, side)) > 0.5
        out[kind] = (mask, float(np.nonzero(mask)[0].mean() + 0.5 - height / 2))
    return out


def _shape_kind(mask_HW: np.ndarray) -> tuple[str | None, tuple[float, float] | None]:
    """(kind, centroid) of the masked shape: the world's shape that overlaps it best (IoU at least
    MIN_SHAPE_IOU, each template placed on the mask's centroid), or (None, None)."""
    H, W = mask_HW.shape
    if not mask_HW.any() or mask_HW.all(axis=0).any() or mask_HW.all(axis=1).any():
        return None, None
    shift_y, shift_x = _unwrap_shift(mask_HW.any(axis=1)), _unwrap_shift(mask_HW.any(axis=0))
    ys, xs = np.nonzero(np.roll(mask_HW, (-shift_y, -shift_x), axis=(0, 1)))
    centroid = ((xs.mean() + 0.5 + shift_x) % W, (ys.mean() + 0.5 + shift_y) % H)
    best, best_iou = None, MIN_SHAPE_IOU
    for kind, (template, drop) in _templates(H, W).items():
        # Move the template's drawing centre onto the mask's centroid (less the centroid's offset).
        placed = np.roll(template, (round(centroid[1] - drop - H / 2), round(centroid[0] - W / 2)), axis=(0, 1))
        iou = np.logical_and(placed, mask_HW).sum() / np.logical_or(placed, mask_HW).sum()
        if iou >= best_iou:
            best, best_iou = kind, iou
    return (best, (float(centroid[0]), float(centroid[1]))) if best is not None else (None, None)


def read_frame(frame_HWC: np.ndarray) -> FrameReading:
    """Background, shape colour, shape kind and centre of one RGB frame (uint8, or float 0..255)."""
    frame = _box_blur(np.asarray(frame_HWC, dtype=np.float32))
    pixels = frame.reshape(-1, 3)
    background = _background(pixels)
    if background is None:
        return FrameReading(None, None, None, None)
    near_bg = np.linalg.norm(pixels - PALETTE[background], axis=1) <= COLOUR_TOLERANCE
    bg_colour = np.median(pixels[near_bg], axis=0)
    differs = np.linalg.norm(pixels - bg_colour, axis=1) > SHAPE_MIN_CONTRAST
    if not differs.any():
        return FrameReading(PALETTE_NAMES[background], None, None, None)
    # The mask: pixels at least half way from the background to the shape's inner colour (the
    # median of those 3/4 of the way to the median of everything that differs): the shape at its
    # true size even with blurred edges.
    rough = np.median(pixels[differs], axis=0) - bg_colour
    toward = ((pixels - bg_colour) @ rough) / max(float(rough @ rough), 1e-6)
    inner = toward >= 0.75
    shape_colour = np.median(pixels[inner], axis=0) if inner.any() else rough + bg_colour
    span = shape_colour - bg_colour
    toward = ((frame - bg_colour) @ span) / max(float(span @ span), 1e-6)
    kind, centre = _shape_kind(toward > 0.5)
    if kind is None:
        return FrameReading(PALETTE_NAMES[background], None, None, None)
    colour = _shape_colour(pixels[differs] - bg_colour, bg_colour, exclude=background)
    return FrameReading(PALETTE_NAMES[background], colour, kind, centre)


def step_direction(previous: tuple[float, float] | None, current: tuple[float, float] | None,
                   height: int, width: int) -> str | None:
    """The direction of one frame-to-frame move of the centre (wrapping at the edges), None if still
    or unknown."""
    if previous is None or current is None:
        return None
    return _direction_of(_wrapped(current[0] - previous[0], width), _wrapped(current[1] - previous[1], height))


def _wrapped(delta: float, size: int) -> float:
    return (delta + size / 2) % size - size / 2


def _direction_of(dx: float, dy: float) -> str | None:
    if max(abs(dx), abs(dy)) < MIN_SPEED:
        return None
    if abs(dx) >= abs(dy):
        return "left to right" if dx > 0 else "right to left"
    return "top to bottom" if dy > 0 else "bottom to top"


# ----------------------------------------------------------------------------------------------
# Shots and videos.


def shots_from_schedule(schedule: PromptSchedule | str, num_frames: int) -> list[ProbeShot]:
    """The probe's shots of a prompt schedule (a plain prompt: one shot over the whole video)."""
    if isinstance(schedule, str):
        return [ProbeShot(schedule, 0, num_frames)]
    shots = []
    for span in schedule.spans:
        transition = "first" if span.index == 0 else ("cut" if span.scene_cut else "continue")
        shots.append(ProbeShot(span.prompt, span.start_frame, span.start_frame + span.num_frames, transition))
    return shots


def evaluation_schedules(count: int = 8, shots: int = 3, chunks_per_shot: int = 2, transition: str = "cut",
                         frames_per_block: int = 8, seed: int = 0) -> list[PromptSchedule]:
    """Fixed multi-shot schedules of seen combinations: `shots` shots of `chunks_per_shot` chunks,
    each starting with `transition` (cut: scene cuts; continue: interactive prompt switches), every
    shot on another background than the one before."""
    out = []
    for index in range(count):
        specs = random_shots(np.random.default_rng([seed, index]), shots, "train")
        out.append(PromptSchedule(tuple(Shot(spec.caption, chunks_per_shot, transition) for spec, _ in specs),
                                  frames_per_block, source=f"shapes-eval-{transition}-{index}"))
    return out


def _most_common(values: Sequence[str | None]) -> str | None:
    counted = Counter(v for v in values if v is not None)
    return counted.most_common(1)[0][0] if counted else None


def _frames_to_obey(readings: Sequence[FrameReading], expected: dict[str, str]) -> int | None:
    """Frames from the shot start until background, colour and shape hold `expected` for
    `OBEY_HOLD_FRAMES` frames in a row (fewer if the shot is shorter); None if they never do."""
    hold = min(OBEY_HOLD_FRAMES, len(readings))
    run = 0
    for i, r in enumerate(readings):
        ok = (r.background, r.colour, r.shape) == (expected["background"], expected["colour"], expected["shape"])
        run = run + 1 if ok else 0
        if run == hold:
            return i + 1 - hold
    return None


def probe_shot(readings: Sequence[FrameReading], shot: ProbeShot, height: int, width: int) -> dict[str, Any]:
    """The probe's verdict on one shot from its frames' readings (see the module doc)."""
    spec = parse_caption(shot.prompt)
    expected = {"background": spec.background, "colour": spec.colour, "shape": spec.shape,
                "direction": spec.direction}
    steps = [step_direction(a.centre, b.centre, height, width) for a, b in zip(readings, readings[1:], strict=False)]
    per_frame = {"background": [r.background for r in readings], "colour": [r.colour for r in readings],
                 "shape": [r.shape for r in readings], "direction": steps}
    moves = [(_wrapped(b.centre[0] - a.centre[0], width), _wrapped(b.centre[1] - a.centre[1], height))
             for a, b in zip(readings, readings[1:], strict=False) if a.centre is not None and b.centre is not None]
    read = {name: _most_common(values) for name, values in per_frame.items()}
    read["direction"] = _direction_of(*np.mean(moves, axis=0)) if moves else None
    rates = {name: (sum(v == expected[name] for v in values) / len(values) if values else 0.0)
             for name, values in per_frame.items()}
    pairs = list(zip(readings, readings[1:], strict=False))
    kept = [a.colour is not None and a.shape is not None and (a.colour, a.shape) == (b.colour, b.shape)
            for a, b in pairs]
    return {
        "prompt": shot.prompt, "split": "held_out" if is_held_out(spec) else "seen",
        "start": shot.start, "end": shot.end, "transition": shot.transition,
        "expected": expected, "read": read,
        "correct": {name: read[name] == expected[name] for name in ATTRIBUTES},
        "frame_rates": rates,
        "identity_kept": sum(kept) / len(kept) if kept else 0.0,
        "frames_to_obey": _frames_to_obey(readings, expected) if shot.transition != "first" else None,
    }


def probe_video(frames_THWC: np.ndarray, shots: Sequence[ProbeShot] | PromptSchedule | str) -> list[dict[str, Any]]:
    """Per-shot verdicts of one video (`[T, H, W, 3]` RGB) against its schedule."""
    frames_THWC = np.asarray(frames_THWC)
    if frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] RGB (got shape {frames_THWC.shape})")
    T, H, W = frames_THWC.shape[:3]
    if not isinstance(shots, Sequence) or isinstance(shots, str):
        shots = shots_from_schedule(shots, T)
    for shot in shots:
        if not 0 <= shot.start < shot.end <= T:
            raise ValueError(f"shot {shot.prompt[:40]!r} covers frames [{shot.start}, {shot.end}) but the "
                             f"video has {T}: give the schedule the video was generated with")
        parse_caption(shot.prompt)  # a prompt outside the grammar fails before any work
    readings = [read_frame(frame) for frame in frames_THWC]
    return [probe_shot(readings[s.start:s.end], s, H, W) for s in shots]


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Every frame of a video file as uint8 `[T, H, W, 3]` RGB."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# ----------------------------------------------------------------------------------------------
# Reports.


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _summary(shots: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "shots": len(shots),
        "accuracy": {name: _mean([s["correct"][name] for s in shots]) for name in ATTRIBUTES},
        "frame_rates": {name: _mean([s["frame_rates"][name] for s in shots]) for name in ATTRIBUTES},
        "identity_kept": _mean([s["identity_kept"] for s in shots]),
    }


def _obedience(shots: Sequence[dict[str, Any]], transition: str) -> dict[str, Any]:
    chosen = [s for s in shots if s["transition"] == transition]
    frames = [s["frames_to_obey"] for s in chosen if s["frames_to_obey"] is not None]
    return {"count": len(chosen), "obeyed": len(frames), "mean_frames": _mean(frames),
            "max_frames": max(frames) if frames else None}


def _probe_one(video: np.ndarray | str | os.PathLike,
               schedule: PromptSchedule | Sequence[ProbeShot] | str) -> tuple[int, list[dict[str, Any]]]:
    frames = read_video(video) if isinstance(video, (str, os.PathLike)) else np.asarray(video)
    return int(frames.shape[0]), probe_video(frames, schedule)


def evaluate_videos(videos: Sequence[np.ndarray | str | os.PathLike],
                    schedules: Sequence[PromptSchedule | Sequence[ProbeShot] | str],
                    names: Sequence[str] | None = None, workers: int = 1) -> dict[str, Any]:
    """Probe videos (frame arrays or video files) against their schedules (`workers` processes in
    parallel); a JSON-ready report:
    `{videos: {name: {num_frames, shots: [...]}}, summary: {all, seen, held_out, cuts, switches}}`."""
    if len(videos) != len(schedules):
        raise ValueError(f"{len(videos)} videos but {len(schedules)} schedules: give one schedule per video")
    names = list(names) if names is not None else [
        Path(v).stem if isinstance(v, (str, os.PathLike)) else f"video_{i:03d}" for i, v in enumerate(videos)]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_probe_one, videos, schedules))
    else:
        results = [_probe_one(v, s) for v, s in zip(videos, schedules, strict=True)]
    report: dict[str, Any] = {"videos": {}}
    every: list[dict[str, Any]] = []
    for name, (num_frames, shots) in zip(names, results, strict=True):
        report["videos"][name] = {"num_frames": num_frames, "shots": shots}
        every += shots
    report["summary"] = {
        "all": _summary(every),
        "seen": _summary([s for s in every if s["split"] == "seen"]),
        "held_out": _summary([s for s in every if s["split"] == "held_out"]),
        "cuts": _obedience(every, "cut"),
        "switches": _obedience(every, "continue"),
    }
    return report


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The report's summary as Markdown: accuracy per attribute (shots whose reading is right, %),
    frame rates in brackets, per split; then the cuts' and switches' obedience."""
    lines = ["| split | shots | background | colour | shape | direction | identity kept |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for split in ("seen", "held_out", "all"):
        s = report["summary"][split]
        cells = [f"{_percent(s['accuracy'][a])} ({_percent(s['frame_rates'][a])})" for a in ATTRIBUTES]
        lines.append(f"| {split} | {s['shots']} | " + " | ".join(cells) + f" | {_percent(s['identity_kept'])} |")
    lines += ["", "| change | count | obeyed | mean frames to obey | max frames |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for key, label in (("cuts", "scene cut"), ("switches", "prompt switch")):
        o = report["summary"][key]
        mean = "-" if o["mean_frames"] is None else f"{o['mean_frames']:.1f}"
        worst = "-" if o["max_frames"] is None else o["max_frames"]
        lines.append(f"| {label} | {o['count']} | {o['obeyed']} | {mean} | {worst} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], json_path: str | os.PathLike,
                 markdown_path: str | os.PathLike | None = None) -> None:
    """Write the report as JSON (and its Markdown table), atomically."""
    text = json.dumps(report, indent=1)
    atomic_write(Path(json_path), lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    if markdown_path is not None:
        table = markdown_table(report)
        atomic_write(Path(markdown_path), lambda temp: Path(temp).write_text(table, encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# The `longlive eval-vbench --suite shapes` suite: generate the fixed prompt set, probe, report.

SUITE_PARTS = ("prompts", "multishot", "interactive", "long")
DEFAULT_SECONDS = 4.0  # the videos; shots of the multi-shot lists are half as long
LONG_FACTOR = 15  # the long videos are this many times --seconds (60 s at the default)
LONG_WINDOW_FRAMES = 240  # 10 s probed at the start and at the end of a long video
FULL_COUNTS = {"prompts": 48, "multishot": 8, "interactive": 8, "long": 4}


@dataclass(frozen=True)
class PlannedVideo:
    part: str
    name: str
    video: Any  # core.eval.suites.SuiteVideo
    probe: Any  # what `probe_video` checks it against: its schedule, or the long video's two windows


def balanced_prompts() -> list[str]:
    """The 48 evaluation prompts alternating seen / held out, so any first N are balanced."""
    prompts = evaluation_prompts()
    seen = [p.caption for p in prompts if p.split == "seen"]
    held = [p.caption for p in prompts if p.split != "seen"]
    return [caption for pair in zip(seen, held, strict=True) for caption in pair]


def suite_parts(names: Sequence[str] | None) -> tuple[str, ...]:
    """--dimensions of the shapes suite (default: every part); a UserError names the choices."""
    from core.errors import UserError

    if names is None:
        return SUITE_PARTS
    unknown = [n for n in names if n not in SUITE_PARTS]
    if unknown or not names:
        raise UserError(f"--dimensions {unknown[0] if unknown else '(empty)'!r} is not a part of the shapes suite: "
                        f"choose from {', '.join(SUITE_PARTS)}")
    return tuple(dict.fromkeys(names))


def plan_suite(parts: Sequence[str], frames_per_block: int, folder: Path, seconds: float, seed: int,
               max_prompts: int | None) -> list[PlannedVideo]:
    """Every video of the chosen parts (fixed prompts, schedules and seeds)."""
    from core.eval.suites import SuiteVideo
    from core.shots import durations_to_chunks, single_prompt_schedule

    chunks = durations_to_chunks([round(seconds * 24)], frames_per_block)[0]
    prompts = balanced_prompts()
    planned: list[PlannedVideo] = []
    for part in parts:
        count = min(FULL_COUNTS[part], max_prompts or FULL_COUNTS[part])
        if part == "prompts":
            schedules = [single_prompt_schedule(p, chunks, frames_per_block) for p in prompts[:count]]
        elif part == "long":
            long_chunks = durations_to_chunks([round(LONG_FACTOR * seconds * 24)], frames_per_block)[0]
            schedules = [single_prompt_schedule(p, long_chunks, frames_per_block) for p in prompts[:count]]
        else:
            schedules = evaluation_schedules(count, chunks_per_shot=max(1, (chunks + 1) // 2),
                                             transition="cut" if part == "multishot" else "continue",
                                             frames_per_block=frames_per_block)
        for index, schedule in enumerate(schedules):
            name = f"{part}-{index:03d}"
            video = SuiteVideo(schedule, seed + index, folder / f"{name}.mp4", interactive=part == "interactive")
            planned.append(PlannedVideo(part, name, video, _long_windows(schedule) if part == "long" else schedule))
    return planned


def _long_windows(schedule: PromptSchedule) -> list[ProbeShot]:
    """The first and the last LONG_WINDOW_FRAMES (at most a quarter of the video each)."""
    total = schedule.num_video_frames
    window = min(LONG_WINDOW_FRAMES, total // 4)
    prompt = schedule.shots[0].prompt
    return [ProbeShot(prompt, 0, window), ProbeShot(prompt, total - window, total)]


def long_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Per attribute, the frame rates of the long videos' first and last windows and the change."""
    firsts = [v["shots"][0]["frame_rates"] for v in report["videos"].values()]
    lasts = [v["shots"][-1]["frame_rates"] for v in report["videos"].values()]
    out = {}
    for name in ATTRIBUTES:
        first, last = _mean([r[name] for r in firsts]), _mean([r[name] for r in lasts])
        out[name] = {"first": first, "last": last, "change": None if first is None else last - first}
    return out


def suite_markdown(results: dict[str, Any]) -> str:
    """The suite's report as Markdown: one table per part (see `markdown_table`)."""
    lines = [f"# shapes suite ({results['settings']['preset']}, {results['settings']['steps']} steps)", ""]
    for part, report in results["parts"].items():
        lines += [f"## {part}: {len(report['videos'])} videos", "", markdown_table(report)]
    if "long" in results:
        lines += ["## long videos, first vs last window (frame rates, %)", "",
                  "| attribute | first | last | change |", "| --- | ---: | ---: | ---: |"]
        for name, entry in results["long"].items():
            change = "-" if entry["change"] is None else f"{100 * entry['change']:+.1f}"
            lines.append(f"| {name} | {_percent(entry['first'])} | {_percent(entry['last'])} | {change} |")
        lines.append("")
    return "\n".join(lines)


def run_eval_suite(out: Path, device: str, dimensions: Sequence[str] | None, *, source, max_prompts: int | None = None,
                   seconds: float | None = None, seed: int = 0, videos_dir: Path | None = None) -> dict[str, Any]:
    """`longlive eval-vbench --suite shapes`: generate the parts' videos with `source`
    (`core.eval.suites.VideoSource`), probe them, write `out` (JSON) and `out` with .md; returns the
    results. `dimensions`: parts (SUITE_PARTS); `max_prompts`: at most this many videos per part.
    Part by part: the files are rewritten after each, so a run stopped early keeps what it finished."""
    import time

    parts = suite_parts(dimensions)
    folder = videos_dir or out.with_name(out.stem + "_videos")
    planned = plan_suite(parts, source.frames_per_block, folder, seconds or DEFAULT_SECONDS, seed, max_prompts)
    folder.mkdir(parents=True, exist_ok=True)
    source.claim([p.video for p in planned])  # every part's videos, before the first is generated
    results: dict[str, Any] = {"suite": "shapes", "settings": _settings(source, device, seconds, seed, folder),
                               "parts": {}, "seconds": {}}
    for part in parts:
        chosen = [p for p in planned if p.part == part]
        started = time.perf_counter()
        source.generate([p.video for p in chosen])
        generated = time.perf_counter()
        results["parts"][part] = evaluate_videos([p.video.output for p in chosen], [p.probe for p in chosen],
                                                 [p.name for p in chosen], workers=_workers(len(chosen)))
        results["seconds"][part] = {"generate": generated - started, "probe": time.perf_counter() - generated}
        if part == "long":
            results["long"] = long_summary(results["parts"]["long"])
        _write_suite(results, out)
    return results


def _write_suite(results: dict[str, Any], out: Path) -> None:
    text = json.dumps(results, indent=1) + "\n"
    atomic_write(out, lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    markdown = suite_markdown(results)
    atomic_write(out.with_suffix(".md"), lambda temp: Path(temp).write_text(markdown, encoding="utf-8"))


def _settings(source, device: str, seconds: float | None, seed: int, folder: Path) -> dict[str, Any]:
    return {**source.settings, "device": device, "seconds": seconds or DEFAULT_SECONDS, "seed": seed,
            "videos_dir": str(folder), "frames_per_block": source.frames_per_block}


def _workers(videos: int) -> int:
    """Probe processes: one for a handful of videos (spawning costs more), else up to 8."""
    return 1 if videos < 8 else max(1, min(8, os.cpu_count() or 1))


__all__ = ["ATTRIBUTES", "FrameReading", "ProbeShot", "evaluate_videos", "evaluation_schedules", "markdown_table",
           "probe_shot", "probe_video", "read_frame", "read_video", "run_eval_suite", "shots_from_schedule",
           "step_direction", "write_report"]
