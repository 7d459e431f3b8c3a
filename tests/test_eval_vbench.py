"""core.eval.vbench / results: VBench-Long's clip spans, VBench's aggregation and the slow-fast
fusion against VBench's own constants, tables and procedures (pure Python, no vbench needed)."""

from __future__ import annotations

import math
from bisect import bisect_left

import pytest

from core.eval import vbench
from core.eval.results import EvalSettings, build_results

# scripts/constant.py of VBench, with its space-separated names.
VBENCH_NORMALIZE_DIC = {
    "subject consistency": {"Min": 0.1462, "Max": 1.0}, "background consistency": {"Min": 0.2615, "Max": 1.0},
    "temporal flickering": {"Min": 0.6293, "Max": 1.0}, "motion smoothness": {"Min": 0.706, "Max": 0.9975},
    "dynamic degree": {"Min": 0.0, "Max": 1.0}, "aesthetic quality": {"Min": 0.0, "Max": 1.0},
    "imaging quality": {"Min": 0.0, "Max": 1.0}, "object class": {"Min": 0.0, "Max": 1.0},
    "multiple objects": {"Min": 0.0, "Max": 1.0}, "human action": {"Min": 0.0, "Max": 1.0},
    "color": {"Min": 0.0, "Max": 1.0}, "spatial relationship": {"Min": 0.0, "Max": 1.0},
    "scene": {"Min": 0.0, "Max": 0.8222}, "appearance style": {"Min": 0.0009, "Max": 0.2855},
    "temporal style": {"Min": 0.0, "Max": 0.364}, "overall consistency": {"Min": 0.0, "Max": 0.364},
}
VBENCH_QUALITY_LIST = ["subject consistency", "background consistency", "temporal flickering", "motion smoothness",
                       "aesthetic quality", "imaging quality", "dynamic degree"]
VBENCH_SEMANTIC_LIST = ["object class", "multiple objects", "human action", "color", "spatial relationship",
                        "scene", "appearance style", "temporal style", "overall consistency"]


def vbench_final_score(upload: dict[str, float]) -> tuple[float, float, float]:
    """cal_final_score.py, step by step (weights multiplied into the normalized scores)."""
    weight = {k: (0.5 if k == "dynamic degree" else 1) for k in VBENCH_NORMALIZE_DIC}
    norm = {k: (upload[k] - v["Min"]) / (v["Max"] - v["Min"]) * weight[k] for k, v in VBENCH_NORMALIZE_DIC.items()}
    quality = sum(norm[k] for k in VBENCH_QUALITY_LIST) / sum(weight[k] for k in VBENCH_QUALITY_LIST)
    semantic = sum(norm[k] for k in VBENCH_SEMANTIC_LIST) / sum(weight[k] for k in VBENCH_SEMANTIC_LIST)
    return quality, semantic, (quality * 4 + semantic * 1) / (4 + 1)


def vbench_long_clips(n: int, avg_fps: float, duration: float) -> list[tuple[int, int]]:
    """split_video_into_clips's loop on a list of n frame indices (fps = int(avg fps), duration int)."""
    frames = list(range(n))
    fps = int(avg_fps)
    seg = fps * int(duration)
    if len(frames) < seg:
        return [(0, n)]
    out = []
    total, remaining = len(frames) // seg, len(frames) % seg
    for i in range(total):
        part = frames[i * seg:i * seg + seg]
        out.append((part[0], part[-1] + 1))
    if remaining > 0:
        part = frames[max(0, total * seg - (seg - remaining)):]
        out.append((part[0], part[-1] + 1))
    return out


@pytest.mark.parametrize("fps", [8.0, 16.0, 23.976023976, 24.0, 30.0])
@pytest.mark.parametrize("seconds", [2.0, 10.0, 2.5])
@pytest.mark.parametrize("n", [1, 15, 16, 45, 46, 47, 48, 92, 100, 240, 1441])
def test_clip_spans_equal_vbench_long(n, fps, seconds):
    assert vbench.clip_spans(n, fps, seconds) == vbench_long_clips(n, fps, seconds)


def test_clip_spans_examples():
    assert vbench.clip_spans(1440, 24.0, 2) == [(48 * i, 48 * i + 48) for i in range(30)]  # 60 s at 24 fps
    assert vbench.clip_spans(100, 23.976, 2)[-1] == (54, 100)  # 46-frame "2 s" clips, overlapping tail
    assert vbench.clip_spans(30, 24.0, 10) == [(0, 30)]
    with pytest.raises(ValueError, match="num_frames"):
        vbench.clip_spans(0, 24.0, 2)


