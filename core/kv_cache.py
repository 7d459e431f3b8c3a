"""Sink-aware self-attention KV cache of the streaming DiT.

One preallocated buffer pair per layer, `[B, capacity, N, d]`, keys stored after RoPE. The
buffer fills from the left; what it holds is always attended whole (`[0, local_end)`), so a
chunk sees: the global sink (the video's first frames), a pinned shot sink (the first chunk of
the current shot), the recent history, and itself.

The bookkeeping is the official one, token for token (reference-model.md §5), kept as plain
Python ints so that no forward ever waits on the GPU:

* every forward of a chunk writes the chunk's slot; only the first forward of a *new* chunk that
  does not fit rolls: it evicts the oldest unprotected tokens by sliding the rest left;
* the protected prefix is the global sink, plus the pinned shot sink once it sits right after
  the global sink; a pinned chunk elsewhere ("floating") drifts left with the rolling data;
* all layers share one set of indices: a forward plans its write from the indices before the
  call (`plan`), every layer applies the same plan, and `commit` publishes the new indices.

Callers speak in latent frames (`begin`, `pin_last_chunk`, `drop_history`, `held_frames`); tokens
stay inside. Storage plugs in from outside: the cache is built with a `StorageFactory` that makes
each layer's `LayerStorage` (dense `LayerKV` here, NVFP4 slots in `quant/kv.py`).

Legend: B batch, K capacity (tokens), N heads, d head size, n new tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from core.attention import sdpa
from core.eager import eager_method


@dataclass(frozen=True)
class CacheLayout:
    """Sizes in tokens, derived from the stream settings and the tokens per latent frame."""

    capacity: int  # local_window_frames * tokens_per_frame
    sink_tokens: int  # sink_frames * tokens_per_frame
    global_sink_tokens: int  # sink tokens when multi-shot sink is on, else 0
    tokens_per_frame: int

    @classmethod
    def from_stream(cls, stream, tokens_per_frame: int) -> CacheLayout:
        return cls(capacity=stream.local_window_frames * tokens_per_frame,
                   sink_tokens=stream.sink_frames * tokens_per_frame,
                   global_sink_tokens=stream.global_sink_frames * tokens_per_frame,
                   tokens_per_frame=tokens_per_frame)


@dataclass(frozen=True)
class Segment:
    """Buffer tokens [buffer_start, +length) hold stream tokens [stream_start, +length)."""

    buffer_start: int
    stream_start: int
    length: int


def _remove_range(segments: tuple[Segment, ...], lo: int, hi: int) -> list[Segment]:
    """Segments with buffer range [lo, hi) cut out (partly covered segments are trimmed)."""
    kept = []
    for seg in segments:
        end = seg.buffer_start + seg.length
        if end <= lo or seg.buffer_start >= hi:
            kept.append(seg)
            continue
        if seg.buffer_start < lo:
            kept.append(Segment(seg.buffer_start, seg.stream_start, lo - seg.buffer_start))
        if end > hi:
            cut = hi - seg.buffer_start
            kept.append(Segment(hi, seg.stream_start + cut, end - hi))
    return kept


@dataclass(frozen=True)
class CacheState:
    """The indices every layer shares, as plain ints (updated by `commit`, never on the GPU)."""

    global_end: int = 0  # stream token index where the last written chunk ends
    local_end: int = 0  # buffer position where the last written chunk ends
    pinned_start: int = -1  # buffer position of the pinned shot sink (-1: none)
    pinned_len: int = 0
    # What the buffer holds, in buffer order (bookkeeping only: used to re-encode the window).
    segments: tuple[Segment, ...] = ()

    @property
    def has_pinned(self) -> bool:
        return self.pinned_start >= 0 and self.pinned_len > 0


@dataclass(frozen=True)
class Roll:
    """Slide buffer range [src, src + length) to [dst, ...), dst < src."""

    dst: int
    src: int
    length: int


@dataclass(frozen=True)
class WritePlan:
    """What one forward does to every layer's buffers, and the indices after it."""

    roll: Roll | None
    write_start: int
    write_end: int  # == the attended window's end
    after: CacheState
    # False: no later forward reads these keys/values before they are rewritten (a denoising step,
    # whose chunk the recache pass re-encodes); a storage that pays to store may skip them.
    keep_kv: bool = True


def protected_prefix(layout: CacheLayout, state: CacheState) -> int:
    """Tokens at the buffer start that rolling must keep."""
    if state.has_pinned and state.pinned_start == layout.global_sink_tokens:
        return layout.global_sink_tokens + state.pinned_len
    if state.has_pinned:  # floating shot sink: only the global sink is protected for now
        return layout.global_sink_tokens
    return max(layout.global_sink_tokens, layout.sink_tokens)


