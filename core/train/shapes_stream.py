"""Shapes-world training batches rendered on the training device, from a seed, without files.

Item `i` holds what sample `i` of `make_synthetic_dataset(seed=seed)` holds when `VideoClipDataset`
reads it at epoch 0: the same shots (`random_shots` from `[seed, i]`), the same start among the same
candidates (`start_candidates` / `plan_segments` from `[seed, 0, i]`), the same per-chunk prompts with
the scene-cut prefix, but rendered exactly (no H.264 round trip) and never repeated: the stream has
no epochs, so a run sees as many different samples as it takes steps. Rendering is `render_clip`'s
own formulas in float64 on tensors (`render_frames`), batched over every frame of a batch, so the
data costs the GPU microseconds where decoding written videos costs the CPU ~0.1 s per sample.

`sink_gap` (a probability) moves, for that share of items, every chunk after the first that shows
the first chunk's shot to a random later moment of that shot (1 to `MAX_SINK_GAP_FRAMES` frames
on): the layout a rolling KV window attends to once a video outgrows it (the first chunk kept as
the sink, the history ahead of it by any time), which continuous clips never show the model.

`shot_frames` may be several lengths: each item then draws one of them (uniformly, from its own
seed) for all its shots. Long shots teach a shot's continuation; short ones put two or three shots
in one clip, as a multi-shot video's window holds them after its second cut (the first chunk from
the first shot as the sink, the second shot as history, the third starting).

The stream also plays the trainer's sampler: `advance(n)` after a step, `state_dict()` in every
checkpoint, so a resumed run continues with the next unseen item.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from core.config import VIDEO_FPS
from core.errors import UserError
from core.shots import SCENE_CUT_PREFIX
from core.train.data import Clip, Segment, Span, TrainBatch, plan_segments, segment_lengths, start_candidates
from core.train.synthetic import (
    COLOURS,
    ClipSpec,
    is_horizontal,
    random_shots,
    shape_centre,
    shape_coverage,
    shape_size,
)

MAX_SINK_GAP_FRAMES = 60 * VIDEO_FPS  # a minute: the shapes world's motion wraps, any gap draws a valid frame
FRAMES_PER_RENDER = 512  # frames rendered at once: bounds the float64 temporaries (~70 MB each at 128x128)


def render_frames(specs: list[ClipSpec], phases: Tensor, frames: Tensor, height: int, width: int,
                  offset: float = 0.5) -> Tensor:
    """uint8 `[N, H, W, C]`: frame `frames[n]` of a clip showing `specs[n]` started at `phases[n]`,
    equal to `render_clip(specs[n], ..., phase=phases[n], offset=offset)[frames[n]]`: the same
    `shape_centre` / `shape_coverage` in float64, on `frames.device`, for all frames of one shape
    and direction at once."""
    device = frames.device
    f64 = dict(device=device, dtype=torch.float64)
    background = torch.tensor([COLOURS[s.background] for s in specs], **f64)
    colour = torch.tensor([COLOURS[s.colour] for s in specs], **f64)
    groups: dict[tuple[str, str], list[int]] = {}
    for n, spec in enumerate(specs):
        groups.setdefault((spec.shape, spec.direction), []).append(n)
    ys = torch.arange(height, **f64)[None, :, None]
    xs = torch.arange(width, **f64)[None, None, :]
    size = shape_size(height, width)
    out = torch.empty(len(specs), height, width, 3, device=device, dtype=torch.uint8)
    for (shape, direction), members in groups.items():
        for lo in range(0, len(members), FRAMES_PER_RENDER):
            rows = torch.tensor(members[lo:lo + FRAMES_PER_RENDER], device=device)
            centres_x, centres_y = shape_centre(direction, frames[rows].to(**f64), height, width,
                                                phases[rows].to(**f64), offset)
            horizontal = is_horizontal(direction)
            cover = torch.zeros(len(rows), height, width, **f64)
            for wrap in (-1, 0, 1):  # the copies one frame-width away, as render_clip
                cx = centres_x + (wrap * width if horizontal else 0)
                cy = centres_y + (0 if horizontal else wrap * height)
                cover = torch.maximum(cover, shape_coverage(shape, xs, ys, cx[:, None, None], cy[:, None, None], size))
            pixels = background[rows, None, None] + cover[..., None] * (colour[rows] - background[rows])[:, None, None]
            out[rows] = pixels.round().clamp(0, 255).to(torch.uint8)  # round half to even, as np.rint
    return out


class ShapesStream:
    """Endless batches of shapes-world items rendered on `device` (module doc); the sampler too.

    Rank `dp_rank` of `dp_size` takes items `dp_rank, dp_rank + dp_size, ...` in order."""

    def __init__(self, batch_size: int, latent_frames: int, frames_per_block: int, height: int, width: int,
                 shots: int, shot_frames: int | Sequence[int], seed: int, device: torch.device,
                 max_chunks_per_shot: int | None = None, dp_rank: int = 0, dp_size: int = 1,
                 sink_gap: float = 0.0):
        if not 0 <= sink_gap <= 1:
            raise ValueError(f"sink_gap is a probability (got {sink_gap})")
        self.batch_size, self.height, self.width = batch_size, height, width
        self.sink_gap = sink_gap
        self.latent_frames, self.shots = latent_frames, shots
        self.shot_frames = (shot_frames,) if isinstance(shot_frames, int) else tuple(shot_frames)
        if not self.shot_frames:
            raise ValueError("shot_frames needs at least one length")
        self.seed, self.device = seed, device
        self.max_chunks_per_shot = max_chunks_per_shot or None
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.lengths = segment_lengths(latent_frames, frames_per_block)
        self.position = 0  # items this rank has consumed
        # all shots of an item span the same frames, so its possible starts and their chunk plans
        # depend only on the item's shot length (the captions differ): planned once per length
        self._plans: dict[int, list[list[Segment]]] = {}
        for frames in self.shot_frames:
            spans = [Span(Clip(Path(f"shot_{n}"), ""), 0, frames, VIDEO_FPS) for n in range(shots)]
            starts = start_candidates(spans, self.lengths, VIDEO_FPS, self.max_chunks_per_shot)
            if not starts:
                raise UserError(f"data.synthetic_shot_frames={frames}: shots this short cannot hold a first "
                                f"chunk of {self.lengths[0]} frames (raise it to at least {self.lengths[0]})")
            self._plans[frames] = [plan_segments(spans, *start, self.lengths, VIDEO_FPS, self.max_chunks_per_shot)
                                   for start in starts]

    # -- the sampler's part

    def advance(self, num_samples: int) -> None:
        self.position += num_samples

    def state_dict(self) -> dict[str, int]:
        return {"stream_position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["stream_position"])

    # -- items and batches

    def plan(self, index: int) -> tuple[list[tuple[ClipSpec, float, tuple[int, ...]]], list[str]]:
        """Item `index`: per chunk (its shot's spec, the shot's phase, the shot's frame indices), and
        the per-chunk prompts."""
        shots = random_shots(np.random.default_rng([self.seed, index]), self.shots)
        rng = np.random.default_rng([self.seed, 0, index])  # VideoClipDataset's draw at epoch 0
        plans = self._plans[self._shot_frames(index)]
        segments = plans[int(rng.integers(len(plans)))]
        gap = self._gap(index)
        chunks = [(shots[s.span_index][0], shots[s.span_index][1],
                   tuple(f + gap for f in s.frame_indices) if k > 0 and s.span_index == segments[0].span_index
                   else s.frame_indices)
                  for k, s in enumerate(segments)]
        prompts = [SCENE_CUT_PREFIX + spec.caption if s.scene_cut else spec.caption
                   for s, (spec, _, _) in zip(segments, chunks, strict=True)]
        return chunks, prompts

    def _shot_frames(self, index: int) -> int:
        """Item `index`'s shot length (no draw with one length: the items stay those of
        `make_synthetic_dataset`)."""
        if len(self.shot_frames) == 1:
            return self.shot_frames[0]
        return self.shot_frames[int(np.random.default_rng([self.seed, 2, index]).integers(len(self.shot_frames)))]

    def _gap(self, index: int) -> int:
        """Frames by which item `index`'s later chunks of its first shot jump ahead (0: none)."""
        if self.sink_gap == 0:
            return 0  # no draw: the items stay those of `make_synthetic_dataset`
        rng = np.random.default_rng([self.seed, 1, index])
        return int(rng.integers(1, MAX_SINK_GAP_FRAMES + 1)) if rng.random() < self.sink_gap else 0

    def batch(self, first: int) -> TrainBatch:
        """The batch of this rank's items `first ... first + batch_size - 1`, video in [-1, 1] on the device."""
        indices = [(first + k) * self.dp_size + self.dp_rank for k in range(self.batch_size)]
        specs, phases, frames, prompts = [], [], [], []
        for index in indices:
            chunks, item_prompts = self.plan(index)
            for spec, phase, frame_indices in chunks:
                specs += [spec] * len(frame_indices)
                phases += [phase] * len(frame_indices)
                frames += list(frame_indices)
            prompts.append(item_prompts)
        frames_t = torch.tensor(frames, device=self.device)
        video = render_frames(specs, torch.tensor(phases, device=self.device, dtype=torch.float64), frames_t,
                              self.height, self.width)
        num_frames = sum(self.lengths)
        video = video.view(self.batch_size, num_frames, self.height, self.width, 3).permute(0, 4, 1, 2, 3)
        video = (video.float() / 255.0 * 2.0 - 1.0).clamp_(-1.0, 1.0)  # as to_model_pixels
        return TrainBatch(video.contiguous(), prompts,
                          torch.full((self.batch_size,), self.latent_frames, dtype=torch.long),
                          [f"stream_{i:07d}" for i in indices], indices)

    def batches(self) -> Iterator[TrainBatch]:
        """From the current position on; the trainer calls `advance` as it consumes them."""
        first = self.position
        while True:
            yield self.batch(first)
            first += self.batch_size
