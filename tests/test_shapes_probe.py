"""The offline shapes-world probe against ground truth: rendered clips read right (every colour,
background, shape and direction), wrong prompts and noise read wrong, blurred / noisy / H.264
renders (what a VAE gives) still read right, and cuts, switches and identity are measured."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from core.eval.shapes import (
    ATTRIBUTES,
    ProbeShot,
    evaluate_videos,
    evaluation_schedules,
    markdown_table,
    probe_video,
    read_frame,
    shots_from_schedule,
    write_report,
)
from core.shots import PromptSchedule, Shot
from core.train.synthetic import COLOURS, DIRECTIONS, SHAPES, ClipSpec, all_specs, render_clip, write_video

COLOUR_PAIRS = [(c, b) for c in COLOURS for b in COLOURS if c != b]


def all_right(shot: dict) -> bool:
    return all(shot["correct"].values()) and min(shot["frame_rates"].values()) == 1.0 and shot["identity_kept"] == 1.0


@pytest.mark.parametrize("colour, background", COLOUR_PAIRS)
def test_every_colour_on_every_background_reads_right(colour, background):
    index = COLOUR_PAIRS.index((colour, background))
    spec = ClipSpec(SHAPES[index % 3], colour, background, DIRECTIONS[index % 4])
    video = render_clip(spec, 5, 64, 64, phase=(0.37 * index) % 1)
    (shot,) = probe_video(video, spec.caption)
    assert shot["read"] == shot["expected"] == dataclasses.asdict(spec) | {}, shot["read"]
    assert all_right(shot)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_every_shape_and_direction_reads_right_at_the_demo_size(shape, direction):
    spec = ClipSpec(shape, "orange", "purple", direction)
    (shot,) = probe_video(render_clip(spec, 6, 128, 128, phase=0.95), spec.caption)  # wraps mid-clip
    assert all_right(shot), shot["read"]


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_a_wrong_prompt_is_read_wrong_on_that_attribute_only(attribute):
    shown = ClipSpec("square", "red", "blue", "left to right")
    other = {"shape": "circle", "colour": "yellow", "background": "green", "direction": "bottom to top"}[attribute]
    prompt = dataclasses.replace(shown, **{attribute: other})
    (shot,) = probe_video(render_clip(shown, 6, 64, 64), prompt.caption)
    assert shot["correct"] == {name: name != attribute for name in ATTRIBUTES}
    assert shot["frame_rates"][attribute] == 0.0


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "grey"])
def test_noise_is_rejected(kind):
    rng = np.random.default_rng(0)
    video = {"uniform": rng.integers(0, 256, (6, 64, 64, 3)),
             "gaussian": np.clip(rng.normal(128, 60, (6, 64, 64, 3)), 0, 255),
             "grey": np.full((6, 64, 64, 3), 128)}[kind].astype(np.uint8)
    reading = read_frame(video[0])
    assert reading.background is None and reading.shape is None and reading.colour is None
    (shot,) = probe_video(video, all_specs()[0].caption)
    assert not any(shot["correct"].values()) and max(shot["frame_rates"].values()) == 0.0
    assert shot["identity_kept"] == 0.0


def test_a_background_without_a_shape_reads_no_shape():
    video = render_clip(ClipSpec("circle", "red", "blue", "left to right"), 4, 64, 64)
    video[:] = COLOURS["blue"]
    (shot,) = probe_video(video, ClipSpec("circle", "red", "blue", "left to right").caption)
    assert shot["correct"] == {"background": True, "colour": False, "shape": False, "direction": False}


def gaussian_blur(video: np.ndarray, sigma: float) -> np.ndarray:
    if sigma == 0:
        return video.astype(np.float32)
    radius = int(np.ceil(3 * sigma))
    weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    weights /= weights.sum()
    out = video.astype(np.float32)
    for axis in (1, 2):
        out = sum(w * np.roll(out, s, axis=axis) for s, w in zip(range(-radius, radius + 1), weights, strict=True))
    return out


@pytest.mark.parametrize("size, sigma, noise", [(64, 1.0, 0), (64, 0.0, 16), (64, 1.0, 12), (64, 2.0, 8),
                                                (128, 2.0, 12), (128, 3.0, 8)])
def test_blurred_and_noisy_renders_read_right(size, sigma, noise):
    rng = np.random.default_rng(size + int(10 * sigma) + noise)
    for index, spec in enumerate(all_specs()[5::67]):  # 10 combinations spread over the world
        video = render_clip(spec, 5, size, size, phase=(0.31 * index) % 1)
        video = np.clip(gaussian_blur(video, sigma) + rng.normal(0, noise, video.shape), 0, 255)
        (shot,) = probe_video(video, spec.caption)
        assert all(shot["correct"].values()), (spec, shot["read"])
        assert min(shot["frame_rates"].values()) >= 0.75, (spec, shot["frame_rates"])


def test_h264_round_trip_reads_right(tmp_path):
    specs = all_specs()[3::97]
    paths = [write_video(tmp_path / f"{i}.mp4", render_clip(s, 8, 64, 64, phase=0.2 * i)) for i, s in enumerate(specs)]
    report = evaluate_videos(paths, [s.caption for s in specs])
    assert report["summary"]["all"]["accuracy"] == dict.fromkeys(ATTRIBUTES, 1.0)
    assert list(report["videos"]) == [p.stem for p in paths]
    assert evaluate_videos(paths, [s.caption for s in specs], workers=2) == report  # parallel == serial


# ----------------------------------------------------------------------------------------------
# Shots: cuts, switches, identity.


def two_shot_video(first: ClipSpec, second: ClipSpec, frames: tuple[int, int], lag: int, size: int = 64) -> np.ndarray:
    """Shot one, then shot two whose first `lag` frames still show shot one (a late cut)."""
    a = render_clip(first, frames[0] + lag, size, size)
    b = render_clip(second, frames[1], size, size)
    return np.concatenate([a, b[lag:]])


@pytest.mark.parametrize("transition", ["cut", "continue"])
@pytest.mark.parametrize("lag", [0, 5, 11])
def test_frames_to_obey_after_a_cut_or_switch(transition, lag):
    first = ClipSpec("circle", "red", "blue", "left to right")
    second = ClipSpec("triangle", "white", "black", "top to bottom")
    schedule = PromptSchedule((Shot(first.caption, 1), Shot(second.caption, 2, transition)), frames_per_block=2)
    shots = shots_from_schedule(schedule, schedule.num_video_frames)
    assert [s.transition for s in shots] == ["first", transition] and shots[1].start == 5
    video = two_shot_video(first, second, (shots[0].end, shots[1].end - shots[1].start), lag)
    report = evaluate_videos([video], [schedule])
    one, two = report["videos"]["video_000"]["shots"]
    assert one["frames_to_obey"] is None and two["frames_to_obey"] == lag
    key = "cuts" if transition == "cut" else "switches"
    assert report["summary"][key] == {"count": 1, "obeyed": 1, "mean_frames": float(lag), "max_frames": lag}
    assert all_right(one) and two["correct"]["shape"] == (lag < 8)  # the majority of the shot's frames
    assert two["frame_rates"]["shape"] == pytest.approx(1 - lag / 16)


def test_a_cut_that_never_comes_is_reported():
    first = ClipSpec("circle", "red", "blue", "left to right")
    schedule = PromptSchedule((Shot(first.caption, 1), Shot(ClipSpec("square", "red", "green", "left to right")
                                                                .caption, 1)), frames_per_block=2)
    video = render_clip(first, schedule.num_video_frames, 64, 64)
    report = evaluate_videos([video], [schedule])
    assert report["summary"]["cuts"] == {"count": 1, "obeyed": 0, "mean_frames": None, "max_frames": None}


def test_identity_flicker_is_measured():
    red = render_clip(ClipSpec("circle", "red", "blue", "left to right"), 12, 64, 64)
    yellow = render_clip(ClipSpec("circle", "yellow", "blue", "left to right"), 12, 64, 64)
    video = red.copy()
    video[1::2] = yellow[1::2]  # the colour changes every frame
    (shot,) = probe_video(video, ClipSpec("circle", "red", "blue", "left to right").caption)
    assert shot["identity_kept"] == 0.0 and shot["frame_rates"]["colour"] == 0.5
    video[6:] = red[6:]  # steady from frame 6 on
    (shot,) = probe_video(video, ClipSpec("circle", "red", "blue", "left to right").caption)
    assert shot["identity_kept"] == pytest.approx(5 / 11)


# ----------------------------------------------------------------------------------------------
# Reports and bad input.


def test_report_json_and_markdown(tmp_path):
    prompts = [ClipSpec("square", "green", "white", "right to left"), all_specs("held_out")[0]]
    videos = [render_clip(s, 6, 64, 64) for s in prompts]
    videos[1] = videos[1][:, :, ::-1].copy()  # mirrored: the held-out clip moves the other way
    report = evaluate_videos(videos, [s.caption for s in prompts], names=["a", "b"])
    summary = report["summary"]
    assert summary["seen"]["shots"] == summary["held_out"]["shots"] == 1 and summary["all"]["shots"] == 2
    assert summary["seen"]["accuracy"]["direction"] == 1.0
    horizontal = prompts[1].direction in ("left to right", "right to left")
    assert summary["held_out"]["accuracy"]["direction"] == (0.0 if horizontal else 1.0)
    write_report(report, tmp_path / "r.json", tmp_path / "r.md")
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(report))
    table = (tmp_path / "r.md").read_text()
    assert table == markdown_table(report) and "| seen | 1 | 100.0 (100.0) |" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]  # no temp files left


def test_bad_input_is_one_clear_error():
    video = render_clip(all_specs()[0], 5, 64, 64)
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        probe_video(video, "a dog runs in the park")
    with pytest.raises(ValueError, match=r"covers frames \[0, 9\) but the video has 5"):
        probe_video(video, [ProbeShot(all_specs()[0].caption, 0, 9)])
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        probe_video(video[0], all_specs()[0].caption)
    with pytest.raises(ValueError, match="one schedule per video"):
        evaluate_videos([video], [])


def test_evaluation_schedules_are_fixed_multi_shot_lists():
    cuts, switches = evaluation_schedules(4), evaluation_schedules(4, transition="continue")
    assert cuts == evaluation_schedules(4)
    for schedule in cuts:
        assert len(schedule.shots) == 3 and sum(schedule.scene_cuts) == 2
    assert all(sum(s.scene_cuts) == 0 and len(s.shots) == 3 for s in switches)
