"""The sink-aware KV cache: token arithmetic against an independent chunk-level model of the
eviction policy, the worked timelines of reference-model.md §5.4-5.5, in-place rolling, and no
whole-cache copies per forward."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from core.config import StreamConfig
from core.kv_cache import CacheLayout, KVCache, Roll, slide_left
from tests.conftest import SMALL_STREAM, text_context, tiny_model


def simulate_chunks(num_chunks: int, window_chunks: int, sink_chunks: int, cuts: set[int],
                    multi_shot_sink: bool) -> list[list[int]]:
    """Slow obvious model of the cache, one list entry per chunk: returns, for every chunk, the
    chunk ids the buffer holds (in buffer order) right after that chunk was written."""
    global_sink = sink_chunks if multi_shot_sink else 0
    buffer: list[int] = []
    pinned = None
    history = []
    for c in range(num_chunks):
        if len(buffer) == window_chunks:
            if pinned is not None and pinned in buffer and buffer.index(pinned) == global_sink:
                protected = global_sink + 1
            elif pinned is not None and pinned in buffer:
                protected = global_sink
            else:
                protected = max(global_sink, sink_chunks)
            buffer.pop(protected)
        buffer.append(c)
        history.append(list(buffer))
        if c in cuts and c > 0 and multi_shot_sink and sink_chunks > 0:
            pinned = c
    return history


class ChunkIdCache:
    """Drives a real KVCache (1 layer, 1 head, head_dim 1, 1 token per frame) and writes each
    chunk's id as its keys, so the buffer content can be read back as chunk ids."""

    def __init__(self, stream: StreamConfig, tokens_per_frame: int = 1):
        layout = CacheLayout.from_stream(stream, tokens_per_frame)
        self.stream = stream
        self.cache = KVCache(layout, num_layers=1, batch=1, heads=1, head_dim=1,
                             dtype=torch.float32, device="cpu")
        self.chunk_frames = stream.frames_per_block
        self.chunk_tokens = stream.frames_per_block * tokens_per_frame

    def forward(self, chunk: int, value: float | None = None) -> None:
        attend, = self.cache.begin(chunk * self.chunk_frames, self.chunk_frames)
        kv = torch.full((1, self.chunk_tokens, 1, 1), float(chunk if value is None else value))
        attend(kv, kv, kv)
        self.cache.commit()

    def chunk(self, chunk: int, cut: bool = False) -> None:
        """All forwards of one chunk: steps + the recache, then the pin at a cut."""
        for _ in range(self.stream.sampling_steps + 1):
            self.forward(chunk)
        if cut and self.stream.pins_shot_sink:
            self.cache.pin_last_chunk(self.chunk_frames)

    def contents(self) -> list[int]:
        filled = self.cache.layers[0].k[0, :self.cache.state.local_end, 0, 0]
        ids = filled[::self.chunk_tokens].long().tolist()
        assert torch.equal(filled, filled[::self.chunk_tokens].repeat_interleave(self.chunk_tokens))
        return ids


def test_worked_timeline_single_shot():
    """reference §5.4: chunk 8 frames, window 32, sink 8: c4 -> [c0 c2 c3 c4], cn -> [c0 c(n-2)
    c(n-1) cn]."""
    cache = ChunkIdCache(StreamConfig())
    expected = [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 2, 3, 4], [0, 3, 4, 5], [0, 4, 5, 6]]
    for c, want in enumerate(expected):
        cache.chunk(c)
        assert cache.contents() == want, f"after chunk {c}"


def test_worked_timeline_scene_cut_at_c6():
    """reference §5.5: a cut at c6 pins slot 3; the pin drifts to slot 1 and is then protected:
    c9 -> [c0 c6 c8 c9], c10 -> [c0 c6 c9 c10]."""
    cache = ChunkIdCache(StreamConfig())
    table = {6: [0, 4, 5, 6], 7: [0, 5, 6, 7], 8: [0, 6, 7, 8], 9: [0, 6, 8, 9], 10: [0, 6, 9, 10]}
    for c in range(11):
        cache.chunk(c, cut=(c == 6))
        if c in table:
            assert cache.contents() == table[c], f"after chunk {c}"
    state = cache.cache.state
    assert state.pinned_start == 8 and state.pinned_len == 8  # right after the 8-frame sink


def test_later_cut_releases_previous_shot_sink():
    cache = ChunkIdCache(StreamConfig())
    for c in range(14):
        cache.chunk(c, cut=c in (5, 10))
    # The shot-B sink (c5) became ordinary data at the cut at c10 and was evicted.
    assert cache.contents() == [0, 10, 12, 13]