def plan_write(layout: CacheLayout, state: CacheState, start_token: int,
               num_tokens: int) -> WritePlan:
    """Plan the write of tokens [start_token, start_token + num_tokens) of the stream."""
    end_token = start_token + num_tokens
    advance = end_token - state.global_end
    pinned_start = state.pinned_start
    segments = state.segments
    roll = None
    if advance > 0 and state.local_end + num_tokens > layout.capacity:
        prefix = protected_prefix(layout, state)
        evict = state.local_end + num_tokens - layout.capacity
        keep = state.local_end - evict - prefix
        assert keep >= 0, "stream config leaves no room to roll (checked by StreamConfig)"
        roll = Roll(dst=prefix, src=prefix + evict, length=keep)
        local_end = state.local_end + advance - evict
        if state.has_pinned and state.pinned_start >= prefix:
            pinned_start -= evict  # the floating shot sink moves with the data it marks
        segments = tuple(
            replace(seg, buffer_start=seg.buffer_start - evict) if seg.buffer_start >= roll.src else seg
            for seg in _remove_range(segments, roll.dst, roll.src))
    else:
        local_end = state.local_end + advance
    assert num_tokens <= local_end <= layout.capacity
    write_start = local_end - num_tokens
    segments = tuple(sorted(_remove_range(segments, write_start, local_end)
                            + [Segment(write_start, start_token, num_tokens)],
                            key=lambda seg: seg.buffer_start))
    after = CacheState(global_end=end_token, local_end=local_end, pinned_start=pinned_start,
                       pinned_len=state.pinned_len, segments=segments)
    return WritePlan(roll=roll, write_start=write_start, write_end=local_end, after=after)


