"""Per-clip scores (from the worker) -> `results.json` (design.md §4) and its provenance record.

The worker reports, per video, its fps, frame count, scenes and, per dimension, each clip's
in-clip score on the dimension's reported scale (imaging quality already divided by 100) plus,
for the slow-fast dimensions in long mode, the video's clip-to-clip score. Here the clip scores
are fused, averaged per video, averaged per dimension (clip-weighted in long mode, over videos
in standard mode) and aggregated into Quality / Semantic / Total.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from core.eval.vbench import DIMENSIONS, SLOW_FAST_DIMENSIONS, aggregate, fuse_score, map_clip2clip, mean

MODES = ("long", "standard")
CLIP_SOURCES = ("frames", "reencoded")


@dataclass(frozen=True)
class EvalSettings:
    """Everything that changes the numbers; recorded in results.json and its provenance."""

    mode: str = "long"
    dimensions: tuple[str, ...] = DIMENSIONS
    scene_split: bool = False
    scene_threshold: float = 35.0
    clip_seconds: float | None = None  # None: VBench-Long's per-dimension lengths
    clip_source: str = "frames"
    dev_flag: bool = True
    device: str = "cuda"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: choose long or standard")
        if self.clip_source not in CLIP_SOURCES:
            raise ValueError(f"clip_source={self.clip_source!r}: choose frames or reencoded")
        unknown = [d for d in self.dimensions if d not in DIMENSIONS]
        if unknown:
            raise ValueError(f"dimension {unknown[0]!r} does not exist: choose from {', '.join(DIMENSIONS)}")
        if not self.dimensions:
            raise ValueError("dimensions is empty: name at least one")
        if self.scene_threshold <= 0:
            raise ValueError(f"scene_threshold={self.scene_threshold}: use a positive threshold (VBench-Long: 35)")
        if self.clip_seconds is not None and int(self.clip_seconds) < 1:
            raise ValueError(f"clip_seconds={self.clip_seconds}: VBench-Long uses whole seconds (int), at least 1")

    def as_dict(self) -> dict:
        return {**asdict(self), "dimensions": list(self.dimensions)}


def _clip_entry(clip: dict, fps: float, score: float) -> dict:
    entry = {"scene": clip["scene"], "start": clip["start"], "end": clip["end"],
             "start_s": clip["start"] / fps, "end_s": clip["end"] / fps, "score": score}
    if "pair_scores" in clip:
        entry["pair_scores"] = clip["pair_scores"]
    return entry


def _video_dimension(dimension: str, raw: dict, fps: float, settings: EvalSettings) -> tuple[dict, dict | None]:
    """One video's dimension entry, and its fusion record (None when not fused)."""
    clips = raw["clips"]
    fusion = None
    if settings.mode == "long" and dimension in SLOW_FAST_DIMENSIONS:
        mapped = map_clip2clip(dimension, raw["clip2clip"])
        scores = [fuse_score(dimension, c["score"], mapped, settings.dev_flag) for c in clips]
        fusion = {"clip2clip": raw["clip2clip"], "mapped_clip2clip": mapped,
                  "inclip_scores": [c["score"] for c in clips]}
    else:
        scores = [c["score"] for c in clips]
    entries = [_clip_entry(c, fps, s) for c, s in zip(clips, scores, strict=True)]
    return {"score": mean(scores), "clips": entries}, fusion


def build_results(settings: EvalSettings, scored: dict) -> tuple[dict, dict]:
    """(results.json, fusion records) from the worker's `scored["videos"]`."""
    videos, fusions = {}, {}
    for name, video in scored["videos"].items():
        dims = {}
        for dimension in settings.dimensions:
            if dimension not in video["dimensions"]:
                continue  # its prompt does not serve this dimension
            dims[dimension], fusion = _video_dimension(dimension, video["dimensions"][dimension],
                                                       video["fps"], settings)
            if fusion is not None:
                fusions.setdefault(name, {})[dimension] = fusion
        videos[name] = {"path": video["path"], "fps": video["fps"], "num_frames": video["num_frames"],
                        "scenes": video["scenes"], "dimensions": dims}
    dimensions = {}
    for dimension in settings.dimensions:
        scored_videos = [v["dimensions"][dimension] for v in videos.values() if dimension in v["dimensions"]]
        if not scored_videos:
            continue
        if settings.mode == "long":  # VBench-Long's all_results: every clip of every video
            values = [c["score"] for v in scored_videos for c in v["clips"]]
        else:
            values = [v["score"] for v in scored_videos]
        dimensions[dimension] = {"score": mean(values)}
    overall = None
    if all(d in dimensions for d in DIMENSIONS):
        agg = aggregate({d: dimensions[d]["score"] for d in DIMENSIONS})
        overall = {"quality": agg["quality"], "semantic": agg["semantic"], "total": agg["total"]}
    results = {"mode": settings.mode, "clip_source": settings.clip_source, "scene_split": settings.scene_split,
               "scene_threshold": settings.scene_threshold, "dev_flag": settings.dev_flag,
               "videos": videos, "dimensions": dimensions, "aggregate": overall}
    return results, fusions