@pytest.mark.parametrize("seed", range(12))
def test_token_arithmetic_matches_chunk_model(seed):
    rng = random.Random(seed)
    fpb = rng.choice([1, 2, 4])
    sink_chunks = rng.choice([0, 1, 2])
    multi = rng.random() < 0.7
    pinned_extra = 1 if multi and sink_chunks else 0
    window_chunks = sink_chunks + pinned_extra + 1 + rng.randint(0, 3)
    stream = StreamConfig(frames_per_block=fpb, local_window_frames=window_chunks * fpb,
                          sink_frames=sink_chunks * fpb, multi_shot_sink=multi,
                          sampling_steps=rng.choice([1, 2, 4]))
    num_chunks = rng.randint(4, 16)
    cuts = {c for c in range(1, num_chunks) if rng.random() < 0.25}
    cache = ChunkIdCache(stream, tokens_per_frame=rng.choice([1, 3]))
    expected = simulate_chunks(num_chunks, window_chunks, sink_chunks, cuts, multi)
    for c in range(num_chunks):
        cache.chunk(c, cut=c in cuts)
        assert cache.contents() == expected[c], f"chunk {c}: {stream}, cuts {sorted(cuts)}"
        # the bookkeeping names the same chunks, in buffer order, each whole
        held = cache.cache.held_frames()
        assert [h.first_frame // cache.chunk_frames for h in held] == expected[c]
        assert all(h.num_frames == cache.chunk_frames and h.buffer_frame == i * cache.chunk_frames
                   for i, h in enumerate(held))


def test_only_first_forward_of_a_chunk_rolls_and_every_forward_writes():
    cache = ChunkIdCache(StreamConfig(**SMALL_STREAM))
    for c in range(3):
        cache.chunk(c)
    assert cache.contents() == [0, 1, 2]
    cache.forward(3, value=30.0)  # first forward of c3: roll, then write
    assert cache.contents() == [0, 2, 30]
    cache.forward(3, value=31.0)  # same chunk again: overwrite its own slot, no roll
    assert cache.contents() == [0, 2, 31]
    cache.forward(3, value=3.0)  # the recache is the last writer
    assert cache.contents() == [0, 2, 3]


def test_shot_clean_recache_drops_history():
    stream = StreamConfig(**SMALL_STREAM, shot_clean_recache=True)
    cache = ChunkIdCache(stream)
    for c in range(4):
        cache.chunk(c)
    for _ in range(stream.sampling_steps):
        cache.forward(4)
    cache.cache.drop_history(4 * cache.chunk_frames)
    cache.forward(4)
    cache.cache.pin_last_chunk(cache.chunk_frames)
    assert cache.contents() == [0, 4]
    assert cache.cache.state.pinned_start == cache.cache.layout.global_sink_tokens


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dst,src,length", [(2, 4, 6), (1, 2, 7), (0, 10, 5), (3, 4, 20), (0, 3, 0)])
def test_slide_left_matches_copy(batch, dst, src, length):
    buffer = torch.randn(batch, 40, 2, 3)
    expected = buffer.clone()
    expected[:, dst:dst + length] = buffer[:, src:src + length].clone()
    slide_left(buffer, Roll(dst=dst, src=src, length=length))
    assert torch.equal(buffer, expected)


class CopyCounter(TorchDispatchMode):
    """Largest number of elements any copy-like op writes."""

    COPY_OPS = ("copy_", "clone", "cat", "stack", "slice_scatter", "index_put", "contiguous")

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(name in str(func) for name in self.COPY_OPS) and torch.is_tensor(out):
            self.largest = max(self.largest, out.numel())
        return out


def test_no_whole_cache_copy_per_forward():
    model = tiny_model()
    stream = StreamConfig(**SMALL_STREAM)
    cfg = model.config
    tokens = 16  # 8x8 latent, 2x2 patches
    layout = CacheLayout.from_stream(stream, tokens)
    cache = KVCache(layout, cfg.num_layers, 1, cfg.num_heads, cfg.head_dim, torch.float32, "cpu")
    ctx = text_context(1, 0)
    buffers = [(layer.k.data_ptr(), layer.v.data_ptr()) for layer in cache.layers]
    whole_cache = layout.capacity * cfg.dim
    with torch.no_grad():
        for c in range(6):  # fills the 3-chunk window, then rolls three times
            x = torch.randn(1, cfg.in_channels, 2, 8, 8)
            t = torch.full((1, 2), 500.0)
            counter = CopyCounter()
            with counter:
                model.forward_chunk(x, t, ctx, cache=cache, start_frame=2 * c)
            assert counter.largest < whole_cache, f"chunk {c}: a copy of the whole cache"
    assert buffers == [(layer.k.data_ptr(), layer.v.data_ptr()) for layer in cache.layers]
