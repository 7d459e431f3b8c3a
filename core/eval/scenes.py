"""Scene cuts with PySceneDetect's ContentDetector, as VBench-Long's `split_video_into_scenes`."""

from __future__ import annotations


def detect_scenes(path: str, threshold: float) -> list[tuple[int, int]]:
    """Scenes `[start, end)` in frames; empty when no cut is found (VBench-Long then keeps the video whole)."""
    from scenedetect import ContentDetector, SceneManager, open_video

    video = open_video(path)
    manager = SceneManager()
    manager.add_detector(ContentDetector(threshold=threshold))
    manager.detect_scenes(video, show_progress=False)
    return [(int(start.get_frames()), int(end.get_frames())) for start, end in manager.get_scene_list()]
