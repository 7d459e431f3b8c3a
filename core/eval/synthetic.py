"""Small synthetic videos with real scene cuts, for tests and offline trials of `eval-vbench`.

Each scene has its own background colour and a square moving across it (so the consistency,
flickering and flow metrics see real motion); consecutive scenes differ enough in hue and
brightness for PySceneDetect's ContentDetector at VBench-Long's threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

SCENE_COLOURS = ((20, 30, 140), (230, 210, 40), (200, 40, 170), (30, 160, 60), (240, 240, 240))


def scene_frames(scene_lengths: Sequence[int], width: int = 160, height: int = 128, seed: int = 0):
    """uint8 RGB frames `[T, H, W, 3]` (numpy), scene k filled with SCENE_COLOURS[k % 5]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    frames = []
    for k, length in enumerate(scene_lengths):
        colour = np.array(SCENE_COLOURS[k % len(SCENE_COLOURS)], dtype=np.int16)
        square = tuple(255 - c for c in colour)
        noise = rng.integers(-6, 7, size=(height, width, 3), dtype=np.int16)  # texture for the networks
        size, speed = height // 4, max(1, (width - height // 4) // max(1, length))
        for t in range(length):
            frame = np.clip(colour + noise, 0, 255).astype(np.uint8)
            x, y = min(width - size, t * speed), (height - size) // 2 + int(8 * np.sin(t / 3))
            frame[y:y + size, x:x + size] = square
            frames.append(frame)
    return np.stack(frames)


def write_video(path: str | Path, frames, fps: float, crf: int = 18) -> None:
    """H.264 (yuv420p) mp4 with PyAV; `fps` may be fractional (e.g. 24000/1001)."""
    from fractions import Fraction

    import av

    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_scene_video(path: str | Path, scene_lengths: Sequence[int], fps: float = 8.0, width: int = 160,
                      height: int = 128, seed: int = 0) -> None:
    """A video whose scenes have the given lengths in frames (ContentDetector needs >= 15 each)."""
    write_video(path, scene_frames(scene_lengths, width, height, seed), fps)
