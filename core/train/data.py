"""Training clips: (multi-shot) videos -> fixed-length pixel clips with one prompt per latent chunk.

A *sample* is an ordered list of *clips*, each one shot with its caption:
  official layout  root/video/<sample>/<n>.mp4|avi|mov|mkv|webm + root/caption/<sample>/<n>.json with a
                   non-empty "caption"; a clip is one captioned video, clips ordered by integer stem.
  JSONL manifest   one sample per line: {"video": path relative to the manifest, "caption": str,
                   "shots": optional [{"start": s, "end": s, "caption": str}]}; a clip is one shot (or the
                   whole video when there are no shots).
An item is `T = (F - 1) * 4 + 1` frames cut into segments, one per chunk of `frames_per_block` latent
frames: the first `1 + (fpb - 1) * 4` frames, then `4 * fpb` frames each. Segments are taken from
consecutive clips at 24 fps and never straddle a clip; a segment whose clip differs from the previous
segment's, or that follows `max_chunks_per_shot` chunks of one clip (a virtual cut: 1 s of the clip
is skipped), gets the scene-cut prefix on its caption. Planning (which frames, which prompts) is
pure arithmetic on the clips' frame counts; only the planned frames are decoded.

Shape legend: N decoded frames, T frames of an item, H height, W width, C = 3 colour channels,
B batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.config import VAE_TEMPORAL_STRIDE, VIDEO_FPS
from core.errors import UserError, first_line, first_names
from core.shots import SCENE_CUT_PREFIX

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
START_CANDIDATES_PER_CLIP = 50  # random start positions considered per clip (as the official loader)
SEEK_MIN_FRAMES = 96  # decode from the start below this many frames; seek to a keyframe beyond


# ----------------------------------------------------------------------------------------------
# What a sample is made of.


@dataclass(frozen=True)
class Clip:
    """One shot: a whole video, or the `[start_s, end_s)` part of one (seconds)."""

    path: Path
    caption: str
    start_s: float | None = None
    end_s: float | None = None


@dataclass(frozen=True)
class SampleSpec:
    """A sample as scanned: its name (folder, or manifest video) and its clips in order."""

    name: str
    clips: tuple[Clip, ...]


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float


@dataclass(frozen=True)
class Span:
    """A clip resolved against its video: frames `[begin, end)` at the video's own `fps`."""

    clip: Clip
    begin: int
    end: int
    fps: float


@dataclass(frozen=True)
class Segment:
    """The frames of one chunk: video frame indices inside span `span_index`."""

    span_index: int
    frame_indices: tuple[int, ...]
    scene_cut: bool


@dataclass
class TrainSample:
    """One training item. `video [C, T, H, W]` in [-1, 1]; `prompts` has one entry per chunk."""

    video: Tensor
    prompts: list[str]
    num_valid_latent_frames: int
    source: str
    index: int = -1  # the sample actually read (a skipped sample falls through to the next one)

    @property
    def scene_cuts(self) -> list[bool]:
        return [p.startswith(SCENE_CUT_PREFIX) for p in self.prompts]


@dataclass
class TrainBatch:
    """`video [B, C, T, H, W]`, `prompts[b][chunk]`, `num_valid_latent_frames [B]` (int64)."""

    video: Tensor
    prompts: list[list[str]]
    num_valid_latent_frames: Tensor
    sources: list[str]
    indices: list[int]

    def pin_memory(self) -> TrainBatch:  # used by DataLoader(pin_memory=True)
        return TrainBatch(self.video.pin_memory(), self.prompts, self.num_valid_latent_frames.pin_memory(),
                          self.sources, self.indices)


def collate(batch: Sequence[TrainSample]) -> TrainBatch:
    """Stack frames; prompts stay one list per sample (`List[List[str]]`, as the official loader)."""
    return TrainBatch(
        video=torch.stack([s.video for s in batch]),
        prompts=[list(s.prompts) for s in batch],
        num_valid_latent_frames=torch.tensor([s.num_valid_latent_frames for s in batch], dtype=torch.long),
        sources=[s.source for s in batch],
        indices=[s.index for s in batch],
    )


