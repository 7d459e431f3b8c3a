"""The shapes world: captions, the held-out split, rendering against a supersampled reference,
continuous wrapping motion, multi-shot training clips and the evaluation prompt set."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from core.shots import SCENE_CUT_PREFIX
from core.train.synthetic import (
    COLOURS,
    DIRECTIONS,
    FRAMES_PER_CROSSING,
    SHAPES,
    ClipSpec,
    all_specs,
    evaluation_prompts,
    is_held_out,
    make_synthetic_dataset,
    parse_caption,
    random_clip_spec,
    render_clip,
    render_training_clip,
    shape_centre,
    shape_size,
)

ATTRIBUTES = ("shape", "colour", "background", "direction")


# ----------------------------------------------------------------------------------------------
# Captions and combinations.


def test_every_caption_parses_back_to_its_spec():
    for spec in all_specs():
        assert parse_caption(spec.caption) == spec
        assert parse_caption(SCENE_CUT_PREFIX + spec.caption) == spec
    assert ClipSpec("circle", "orange", "red", "left to right").caption == \
        "an orange circle moves left to right on a red background"
    assert ClipSpec("square", "red", "orange", "top to bottom").caption == \
        "a red square moves top to bottom on an orange background"


@pytest.mark.parametrize("text", [
    "a red circle moves left to right",  # no background
    "a pink circle moves left to right on a red background",  # colour outside the world
    "a red hexagon moves left to right on a blue background",
    "a red circle moves diagonally on a blue background",
    "a dog runs",
])
def test_captions_outside_the_grammar_are_rejected(text):
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        parse_caption(text)


def test_held_out_split_is_fixed_disjoint_and_keeps_every_pair_seen():
    every, train, held_out = all_specs(), all_specs("train"), all_specs("held_out")
    assert len(every) == 8 * 7 * len(SHAPES) * 4 == 672
    assert len(held_out) == 84 and set(train) | set(held_out) == set(every) and not set(train) & set(held_out)
    assert all(is_held_out(s) for s in held_out) and not any(is_held_out(s) for s in train)
    # Composition, not new words: every pair of attribute values still occurs in training.
    for a, b in itertools.combinations(ATTRIBUTES, 2):
        pairs = {(getattr(s, a), getattr(s, b)) for s in every}
        assert {(getattr(s, a), getattr(s, b)) for s in train} == pairs, (a, b)


def test_random_specs_and_datasets_use_only_training_combinations(tmp_path):
    rng = np.random.default_rng(0)
    drawn = [random_clip_spec(rng) for _ in range(300)]
    assert not any(is_held_out(s) for s in drawn) and len(set(drawn)) > 150
    root = make_synthetic_dataset(tmp_path / "d", samples=6, clips_per_sample=3, frames=5, height=16, width=16)
    for sample in range(6):
        specs = [parse_caption(json.loads((root / "caption" / f"sample_{sample:03d}" / f"{n}.json").read_text())
                               ["caption"]) for n in range(3)]
        assert not any(is_held_out(s) for s in specs)
        assert all(a.background != b.background for a, b in zip(specs, specs[1:], strict=False))  # visible cuts


def test_evaluation_prompts_cover_both_splits_evenly():
    prompts = evaluation_prompts()
    assert len(prompts) == 48 and prompts == evaluation_prompts()  # fixed
    for split in ("seen", "held_out"):
        specs = [p.spec for p in prompts if p.split == split]
        assert len(specs) == len(set(specs)) == 24
        assert all(is_held_out(s) == (split == "held_out") for s in specs)
        for name, values in (("shape", SHAPES), ("direction", DIRECTIONS)):
            assert sorted({getattr(s, name) for s in specs}) == sorted(values)
        for name in ("colour", "background"):
            counts = [sum(getattr(s, name) == c for s in specs) for c in COLOURS]
            assert min(counts) >= 2 and max(counts) <= 4, (name, counts)


# ----------------------------------------------------------------------------------------------
# Rendering.


def supersampled_coverage(shape: str, height: int, width: int, cx: float, cy: float, side: float,
                          n: int = 16) -> np.ndarray:
    """The slow obvious reference: the fraction of n x n sample points of each pixel inside the shape."""
    offsets = (np.arange(n) + 0.5) / n
    ys = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1)
    xs = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1)
    py, px = np.meshgrid(ys - cy, xs - cx, indexing="ij")
    h = side / 2
    if shape == "square":
        inside = (np.abs(px) <= h) & (np.abs(py) <= h)
    elif shape == "circle":
        inside = px**2 + py**2 <= h**2
    else:  # apex (0, -h), base corners (+-h, h)
        inside = (py <= h) & (py >= -h + 2 * np.abs(px))
    return inside.reshape(height, n, width, n).mean(axis=(1, 3))


def rendered_coverage(frame, spec: ClipSpec) -> np.ndarray:
    bg, fg = np.array(COLOURS[spec.background], float), np.array(COLOURS[spec.colour], float)
    channel = int(np.argmax(np.abs(fg - bg)))
    return (frame[..., channel] - bg[channel]) / (fg[channel] - bg[channel])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("phase", [0.3, 0.97])  # 0.97: the shape straddles the edge and wraps
def test_rendered_shape_matches_supersampled_reference(shape, phase):
    spec = ClipSpec(shape, "yellow", "blue", "left to right")
    frame = render_clip(spec, 1, 64, 64, phase=phase)[0].astype(float)
    cx, cy = shape_centre("left to right", 0, 64, 64, phase)
    side = shape_size(64, 64)
    reference = sum(supersampled_coverage(shape, 64, 64, float(cx) + k * 64, float(cy), side) for k in (-1, 0, 1))
    coverage = rendered_coverage(frame, spec)
    error = np.abs(coverage - reference)
    assert error.max() <= (0.02 if shape == "square" else 0.08)  # square: exact area; others: a 1-px ramp
    assert abs(coverage.sum() - reference.sum()) <= 0.02 * reference.sum()
    if phase > 0.9:
        assert coverage[:, 0].sum() > 1 and coverage[:, -1].sum() > 1  # both parts of the wrapped shape


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_motion_is_constant_speed_and_wraps_for_any_length(direction):
    spec = ClipSpec("circle", "white", "black", direction)
    frames = 2 * FRAMES_PER_CROSSING + 10
    video = render_clip(spec, frames, 32, 32, phase=0.5)
    coverage = np.stack([rendered_coverage(f.astype(float), spec) for f in video])
    area = coverage.sum(axis=(1, 2))
    assert np.ptp(area) <= 0.03 * area.mean()  # the whole shape is always drawn (it wraps, never leaves)
    np.testing.assert_array_equal(video[FRAMES_PER_CROSSING:2 * FRAMES_PER_CROSSING], video[:FRAMES_PER_CROSSING])
    axis = 1 if direction in ("left to right", "right to left") else 0  # x: columns, y: rows
    profile = coverage.sum(axis=2 - axis)  # [T, 32] mass along the motion axis
    step = 32 / FRAMES_PER_CROSSING
    sign = 1 if direction in ("left to right", "top to bottom") else -1
    for t in (0, 7, 40):  # the profile one frame later is this one shifted by the speed
        shifted = np.interp((np.arange(32) - sign * step) % 32, np.arange(33), np.append(profile[t], profile[t][0]))
        assert np.abs(profile[t + 1] - shifted).max() < 0.15 * profile[t].max()


def test_training_clips_cut_at_a_latent_boundary():
    rng = np.random.default_rng(3)
    for _ in range(6):
        video, specs = render_training_clip(rng, 17, world_size=64, crop=32, cut_probability=1.0)
        assert video.shape == (17, 32, 32, 3) and len(specs) == 2
        assert specs[0].background != specs[1].background
        changed = [t for t in range(1, 17) if not np.array_equal(np.median(video[t], axis=(0, 1)),
                                                                  np.median(video[t - 1], axis=(0, 1)))]
        assert len(changed) == 1 and changed[0] % 4 == 1  # frame 1 + 4k: where a latent frame starts
    video, specs = render_training_clip(rng, 9, world_size=64, crop=64, cut_probability=0.0)
    assert video.shape == (9, 64, 64, 3) and len(specs) == 1 and not is_held_out(specs[0])
