"""VBench / VBench-Long scoring rules in plain Python (no vbench import).

The per-clip numbers come from the vbench package's own dimension functions (run by
`core.eval.worker`, possibly in its own environment); everything around them lives here:
the 16 dimensions and their groups, VBench-Long's clip spans, the slow-fast fusion of the
consistency dimensions, VBench's normalisation and weights into Quality / Semantic / Total,
and the assembly of `results.json` (design.md §4 "Evaluation").

Constants are VBench's: `scripts/constant.py` (NORMALIZE_DIC, DIM_WEIGHT, QUALITY_LIST,
SEMANTIC_LIST), `vbench2_beta_long/configs/clip_length_mix.yaml`, `slow_fast_params.yaml` and the
mapping tables (`core.eval.vbench_tables`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping, Sequence

from core.eval.vbench_tables import BACKGROUND_MAPPING, SUBJECT_MAPPING

# VBench's QUALITY_LIST and SEMANTIC_LIST, in their order (sums run in this order).
QUALITY_DIMENSIONS = ("subject_consistency", "background_consistency", "temporal_flickering",
                      "motion_smoothness", "aesthetic_quality", "imaging_quality", "dynamic_degree")
SEMANTIC_DIMENSIONS = ("object_class", "multiple_objects", "human_action", "color", "spatial_relationship",
                       "scene", "appearance_style", "temporal_style", "overall_consistency")
DIMENSIONS = QUALITY_DIMENSIONS + SEMANTIC_DIMENSIONS
# The six of the paper's Table 5 (VBench-Long, custom prompts).
LONG_TABLE_DIMENSIONS = ("subject_consistency", "background_consistency", "motion_smoothness",
                         "dynamic_degree", "aesthetic_quality", "imaging_quality")

NORMALIZE_BOUNDS = {  # (Min, Max) of VBench's NORMALIZE_DIC
    "subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0), "aesthetic_quality": (0.0, 1.0), "imaging_quality": (0.0, 1.0),
    "object_class": (0.0, 1.0), "multiple_objects": (0.0, 1.0), "human_action": (0.0, 1.0),
    "color": (0.0, 1.0), "spatial_relationship": (0.0, 1.0), "scene": (0.0, 0.8222),
    "appearance_style": (0.0009, 0.2855), "temporal_style": (0.0, 0.364), "overall_consistency": (0.0, 0.364),
}
DIMENSION_WEIGHTS = {d: (0.5 if d == "dynamic_degree" else 1) for d in DIMENSIONS}
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4, 1

# VBench-Long's clip_length_mix.yaml: seconds per clip.
LONG_CLIP_SECONDS = {d: (10.0 if d in ("human_action", "temporal_style", "overall_consistency") else 2.0)
                     for d in DIMENSIONS}

# Dimensions VBench refuses in custom-input mode: they read `auxiliary_info` of its prompt suite.
AUXILIARY_DIMENSIONS = ("object_class", "multiple_objects", "scene", "appearance_style", "color",
                        "spatial_relationship")
SLOW_FAST_DIMENSIONS = ("subject_consistency", "background_consistency")
# slow_fast_params.yaml (w_inclip, w_clip2clip) with --dev_flag; eval_long.py's 1.0 / 0.0 without.
SLOW_FAST_WEIGHTS = {"subject_consistency": (0.5, 0.5), "background_consistency": (0.5, 0.5)}
NO_DEV_FLAG_WEIGHTS = (1.0, 0.0)
MAPPING_TABLES = {"subject_consistency": SUBJECT_MAPPING, "background_consistency": BACKGROUND_MAPPING}
MAPPING_KEYS = tuple(i / 100 for i in range(len(SUBJECT_MAPPING)))  # the yaml's keys 0.0, 0.01, .., 1.0


def clip_seconds(dimension: str, override: float | None = None) -> float:
    """Seconds per clip of a dimension in long mode (`--clip-seconds` overrides every dimension)."""
    return LONG_CLIP_SECONDS[dimension] if override is None else override


def clip_spans(num_frames: int, fps: float, seconds: float) -> list[tuple[int, int]]:
    """VBench-Long's `split_video_into_clips` as frame spans `[start, end)` of one scene.

    `seg = int(fps) * int(seconds)`; `n // seg` whole clips, then a tail `[n - seg, n)` that
    overlaps the previous clip when `n % seg`; a scene shorter than one clip is one clip.
    """
    if num_frames <= 0:
        raise ValueError(f"num_frames={num_frames}: a scene has at least one frame")
    seg = int(fps) * int(seconds)
    if seg <= 0:
        raise ValueError(f"fps={fps}, seconds={seconds}: a clip must hold at least one frame")
    if num_frames < seg:
        return [(0, num_frames)]
    spans = [(i * seg, (i + 1) * seg) for i in range(num_frames // seg)]
    if num_frames % seg:
        spans.append((num_frames - seg, num_frames))
    return spans


def slow_fast_weights(dimension: str, dev_flag: bool) -> tuple[float, float]:
    """(w_inclip, w_clip2clip) of a consistency dimension."""
    return SLOW_FAST_WEIGHTS[dimension] if dev_flag else NO_DEV_FLAG_WEIGHTS


def map_clip2clip(dimension: str, clip2clip: float | None) -> float:
    """A clip-to-clip score on the in-clip scale through the dimension's mapping table:
    linear between keys, the end values outside them; `None` (one-clip video) counts as 0."""
    table = MAPPING_TABLES[dimension]
    score = 0 if clip2clip is None else clip2clip
    idx = bisect_left(MAPPING_KEYS, score)
    if idx == 0:
        return table[0]
    if idx == len(MAPPING_KEYS):
        return table[-1]
    k0, k1, y0, y1 = MAPPING_KEYS[idx - 1], MAPPING_KEYS[idx], table[idx - 1], table[idx]
    return y0 + (y1 - y0) * (score - k0) / (k1 - k0)  # vbench2_beta_long.utils.linear_interpolate


def fuse_score(dimension: str, inclip: float, mapped: float, dev_flag: bool = True) -> float:
    """One fused score; a mapped score of exactly 0 keeps the in-clip score (as VBench-Long)."""
    w_inclip, w_clip2clip = slow_fast_weights(dimension, dev_flag)
    return inclip * w_inclip + mapped * w_clip2clip if mapped != 0.0 else inclip


def fuse_slow_fast(dimension: str, inclip: Mapping[str, float], clip2clip: Mapping[str, float | None],
                   dev_flag: bool = True) -> dict:
    """VBench-Long's `fuse_inclip_clip2clip` per video: `{"score", "videos": {name: {"fused",
    "mapped_clip2clip"}}}`, `score` the mean of `fused` over the videos of `inclip`."""
    if dimension not in MAPPING_TABLES:
        raise ValueError(f"{dimension}: slow-fast fusion is defined for {', '.join(SLOW_FAST_DIMENSIONS)}")
    if not inclip:
        raise ValueError("fuse_slow_fast needs at least one video's in-clip score")
    videos = {}
    for name, score in inclip.items():
        mapped = map_clip2clip(dimension, clip2clip.get(name))
        videos[name] = {"fused": fuse_score(dimension, score, mapped, dev_flag), "mapped_clip2clip": mapped}
    total = 0.0
    for entry in videos.values():
        total += entry["fused"]
    return {"score": total / len(videos), "videos": videos}


def aggregate(raw: Mapping[str, float]) -> dict:
    """VBench's Quality / Semantic / Total from the 16 raw dimension scores (cal_final_score.py).

    `normalized[d] = (raw - Min) / (Max - Min)`, no clipping; Quality and Semantic are
    weight-averaged (dynamic_degree 0.5); `total = (4 * quality + semantic) / 5`.
    """
    missing = [d for d in DIMENSIONS if d not in raw]
    if missing:
        raise ValueError(f"aggregate needs all 16 VBench dimensions; missing {', '.join(missing)} "
                         f"(VBench would silently count them as 0)")
    normalized = {}
    for d in DIMENSIONS:
        low, high = NORMALIZE_BOUNDS[d]
        normalized[d] = (raw[d] - low) / (high - low)

    def group(dims: Sequence[str]) -> float:
        return sum(normalized[d] * DIMENSION_WEIGHTS[d] for d in dims) / sum(DIMENSION_WEIGHTS[d] for d in dims)

    quality, semantic = group(QUALITY_DIMENSIONS), group(SEMANTIC_DIMENSIONS)
    total = (quality * QUALITY_WEIGHT + semantic * SEMANTIC_WEIGHT) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    return {"quality": quality, "semantic": semantic, "total": total, "normalized": normalized}


def mean(values: Sequence[float]) -> float:
    """Left-to-right sum / count (numpy's pairwise sum may differ in the last bits)."""
    total = 0.0
    for v in values:
        total += v
    return total / len(values)


def video_clips(scenes: Sequence[Sequence[int]], fps: float, seconds: float,
                mode: str = "long") -> list[tuple[int, int, int]]:
    """(scene, start, end) of every clip of a video: long mode cuts each scene with `clip_spans`
    (indices in the source video); standard mode scores the whole video as one clip."""
    if mode == "standard":
        return [(0, scenes[0][0], scenes[-1][1])]
    clips = []
    for index, (first, end) in enumerate(scenes):
        clips.extend((index, first + s, first + e) for s, e in clip_spans(end - first, fps, seconds))
    return clips