# ----------------------------------------------------------------------------------------------
# Scanning (at construction: captions and paths only, no video is opened).


def _stem_order(path: Path) -> tuple[float, str]:
    try:
        return (int(path.stem), path.name)
    except ValueError:
        return (math.inf, path.name)  # non-numeric stems after numeric ones, by name


def _read_caption(path: Path) -> str:
    """The non-empty "caption" of a caption file, or "" (missing, unreadable or empty: clip ignored)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        if path.exists():
            logger.warning("ignoring %s: unreadable caption file (%s)", path, err)
        return ""
    caption = data.get("caption") if isinstance(data, dict) else None
    return caption.strip() if isinstance(caption, str) else ""


def scan_official(root: Path) -> list[SampleSpec]:
    """Samples of the official folder layout, keeping only captioned videos."""
    video_root, caption_root = root / "video", root / "caption"
    samples = []
    folders = sorted(d for d in video_root.iterdir() if d.is_dir()) if video_root.is_dir() else []
    for folder in folders:
        videos = sorted((p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()),
                        key=_stem_order)
        clips = []
        for video in videos:
            caption = _read_caption(caption_root / folder.name / f"{video.stem}.json")
            if caption:
                clips.append(Clip(video, caption))
        if clips:
            samples.append(SampleSpec(folder.name, tuple(clips)))
    return samples


def _manifest_error(manifest: Path, line_no: int, problem: str) -> UserError:
    return UserError(f"{manifest}:{line_no}: {problem} (each line is a JSON object "
                     '{"video": path, "caption": text, "shots": [{"start": s, "end": s, "caption": text}]})')


def scan_manifest(manifest: Path) -> list[SampleSpec]:
    """Samples of a JSONL manifest; entries with no caption at all are ignored."""
    samples = []
    for line_no, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise _manifest_error(manifest, line_no, f"not JSON ({err.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("video"), str):
            raise _manifest_error(manifest, line_no, 'no "video" path')
        path = manifest.parent / entry["video"]
        caption = entry.get("caption") if isinstance(entry.get("caption"), str) else ""
        shots = entry.get("shots") or []
        if not isinstance(shots, list):
            raise _manifest_error(manifest, line_no, '"shots" must be a list')
        clips = []
        for shot in sorted(shots, key=lambda s: s.get("start", 0.0) if isinstance(s, dict) else 0.0):
            try:
                start_s, end_s = float(shot["start"]), float(shot["end"])
            except (TypeError, KeyError, ValueError):
                raise _manifest_error(manifest, line_no, 'every shot needs numeric "start" and "end"') from None
            shot_caption = shot.get("caption") if isinstance(shot.get("caption"), str) else ""
            shot_caption = shot_caption.strip() or caption.strip()
            if shot_caption and end_s > start_s:
                clips.append(Clip(path, shot_caption, start_s, end_s))
        if not shots and caption.strip():
            clips.append(Clip(path, caption.strip()))
        if clips:
            samples.append(SampleSpec(entry["video"], tuple(clips)))
    return samples


# ----------------------------------------------------------------------------------------------
# Video reading (PyAV).


class UnreadableVideo(Exception):
    """A video that cannot be opened or decoded (the clip is skipped with a warning)."""


def _video_errors() -> tuple[type[BaseException], ...]:
    import av

    return (av.error.FFmpegError, OSError, UnreadableVideo)


def probe_video(path: Path) -> VideoInfo:
    """Frame count and frame rate from the container (frames counted from packets when not stored)."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise UnreadableVideo("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate or float(rate) <= 0:
            raise UnreadableVideo("no frame rate")
        num_frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    if num_frames <= 0:
        raise UnreadableVideo("no frames")
    return VideoInfo(int(num_frames), float(rate))


