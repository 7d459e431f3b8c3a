"""The scoring run inside the VBench environment: `python -m core.eval.worker REQUEST.json RESPONSE.json`.

Per video: fps and frame count as decord reads them (VBench's reader), scenes (PySceneDetect,
when asked), then per dimension its clips (`core.eval.vbench.video_clips`), each scored by
vbench's own function (`core.eval.scorers`), either on the decoded frames of the span
(`frames`: virtual clips, `core.eval.virtual`) or on clip files written by VBench-Long's own
splitting functions (`reencoded`). For subject/background consistency in long mode it adds each
video's clip-to-clip score. The response holds raw per-clip scores; `core.eval.results` does the rest.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.eval.results import EvalSettings
from core.eval.scorers import SCORERS, ClipItem, clip2clip_score
from core.eval.vbench import SLOW_FAST_DIMENSIONS, clip_seconds, video_clips
from core.eval.virtual import VirtualClips


@dataclass
class Video:
    name: str
    path: str
    prompt: str
    auxiliary: dict
    dimensions: tuple[str, ...] | None  # the dimensions scored on it (None: all)
    fps: float = 0.0
    num_frames: int = 0
    scenes: list[tuple[int, int]] = field(default_factory=list)
    cut: bool = False  # scenes come from detected cuts


def probe(video: Video, settings: EvalSettings) -> None:
    """fps / frame count as decord (VBench's reader) sees them, and the scenes."""
    from decord import VideoReader

    from core.eval.scenes import detect_scenes

    reader = VideoReader(video.path, num_threads=1)
    video.fps, video.num_frames = float(reader.get_avg_fps()), len(reader)
    detected = detect_scenes(video.path, settings.scene_threshold) if settings.scene_split else []
    video.cut = bool(detected)
    video.scenes = detected or [(0, video.num_frames)]


class ClipFiles:
    """`reencoded`: VBench-Long's own scene and clip files (vbench2_beta_long.utils), per clip length."""

    def __init__(self, work_dir: Path, threshold: float) -> None:
        self.work_dir, self.threshold = work_dir, threshold

    def scene_files(self, video: Video) -> list[str]:
        from vbench2_beta_long.utils import split_video_into_scenes

        if not video.cut:
            return [video.path]
        out = self.work_dir / "split_scene" / video.name
        if not out.is_dir():
            out.mkdir(parents=True)
            split_video_into_scenes(video.path, str(out), self.threshold)
        files = [str(out / f"{video.name}-Scene-{i}.mp4") for i in range(len(video.scenes))]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise RuntimeError(f"VBench-Long wrote {len(video.scenes) - len(missing)} scene files for "
                               f"{len(video.scenes)} detected scenes of {video.path}")
        return files

    def clips(self, video: Video, seconds: float, expected: list[tuple[int, int, int]]) -> list[str]:
        from vbench2_beta_long.utils import split_video_into_clips

        root = self.work_dir / f"split_clip_{int(seconds)}s"
        paths = []
        for scene_file in self.scene_files(video):
            stem = os.path.basename(scene_file).split(".mp4")[0]
            if not (root / stem).is_dir():
                split_video_into_clips(scene_file, str(root), int(seconds))
            paths.extend(sorted(str(p) for p in (root / stem).glob("*.mp4")))
        if len(paths) != len(expected):
            raise RuntimeError(f"VBench-Long cut {video.path} into {len(paths)} clips of {seconds} s, "
                               f"the spans say {len(expected)}")
        return paths


def _clip_items(videos: list[Video], dimension: str, settings: EvalSettings, virtual: VirtualClips,
                files: ClipFiles) -> tuple[list[list[tuple[int, int, int]]], list[list[ClipItem]]]:
    seconds = clip_seconds(dimension, settings.clip_seconds)
    spans, items = [], []
    for video in videos:
        clips = video_clips(video.scenes, video.fps, seconds, settings.mode)
        if settings.clip_source == "reencoded" and settings.mode == "long":
            paths = files.clips(video, seconds, clips)
        elif settings.clip_source == "reencoded":
            paths = [video.path]  # standard mode: the file itself is the one clip
        else:
            folder = files.work_dir / "virtual" / f"{int(seconds)}s" / video.name
            paths = [virtual.add(str(folder / f"{video.name}_{k:03d}.mp4"), video.path, range(start, end))
                     for k, (_, start, end) in enumerate(clips)]
        aux = video.auxiliary.get(dimension)
        spans.append(clips)
        items.append([ClipItem(p, video.prompt, aux) for p in paths])
    return spans, items


def _first_frames_video(video: Video, items: list[ClipItem], spans, settings: EvalSettings,
                        virtual: VirtualClips, work_dir: Path, dimension: str) -> str:
    """VBench-Long's clip-to-clip input: the first frame of every clip, as one video."""
    path = str(work_dir / f"{dimension}_cat_firstframes_videos" / f"{video.name}.mp4")
    if settings.clip_source == "frames":
        return virtual.add(path, video.path, [start for _, start, _ in spans])
    import torch
    from vbench.utils import load_video
    from vbench2_beta_long.utils import get_video_properties, save_segment

    os.makedirs(os.path.dirname(path), exist_ok=True)
    frames = torch.stack([load_video(item.path, return_tensor=True)[0] for item in items])
    save_segment(frames, get_video_properties(items[0].path)["fps"], path)
    return path


def score_dimension(videos: list[Video], dimension: str, settings: EvalSettings, virtual: VirtualClips,
                    files: ClipFiles, cache_dir: Path) -> dict[str, dict]:
    spans, items = _clip_items(videos, dimension, settings, virtual, files)
    flat = [item for per_video in items for item in per_video]
    with virtual.installed():
        scored = SCORERS[dimension](flat, settings.device)
    out, at = {}, 0
    for video, video_spans, video_items in zip(videos, spans, items, strict=True):
        clips = []
        for (scene, start, end), result in zip(video_spans, scored[at:at + len(video_spans)], strict=True):
            clips.append({"scene": scene, "start": start, "end": end, **result})
        at += len(video_spans)
        entry = {"clips": clips, "clip2clip": None}
        if settings.mode == "long" and dimension in SLOW_FAST_DIMENSIONS and len(clips) > 1:
            path = _first_frames_video(video, video_items, video_spans, settings, virtual, files.work_dir, dimension)
            with virtual.installed():
                entry["clip2clip"] = clip2clip_score(dimension, path, settings.device, settings.dev_flag,
                                                     str(cache_dir / "torch_hub"), str(cache_dir / "dreamsim"))
        out[video.name] = entry
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in ("vbench", "torch", "torchvision", "numpy", "transformers", "scenedetect", "decord",
                 "opencv-python", "av", "dreamsim", "openai-clip", "pyiqa", "timm"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def run(request: dict) -> dict:
    cache_dir, work_dir = Path(request["cache_dir"]), Path(request["work_dir"])
    os.environ["VBENCH_CACHE_DIR"] = str(cache_dir)  # vbench.utils reads it when first imported
    import torch

    from core.eval import compat

    compat.install()
    torch.hub.set_dir(str(cache_dir / "torch_hub"))
    settings = EvalSettings(**{**request["settings"], "dimensions": tuple(request["settings"]["dimensions"])})
    videos = [Video(v["name"], v["path"], v["prompt"], v.get("auxiliary") or {},
                    tuple(v["dimensions"]) if v.get("dimensions") is not None else None) for v in request["videos"]]
    for video in videos:
        probe(video, settings)
    virtual, files = VirtualClips(), ClipFiles(work_dir, settings.scene_threshold)
    per_dimension = {}
    for d in settings.dimensions:
        started = time.perf_counter()
        serving = [v for v in videos if v.dimensions is None or d in v.dimensions]
        per_dimension[d] = score_dimension(serving, d, settings, virtual, files, cache_dir) if serving else {}
        print(f"[longlive worker] {d}: {len(serving)} videos in {time.perf_counter() - started:.1f} s",
              file=sys.stderr, flush=True)
    return {"versions": versions(), "videos": {
        v.name: {"path": v.path, "fps": v.fps, "num_frames": v.num_frames, "scenes": [list(s) for s in v.scenes],
                 "dimensions": {d: per_dimension[d][v.name] for d in settings.dimensions if v.name in per_dimension[d]}}
        for v in videos}}


def main(argv: list[str]) -> int:
    request_path, response_path = argv
    with open(request_path, encoding="utf-8") as f:
        response = run(json.load(f))
    temp = response_path + ".tmp"
    with open(temp, "w", encoding="utf-8") as f:
        json.dump(response, f)
    os.replace(temp, response_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