def slide_left(buffer: Tensor, roll: Roll) -> None:
    """In-place `buffer[:, dst:dst+len] = buffer[:, src:src+len]` without a full-range copy.

    Copying left to right in pieces no longer than the shift never reads a token that was
    already overwritten; only a pathologically small shift falls back to a temporary copy."""
    shift = roll.src - roll.dst
    if roll.length == 0:
        return
    pieces = -(-roll.length // shift)
    if pieces > 64:
        buffer[:, roll.dst:roll.dst + roll.length] = buffer[:, roll.src:roll.src + roll.length].clone()
        return
    for offset in range(0, roll.length, shift):
        size = min(shift, roll.length - offset)
        buffer[:, roll.dst + offset:roll.dst + offset + size] = \
            buffer[:, roll.src + offset:roll.src + offset + size]


@dataclass(frozen=True)
class LayerSpec:
    """What one layer's storage holds: keys and values `[batch, layout.capacity, heads, head_dim]`
    of the working `dtype`, in frames of `layout.tokens_per_frame` tokens.

    `all_heads_max`: set when the storage holds one shard of the layer's heads (sequence-parallel
    inference, `sp/inference.py`): the elementwise max of a statistic over every shard, for a
    storage whose format spans heads (an NVFP4 slot's amax); None: it holds every head."""

    layout: CacheLayout
    batch: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    all_heads_max: Callable[[Tensor], Tensor] | None = None


class LayerStorage(Protocol):
    """The storage protocol of one layer (bf16 `LayerKV` here; NVFP4 in `quant/kv.py`).

    `KVCache.begin` sets `plan` on every layer before a forward; `update_and_attend` applies it
    (roll, write the new keys/values) and attends over the filled window `[0, plan.write_end)`;
    `nbytes` is what the storage really costs."""

    plan: WritePlan | None

    @property
    def nbytes(self) -> int: ...

    def update_and_attend(self, q_BnND: Tensor, k_BnND: Tensor, v_BnND: Tensor) -> Tensor: ...


# (layer spec, device) -> one layer's storage: what a KVCache is built with.
StorageFactory = Callable[[LayerSpec, "torch.device | str"], LayerStorage]


# The attention of a storage over its window: (q, k, v) `[B, L, N, d]` -> `[B, Lq, N, d]`.
Attention = Callable[[Tensor, Tensor, Tensor], Tensor]


class LayerKV:
    """Dense key/value buffers of one layer in the working dtype. `attention` computes the
    attention over the window (default SDPA; e.g. an FP8 kernel, `quant/fp8_attention.py`)."""

    def __init__(self, spec: LayerSpec, device: torch.device | str, attention: Attention = sdpa):
        shape = (spec.batch, spec.layout.capacity, spec.heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=spec.dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.attention = attention
        self.plan: WritePlan | None = None

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    # Index arithmetic and in-place writes stay eager under torch.compile (one graph break per
    # layer) so compiled blocks never specialise on cache positions.
    @eager_method
    def update_and_attend(self, q_BnND: Tensor, k_BnND: Tensor, v_BnND: Tensor) -> Tensor:
        """Apply the plan (roll, write the new keys/values), then attend over the filled window."""
        plan = self.plan
        assert plan is not None, "KVCache.begin() was not called"
        if plan.roll is not None:
            slide_left(self.k, plan.roll)
            slide_left(self.v, plan.roll)
        self.k[:, plan.write_start:plan.write_end] = k_BnND
        self.v[:, plan.write_start:plan.write_end] = v_BnND
        return self.attention(q_BnND, self.k[:, :plan.write_end], self.v[:, :plan.write_end])


@dataclass(frozen=True)
class HeldFrames:
    """Buffer frames [buffer_frame, +num_frames) hold the stream's latent frames [first_frame, ...)."""

    buffer_frame: int
    first_frame: int
    num_frames: int


class KVCache:
    """Self-attention cache of all layers of one guidance branch. Callers speak in latent frames;
    the token bookkeeping (`plan_write`) stays inside. `storage` builds each layer's storage
    (default: dense `LayerKV` buffers)."""

    def __init__(self, layout: CacheLayout, num_layers: int, batch: int, heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 storage: StorageFactory = LayerKV):
        self.layout = layout
        spec = LayerSpec(layout, batch, heads, head_dim, dtype)
        self.layers: tuple[LayerStorage, ...] = tuple(storage(spec, device) for _ in range(num_layers))
        self.state = CacheState()
        self._pending: WritePlan | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's storage (what the format costs, whatever its layout)."""
        return sum(layer.nbytes for layer in self.layers)

    def reset(self) -> None:
        """Forget the stream (buffers are overwritten before they are read again)."""
        self.state = CacheState()
        self._pending = None
        for layer in self.layers:
            layer.plan = None
            if hasattr(layer, "reset"):  # a storage with per-stream state (e.g. FP8 running scales)
                layer.reset()

    def begin(self, start_frame: int, num_frames: int, rewrite_at_frame: int | None = None,
              keep_kv: bool = True) -> list[Callable[[Tensor, Tensor, Tensor], Tensor]]:
        """Start a forward over the stream's latent frames [start, start + n): one attention
        function per layer, each applying the same plan to its own storage.

        `rewrite_at_frame` re-encodes frames the buffer already holds at that buffer frame instead
        (no roll, no index change): they attend to the buffer up to their own end. `keep_kv=False`:
        no later forward reads this call's keys/values before they are rewritten (a denoising
        step), so a storage that pays to store may skip them."""
        assert self._pending is None, "previous forward was not committed"
        per_frame = self.layout.tokens_per_frame
        start, count = start_frame * per_frame, num_frames * per_frame
        if rewrite_at_frame is None:
            plan = plan_write(self.layout, self.state, start, count)
        else:
            at = rewrite_at_frame * per_frame
            assert Segment(at, start, count) in self.state.segments, \
                "rewrite must target a segment the cache holds"
            plan = WritePlan(roll=None, write_start=at, write_end=at + count, after=self.state)
        plan = replace(plan, keep_kv=keep_kv)
        self._pending = plan
        for layer in self.layers:
            layer.plan = plan
        return [layer.update_and_attend for layer in self.layers]

    def commit(self) -> None:
        assert self._pending is not None, "commit without begin"
        self.state = self._pending.after
        self._pending = None
        for layer in self.layers:
            layer.plan = None

    def pin_last_chunk(self, num_frames: int) -> None:
        """Mark the chunk just written (`num_frames` frames) as the shot sink: its first
        `sink_frames` frames are protected (no data moves)."""
        chunk_tokens = num_frames * self.layout.tokens_per_frame
        self.state = replace(self.state, pinned_start=self.state.local_end - chunk_tokens,
                             pinned_len=min(self.layout.sink_tokens, chunk_tokens))

    def drop_history(self, start_frame: int) -> None:
        """Shot-clean recache: keep only the global sink; the next write (of the chunk starting at
        `start_frame`) lands right after it."""
        sink = self.layout.global_sink_tokens
        self.state = CacheState(global_end=start_frame * self.layout.tokens_per_frame, local_end=sink,
                                segments=tuple(_remove_range(self.state.segments, sink, self.layout.capacity)))

    def held_frames(self) -> tuple[HeldFrames, ...]:
        """The stream frames the buffer holds, in buffer order."""
        per_frame = self.layout.tokens_per_frame
        return tuple(HeldFrames(seg.buffer_start // per_frame, seg.stream_start // per_frame,
                                seg.length // per_frame) for seg in self.state.segments)