def read_frames(path: Path, indices: Sequence[int], seek_min_frames: float = SEEK_MIN_FRAMES) -> np.ndarray:
    """uint8 `[N, H, W, C]` RGB frames at the given (ascending) indices; decodes only up to the last.

    When the first index is at least `seek_min_frames`, seek to the keyframe before it and number
    frames by their timestamps; otherwise decode from the start and count frames."""
    import av

    wanted = set(indices)
    last = max(indices)
    frames: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate)
        start_pts = stream.start_time or 0
        seeking = min(indices) >= seek_min_frames
        if seeking:
            target_s = max(0.0, (min(indices) - 0.5) / fps)  # half a frame early: stay before the frame
            container.seek(start_pts + int(target_s / stream.time_base), stream=stream, backward=True)
        for count, frame in enumerate(container.decode(stream)):
            if seeking and frame.pts is None:  # no timestamps to number frames by: count from the start
                return read_frames(path, indices, seek_min_frames=math.inf)
            index = round(float((frame.pts - start_pts) * stream.time_base) * fps) if seeking else count
            if index in wanted and index not in frames:
                frames[index] = frame.to_ndarray(format="rgb24")
            if index >= last:
                break
    missing = sorted(wanted - frames.keys())
    if missing:
        raise UnreadableVideo(f"frames from {missing[0]} on could not be decoded")
    return np.stack([frames[i] for i in indices])