def test_video_clips_offsets_scenes():
    clips = vbench.video_clips([(0, 20), (20, 57), (57, 74)], 8.0, 2.0)
    assert clips == [(0, 0, 16), (0, 4, 20), (1, 20, 36), (1, 36, 52), (1, 41, 57), (2, 57, 73), (2, 58, 74)]
    assert vbench.video_clips([(0, 20), (20, 57)], 8.0, 2.0, mode="standard") == [(0, 0, 57)]


def test_constants_are_vbenchs():
    for name, bounds in VBENCH_NORMALIZE_DIC.items():
        assert vbench.NORMALIZE_BOUNDS[name.replace(" ", "_")] == (bounds["Min"], bounds["Max"])
    assert [d.replace("_", " ") for d in vbench.QUALITY_DIMENSIONS] == VBENCH_QUALITY_LIST
    assert [d.replace("_", " ") for d in vbench.SEMANTIC_DIMENSIONS] == VBENCH_SEMANTIC_LIST
    assert {d for d, s in vbench.LONG_CLIP_SECONDS.items() if s == 10.0} == {
        "human_action", "temporal_style", "overall_consistency"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregate_equals_cal_final_score(seed):
    import random

    rng = random.Random(seed)
    raw = {d: rng.uniform(*vbench.NORMALIZE_BOUNDS[d]) * rng.uniform(0.8, 1.2) for d in vbench.DIMENSIONS}
    quality, semantic, total = vbench_final_score({d.replace("_", " "): v for d, v in raw.items()})
    got = vbench.aggregate(raw)
    assert abs(got["quality"] - quality) <= 1e-12 and abs(got["semantic"] - semantic) <= 1e-12
    assert abs(got["total"] - total) <= 1e-12
    low, high = vbench.NORMALIZE_BOUNDS["scene"]
    assert got["normalized"]["scene"] == (raw["scene"] - low) / (high - low)  # unweighted, unclipped


def test_aggregate_refuses_missing_dimensions():
    raw = {d: 0.5 for d in vbench.DIMENSIONS if d != "color"}
    with pytest.raises(ValueError, match="missing color"):
        vbench.aggregate(raw)


def test_mapping_tables_are_vbench_longs():
    # Spot values of configs/{subject,background}_mapping_table.yaml (101 keys, 0.0 .. 1.0).
    subject, background = vbench.MAPPING_TABLES["subject_consistency"], vbench.MAPPING_TABLES["background_consistency"]
    assert len(subject) == len(background) == len(vbench.MAPPING_KEYS) == 101
    assert subject[:3] == (0.0, 0.655812085783768, 0.706856949045235)
    assert subject[98:] == (0.994591460602974, 0.995516073547993, 1.0)
    assert background[98:] == (0.981866938883779, 0.985895411744772, 1.0)
    assert vbench.MAPPING_KEYS[7] == 0.07 and vbench.MAPPING_KEYS[-1] == 1.0


def vbench_long_map(table: dict[float, float], score: float) -> float:
    """fuse_inclip_clip2clip's table lookup (bisect on the yaml's sorted keys)."""
    keys = sorted(table)
    idx = bisect_left(keys, score)
    if idx == 0:
        return table[keys[0]]
    if idx == len(keys):
        return table[keys[-1]]
    k0, k1 = keys[idx - 1], keys[idx]
    return table[k0] + (table[k1] - table[k0]) * (score - k0) / (k1 - k0)


@pytest.mark.parametrize("dimension", vbench.SLOW_FAST_DIMENSIONS)
@pytest.mark.parametrize("score", [-0.2, 0.0, 0.004, 0.37, 0.375, 0.5, 0.8123, 0.99, 0.995, 1.0, 1.3])
def test_map_clip2clip_equals_table_lookup(dimension, score):
    yaml_table = {float(f"{i / 100:.2f}"): v for i, v in enumerate(vbench.MAPPING_TABLES[dimension])}
    assert vbench.map_clip2clip(dimension, score) == vbench_long_map(yaml_table, score)


def test_fuse_slow_fast():
    inclip = {"a": 0.95, "b": 0.9, "c": 0.97}
    clip2clip = {"a": 0.81, "b": None}  # b: one clip; c: absent
    fused = vbench.fuse_slow_fast("subject_consistency", inclip, clip2clip)
    mapped = vbench.map_clip2clip("subject_consistency", 0.81)
    assert fused["videos"]["a"] == {"fused": 0.95 * 0.5 + mapped * 0.5, "mapped_clip2clip": mapped}
    assert fused["videos"]["b"] == {"fused": 0.9, "mapped_clip2clip": 0.0}  # mapped 0 keeps the in-clip score
    assert fused["videos"]["c"]["fused"] == 0.97
    assert fused["score"] == (0.95 * 0.5 + mapped * 0.5 + 0.9 + 0.97) / 3
    plain = vbench.fuse_slow_fast("background_consistency", inclip, clip2clip, dev_flag=False)
    assert plain["score"] == (0.95 + 0.9 + 0.97) / 3
    with pytest.raises(ValueError, match="slow-fast"):
        vbench.fuse_slow_fast("dynamic_degree", inclip, clip2clip)


def _scored(dimensions, clip2clip=0.8):
    """A worker response: video v0 (2 scenes, 4 clips), v1 (1 clip)."""
    def clips(spans, base, dimension):
        return [{"scene": s, "start": a, "end": b, "score": base + 0.01 * k,
                 **({"pair_scores": [1.0, 2.0]} if dimension == "dynamic_degree" else {})}
                for k, (s, a, b) in enumerate(spans)]
    videos = {}
    for name, spans, fps in (("v0", [(0, 0, 16), (0, 4, 20), (1, 20, 36), (1, 24, 40)], 8.0),
                             ("v1", [(0, 0, 10)], 8.0)):
        videos[name] = {"path": f"/x/{name}.mp4", "fps": fps, "num_frames": spans[-1][2],
                        "scenes": [[0, spans[-1][2]]],
                        "dimensions": {d: {"clips": clips(spans, 0.9, d),
                                           "clip2clip": clip2clip if len(spans) > 1 else None} for d in dimensions}}
    return {"videos": videos}


def test_results_schema_and_clip_weighting():
    dims = ("subject_consistency", "dynamic_degree")
    settings = EvalSettings(mode="long", dimensions=dims)
    scored = _scored(dims)
    results, fusions = build_results(settings, scored)
    assert set(results) == {"mode", "clip_source", "scene_split", "scene_threshold", "dev_flag", "videos",
                            "dimensions", "aggregate"}
    assert results["aggregate"] is None
    v0 = results["videos"]["v0"]
    assert set(v0) == {"path", "fps", "num_frames", "scenes", "dimensions"}
    clip = v0["dimensions"]["subject_consistency"]["clips"][1]
    assert set(clip) == {"scene", "start", "end", "start_s", "end_s", "score"}
    assert clip["start_s"] == 4 / 8.0 and clip["end_s"] == 20 / 8.0
    mapped = vbench.map_clip2clip("subject_consistency", 0.8)
    assert clip["score"] == vbench.fuse_score("subject_consistency", 0.91, mapped)
    assert fusions["v0"]["subject_consistency"]["inclip_scores"][1] == 0.91
    # v1 has one clip: no clip-to-clip score, the in-clip score stands
    assert results["videos"]["v1"]["dimensions"]["subject_consistency"]["clips"][0]["score"] == 0.9
    all_clips = [c["score"] for v in results["videos"].values()
                 for c in v["dimensions"]["subject_consistency"]["clips"]]
    assert math.isclose(results["dimensions"]["subject_consistency"]["score"], sum(all_clips) / 5, rel_tol=1e-15)
    assert "pair_scores" in v0["dimensions"]["dynamic_degree"]["clips"][0]


def test_standard_mode_means_over_videos_and_aggregates():
    settings = EvalSettings(mode="standard", dimensions=vbench.DIMENSIONS)
    results, fusions = build_results(settings, _scored(vbench.DIMENSIONS))
    assert fusions == {}
    per_video = [v["dimensions"]["scene"]["score"] for v in results["videos"].values()]
    assert results["dimensions"]["scene"]["score"] == sum(per_video) / 2
    expected = vbench.aggregate({d: results["dimensions"][d]["score"] for d in vbench.DIMENSIONS})
    assert results["aggregate"] == {k: expected[k] for k in ("quality", "semantic", "total")}


@pytest.mark.parametrize("bad, match", [
    ({"mode": "short"}, "mode"), ({"clip_source": "files"}, "clip_source"),
    ({"dimensions": ("colour",)}, "colour"), ({"scene_threshold": 0}, "scene_threshold"),
    ({"clip_seconds": 0.5}, "clip_seconds")])
def test_settings_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        EvalSettings(**bad)
