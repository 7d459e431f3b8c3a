"""In-memory clips for vbench's own loaders (`--clip-source frames`; runs in the VBench environment).

VBench reads a video either with decord (`vbench.utils.load_video`, `read_frames_decord_by_fps`)
or with OpenCV (`cv2.VideoCapture`: temporal flickering, motion smoothness, dynamic degree).
A clip here is a path that names no file, mapped to frame indices of a source video; while
`VirtualClips.installed()` is active, both readers serve such a path from the source decoded
by that same library (decord with the same resize arguments), so each dimension sees exactly
the frames it would decode from the whole file, restricted to the span. Real paths pass through.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class ClipSource:
    source: str  # the real video file
    indices: tuple[int, ...]  # its frames, in order


class _DecordClip:
    """decord.VideoReader's surface that vbench uses, over a subset of a real reader's frames."""

    def __init__(self, reader, indices: Sequence[int]) -> None:
        self._reader, self._indices = reader, indices

    def __len__(self) -> int:
        return len(self._indices)

    def get_avg_fps(self) -> float:
        return self._reader.get_avg_fps()

    def get_batch(self, indices) -> object:
        return self._reader.get_batch([self._indices[int(i)] for i in indices])

    def __getitem__(self, index: int) -> object:
        return self._reader[self._indices[index]]


class _OpenCVClip:
    """cv2.VideoCapture's surface that vbench uses (isOpened / read / get(FPS) / release)."""

    def __init__(self, frames: list, fps: float, fps_property: int) -> None:
        self._frames, self._fps, self._fps_property = frames, fps, fps_property
        self._next, self._open = 0, True

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return self._open

    def read(self) -> tuple[bool, object]:
        if not self._open or self._next >= len(self._frames):
            return False, None
        frame = self._frames[self._next].copy()
        self._next += 1
        return True, frame

    def get(self, prop: int) -> float:
        if prop != self._fps_property:
            raise NotImplementedError(f"a virtual clip answers only CAP_PROP_FPS, not property {prop}")
        return self._fps

    def release(self) -> None:
        self._open = False


class VirtualClips:
    """Registry of clip paths -> ClipSource, and the patched readers that serve them."""

    def __init__(self) -> None:
        self.clips: dict[str, ClipSource] = {}
        self._decord_readers: dict[tuple, object] = {}
        self._opencv_frames: tuple[str, list, float] | None = None  # one decoded source at a time

    def add(self, path: str, source: str, indices: Sequence[int]) -> str:
        if not path.endswith(".mp4"):
            raise ValueError(f"{path}: vbench dispatches on the .mp4 suffix; name clips *.mp4")
        self.clips[path] = ClipSource(source, tuple(int(i) for i in indices))
        return path

    def _decord_reader(self, real_reader, source: str, kwargs: dict) -> object:
        key = (source, tuple(sorted(kwargs.items())))
        if key not in self._decord_readers:
            self._decord_readers.clear()  # keep one source's readers open
        if key not in self._decord_readers:
            self._decord_readers[key] = real_reader(source, **kwargs)
        return self._decord_readers[key]

    def _opencv_source(self, real_capture, source: str, fps_property: int) -> tuple[list, float]:
        if self._opencv_frames is None or self._opencv_frames[0] != source:
            self._opencv_frames = None  # drop the previous source's frames first
            capture, frames = real_capture(source), []
            fps = capture.get(fps_property)
            while capture.isOpened():
                ok, frame = capture.read()
                if not ok:
                    break
                frames.append(frame)
            capture.release()
            self._opencv_frames = (source, frames, fps)
        return self._opencv_frames[1], self._opencv_frames[2]

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Patch `vbench.utils.VideoReader` and `cv2.VideoCapture` while scoring."""
        import cv2
        import vbench.utils as vbench_utils

        real_reader, real_capture = vbench_utils.VideoReader, cv2.VideoCapture

        def video_reader(path, *args, **kwargs):
            clip = self.clips.get(str(path))
            if clip is None:
                return real_reader(path, *args, **kwargs)
            return _DecordClip(self._decord_reader(real_reader, clip.source, kwargs), clip.indices)

        def video_capture(path, *args, **kwargs):
            clip = self.clips.get(str(path))
            if clip is None:
                return real_capture(path, *args, **kwargs)
            frames, fps = self._opencv_source(real_capture, clip.source, cv2.CAP_PROP_FPS)
            return _OpenCVClip([frames[i] for i in clip.indices], fps, cv2.CAP_PROP_FPS)

        vbench_utils.VideoReader, cv2.VideoCapture = video_reader, video_capture
        try:
            yield
        finally:
            vbench_utils.VideoReader, cv2.VideoCapture = real_reader, real_capture