def to_model_pixels(frames_NHWC: np.ndarray, height: int, width: int) -> Tensor:
    """uint8 frames -> float32 `[C, N, H, W]` in [-1, 1]: centre crop to H:W, antialiased bilinear resize."""
    src_h, src_w = frames_NHWC.shape[1:3]
    if src_w * height > width * src_h:  # too wide: crop columns
        crop_w = round(src_h * width / height)
        left = (src_w - crop_w) // 2
        frames_NHWC = frames_NHWC[:, :, left:left + crop_w]
    elif src_w * height < width * src_h:  # too tall: crop rows
        crop_h = round(src_w * height / width)
        top = (src_h - crop_h) // 2
        frames_NHWC = frames_NHWC[:, top:top + crop_h]
    x_NCHW = torch.from_numpy(np.ascontiguousarray(frames_NHWC)).permute(0, 3, 1, 2).float() / 255.0
    if x_NCHW.shape[-2:] != (height, width):
        x_NCHW = F.interpolate(x_NCHW, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return (x_NCHW * 2.0 - 1.0).clamp_(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


# ----------------------------------------------------------------------------------------------
# Planning: which frames and prompts make an item (no decoding).


def segment_lengths(latent_frames: int, frames_per_block: int) -> list[int]:
    """Raw frames per chunk: `1 + (fpb - 1) * 4`, then `4 * fpb` each; they sum to `(F - 1) * 4 + 1`."""
    chunks = latent_frames // frames_per_block
    first = 1 + (frames_per_block - 1) * VAE_TEMPORAL_STRIDE
    return [first] + [frames_per_block * VAE_TEMPORAL_STRIDE] * (chunks - 1)


def _fits(span: Span, start: int, num_frames: int, target_fps: float) -> bool:
    step = span.fps / target_fps
    return span.begin <= start < span.end and round(start + (num_frames - 1) * step) < span.end


def plan_segments(spans: Sequence[Span], span_index: int, start: int, lengths: Sequence[int],
                  target_fps: float = VIDEO_FPS, max_chunks_per_shot: int | None = None) -> list[Segment]:
    """Segments from position (span_index, start) onward, never going back to an earlier span.

    Frames are resampled by stepping `fps / target_fps` source frames and rounding each index. A
    segment that does not fit in the rest of its span moves to the next span. The result is
    shorter than `lengths` when the spans run out."""
    segments: list[Segment] = []
    chunks_in_shot = 0  # consecutive chunks taken from the current span
    for num_frames in lengths:
        if span_index >= len(spans):
            break
        virtual_cut = bool(max_chunks_per_shot) and chunks_in_shot >= max_chunks_per_shot
        if virtual_cut:
            start += round(spans[span_index].fps)  # skip 1 s so the new "shot" does not continue the old
            chunks_in_shot = 0
        while span_index < len(spans) and not _fits(spans[span_index], start, num_frames, target_fps):
            span_index += 1
            chunks_in_shot = 0
            if span_index < len(spans):
                start = spans[span_index].begin
        if span_index >= len(spans):
            break
        span = spans[span_index]
        step = span.fps / target_fps
        cut = bool(segments) and (virtual_cut or span_index != segments[-1].span_index)
        segments.append(Segment(span_index, tuple(round(start + k * step) for k in range(num_frames)), cut))
        chunks_in_shot += 1
        next_start = round(start + num_frames * step)
        if next_start >= span.end:
            span_index += 1
            chunks_in_shot = 0
            start = spans[span_index].begin if span_index < len(spans) else 0
        else:
            start = next_start
    return segments


def start_candidates(spans: Sequence[Span], lengths: Sequence[int], target_fps: float = VIDEO_FPS,
                     max_chunks_per_shot: int | None = None) -> list[tuple[int, int]]:
    """Start positions (span, frame) from which every segment can be taken without padding."""
    candidates = []
    for span_index, span in enumerate(spans):
        step = span.fps / target_fps
        max_start = math.floor(span.end - 1 - (lengths[0] - 1) * step)
        if max_start < span.begin:
            continue
        stride = max(1, (max_start - span.begin) // START_CANDIDATES_PER_CLIP)
        for start in range(span.begin, max_start + 1, stride):
            plan = plan_segments(spans, span_index, start, lengths, target_fps, max_chunks_per_shot)
            if len(plan) == len(lengths):
                candidates.append((span_index, start))
    return candidates


# ----------------------------------------------------------------------------------------------
# The dataset.


class SkippedSample(Exception):
    """A sample that cannot give an item (the reason names its files); the next sample is used."""


@dataclass
class _ResolvedSample:
    spans: list[Span]
    starts: list[tuple[int, int]]


class VideoClipDataset(torch.utils.data.Dataset):
    """Map-style dataset of fixed-length training clips with per-chunk prompts (see module doc).

    `dataset[i]` depends only on (seed, epoch, i): call `set_epoch(e)` before each epoch.
    Unreadable or too-short videos are skipped with a warning naming them; the item then comes from
    the next usable sample. `allow_padding` repeats the last frame and caption (unprefixed) to fill
    a short sample and reports the filled chunks in `num_valid_latent_frames`; `min_latent_frames`
    rejects samples with fewer valid latent frames."""

    def __init__(self, root_or_manifest: str | os.PathLike, latent_frames: int, height: int, width: int,
                 frames_per_block: int = 8, max_chunks_per_shot: int | None = None, allow_padding: bool = True,
                 min_latent_frames: int = 0, fps: int = VIDEO_FPS, seed: int = 0, deterministic: bool = False,
                 dtype: torch.dtype = torch.float32):
        if frames_per_block <= 0 or latent_frames <= 0 or latent_frames % frames_per_block:
            raise ValueError(f"latent_frames ({latent_frames}) must be a positive multiple of "
                             f"frames_per_block ({frames_per_block})")
        if height <= 0 or width <= 0 or fps <= 0:
            raise ValueError(f"height, width and fps must be positive (got {height}, {width}, {fps})")
        if min_latent_frames % frames_per_block or min_latent_frames > latent_frames:
            raise ValueError(f"min_latent_frames ({min_latent_frames}) must be a multiple of frames_per_block "
                             f"({frames_per_block}) and at most latent_frames ({latent_frames})")
        if max_chunks_per_shot is not None and max_chunks_per_shot < 0:
            raise ValueError(f"max_chunks_per_shot must be >= 0 or None (got {max_chunks_per_shot})")
        self.root = Path(root_or_manifest)
        self.latent_frames, self.height, self.width = latent_frames, height, width
        self.frames_per_block = frames_per_block
        self.max_chunks_per_shot = max_chunks_per_shot or None  # 0 and None: no limit
        self.allow_padding, self.min_latent_frames = allow_padding, min_latent_frames
        self.fps, self.seed, self.deterministic, self.dtype = fps, seed, deterministic, dtype
        self.epoch = 0
        self.lengths = segment_lengths(latent_frames, frames_per_block)
        self.num_frames = (latent_frames - 1) * VAE_TEMPORAL_STRIDE + 1
        assert sum(self.lengths) == self.num_frames
        self.samples = self._scan()
        # Per-process caches (each DataLoader worker fills its own).
        self._video_info: dict[Path, VideoInfo] = {}
        self._unreadable: set[Path] = set()
        self._resolved: dict[int, _ResolvedSample] = {}
        self._skipped: set[int] = set()

    def _scan(self) -> list[SampleSpec]:
        if self.root.is_file():
            samples = scan_manifest(self.root)
            if not samples:
                raise UserError(f"no captioned video in manifest {self.root} (expected JSON lines like "
                                '{"video": "clip.mp4", "caption": "a dog runs"})')
            return samples
        if not self.root.is_dir():
            raise UserError(f"training data {self.root} not found (give a dataset folder or a .jsonl manifest)")
        samples = scan_official(self.root)
        if not samples:
            raise UserError(f"no captioned video in {self.root} (expected {self.root}/video/<sample>/<n>.mp4 "
                            f'with {self.root}/caption/<sample>/<n>.json holding a non-empty "caption")')
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_chunks(self) -> int:
        return self.latent_frames // self.frames_per_block

    def __getitem__(self, index: int) -> TrainSample:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range ({len(self)} samples)")
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self._skipped:
                continue
            try:
                return self._load(candidate)
            except SkippedSample as skip:
                self._skipped.add(candidate)
                logger.warning("skipping training sample %s", skip)
        raise UserError(f"no usable training sample in {self.root} ({len(self)} skipped, see the warnings above)")

    # -- one sample

    def _drop_video(self, path: Path, err: BaseException) -> None:
        """Never use `path` again in this process (one warning naming it)."""
        self._unreadable.add(path)
        logger.warning("skipping unreadable video %s (%s)", path, first_line(err))

    def _info(self, path: Path) -> VideoInfo | None:
        """Cached probe; None (and one warning) for an unreadable video."""
        if path in self._unreadable:
            return None
        if path not in self._video_info:
            try:
                self._video_info[path] = probe_video(path)
            except _video_errors() as err:
                self._drop_video(path, err)
                return None
        return self._video_info[path]

    def _resolve(self, sample_index: int) -> _ResolvedSample:
        if sample_index in self._resolved:
            return self._resolved[sample_index]
        spans = []
        for clip in self.samples[sample_index].clips:
            info = self._info(clip.path)
            if info is None:
                continue
            begin = 0 if clip.start_s is None else max(0, round(clip.start_s * info.fps))
            end = info.num_frames if clip.end_s is None else min(info.num_frames, round(clip.end_s * info.fps))
            if end > begin:
                spans.append(Span(clip, begin, end, info.fps))
        resolved = _ResolvedSample(spans, start_candidates(spans, self.lengths, self.fps, self.max_chunks_per_shot))
        self._resolved[sample_index] = resolved
        return resolved

    def _describe(self, spans: Sequence[Span]) -> str:
        return first_names([f"{s.clip.path} ({s.end - s.begin} frames at {s.fps:g} fps)" for s in spans])

    def _plan(self, sample_index: int) -> tuple[list[Span], list[Segment]]:
        spec = self.samples[sample_index]
        resolved = self._resolve(sample_index)
        spans = resolved.spans
        if not spans:
            raise SkippedSample(f"{spec.name}: no readable video "
                                f"({first_names([str(c.path) for c in spec.clips])})")
        if self.deterministic or not resolved.starts:
            span_index, start = 0, spans[0].begin
        else:
            rng = np.random.default_rng([self.seed, self.epoch, sample_index])
            span_index, start = resolved.starts[int(rng.integers(len(resolved.starts)))]
        segments = plan_segments(spans, span_index, start, self.lengths, self.fps, self.max_chunks_per_shot)
        if not segments:
            raise SkippedSample(f"{spec.name}: too short, no video has the {self.lengths[0]} frames of a first "
                                f"chunk at {self.fps} fps: {self._describe(spans)}")
        valid = len(segments) * self.frames_per_block
        if len(segments) < self.num_chunks and not self.allow_padding:
            raise SkippedSample(f"{spec.name}: too short, {len(segments)} of {self.num_chunks} chunks with "
                                f"allow_padding off: {self._describe(spans)}")
        if valid < self.min_latent_frames:
            raise SkippedSample(f"{spec.name}: too short, {valid} valid latent frames < min_latent_frames "
                                f"{self.min_latent_frames}: {self._describe(spans)}")
        return spans, segments

    def _load(self, sample_index: int) -> TrainSample:
        spans, segments = self._plan(sample_index)
        pieces_CNHW, prompts = [], []
        run: list[Segment] = []  # consecutive segments of one video file: decoded in one pass

        def flush() -> None:
            path = spans[run[0].span_index].clip.path
            indices = [i for seg in run for i in seg.frame_indices]
            frames_NHWC = read_frames(path, indices)
            pieces_CNHW.append(to_model_pixels(frames_NHWC, self.height, self.width).to(self.dtype))
            run.clear()

        try:
            for seg in segments:
                if run and spans[run[-1].span_index].clip.path != spans[seg.span_index].clip.path:
                    flush()
                run.append(seg)
                caption = spans[seg.span_index].clip.caption
                prompts.append(SCENE_CUT_PREFIX + caption if seg.scene_cut else caption)
            flush()
        except _video_errors() as err:  # drop the video and plan the sample again without it
            self._drop_video(spans[run[0].span_index].clip.path, err)
            self._resolved.pop(sample_index, None)
            return self._load(sample_index)
        video_CTHW = torch.cat(pieces_CNHW, dim=1)
        missing = self.num_frames - video_CTHW.shape[1]
        if missing:  # padding: repeat the last frame; the padded chunks repeat the last caption, unprefixed
            video_CTHW = torch.cat([video_CTHW, video_CTHW[:, -1:].expand(-1, missing, -1, -1)], dim=1)
            prompts += [spans[segments[-1].span_index].clip.caption] * (self.num_chunks - len(segments))
        assert video_CTHW.shape[1] == self.num_frames and len(prompts) == self.num_chunks
        return TrainSample(video_CTHW, prompts, len(segments) * self.frames_per_block,
                           self.samples[sample_index].name, sample_index)


# ----------------------------------------------------------------------------------------------
# Sharding and the data position.


@dataclass(frozen=True)
class DataPosition:
    """Where a data-parallel rank stands: `position` samples of epoch `epoch` consumed."""

    epoch: int = 0
    position: int = 0


class ShardedSampler(torch.utils.data.Sampler):
    """This data-parallel rank's share of a per-epoch shuffle (one seed shared by all ranks).

    Ranks of one sequence-parallel group pass the same `dp_rank` and get the same indices. Iterating
    yields the rest of the current epoch from the saved position and does not move it: the trainer
    calls `advance(n)` after consuming n samples (so prefetched samples are not counted), and
    `state_dict()` / `load_state_dict()` save and restore the position exactly. With `drop_last`
    the tail that does not divide evenly is dropped, else the shuffle is repeated to fill it."""

    def __init__(self, dataset_len: int, dp_rank: int, dp_size: int, seed: int, drop_last: bool = True):
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        if dataset_len < (dp_size if drop_last else 1):
            raise ValueError(f"{dataset_len} samples cannot be shared by {dp_size} data-parallel ranks")
        self.dataset_len, self.dp_rank, self.dp_size = dataset_len, dp_rank, dp_size
        self.seed, self.drop_last = seed, drop_last
        self.epoch = 0
        self.position = 0  # samples of this epoch consumed by the trainer
        self._epoch_cache: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        """Samples per epoch on this rank."""
        if self.drop_last:
            return self.dataset_len // self.dp_size
        return -(-self.dataset_len // self.dp_size)

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices of an epoch, in order."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.dataset_len).tolist()
            total = len(self) * self.dp_size
            order = (order * -(-total // len(order)))[:total]
            self._epoch_cache = (epoch, order[self.dp_rank::self.dp_size])
        return self._epoch_cache[1]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.position:])

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def advance(self, num_samples: int) -> None:
        """Mark samples consumed; at the end of an epoch the position moves to the next epoch's start."""
        self.position += num_samples
        assert self.position <= len(self), "consumed more samples than the epoch holds"
        if self.position == len(self):
            self.set_epoch(self.epoch + 1)

    @property
    def data_position(self) -> DataPosition:
        return DataPosition(self.epoch, self.position)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(f"data position {position} is outside an epoch of {len(self)} samples")
        self.epoch, self.position = epoch, position
