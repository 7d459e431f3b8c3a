"""NVFP4 KV cache (quant/kv.py) against slow obvious references.

The reference cache keeps the fp32 keys/values of every stream frame as last written and
quantizes each frame once; the NVFP4 cache must hold exactly those codes after any number of
rolls, evictions, re-encodings and shot pins (no entry is ever requantized), and attend exactly
like "dequantize every held slot, append the current chunk, sdpa".
"""

from __future__ import annotations

import pytest
import torch

from core.attention import sdpa
from core.config import StreamConfig
from core.errors import UserError
from core.kv_cache import CacheLayout, KVCache
from core.pipeline import generate_latents, stream_latents
from quant.kv import (
    FrameSlots,
    NVFP4LayerKV,
    WindowBuffer,
    dequantize_slots,
    dequantize_slots_reference,
    kv_memory_5b_720p,
    nvfp4_storage,
)
from quant.nvfp4 import dequantize, quantize
from tests.conftest import text_context, tiny_model

# 10 frames in chunks of 2, a 6-frame window with a 2-frame sink: rolls from chunk 3 on.
STREAM = dict(frames_per_block=2, local_window_frames=6, sink_frames=2, sampling_steps=2)
FRAMES = 10
# Measured: final-latent SQNR of these runs vs the unquantized cache is 51-52 dB (docs/nvfp4_kv.md).
MIN_LATENT_SQNR_DB = 45.0


def sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (10 * torch.log10(ref.double().pow(2).sum() / (x.double() - ref.double()).pow(2).sum())).item()


def inputs(batch=1, seed=0, frames=FRAMES, side=8):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, frames, 48, side, side, generator=g)
    return noise, [text_context(batch, seed + i) for i in range(frames // 2)]


def reference_slot(x_BTND: torch.Tensor, rule: str, centred: bool) -> torch.Tensor:
    """One frame's keys as the cache must hold them: quantized once, per batch element."""
    x = x_BTND.float()
    mean = x.mean(dim=1, keepdim=True).to(torch.bfloat16).float() if centred else torch.zeros_like(x[:, :1])
    return torch.stack([dequantize(quantize(x[b] - mean[b], rule)) + mean[b] for b in range(x.shape[0])])


class SlowReference:
    """Wraps one NVFP4 layer: records each stream frame's keys/values as last written and checks
    every attention output against a window rebuilt from those records."""

    def __init__(self, layer: NVFP4LayerKV):
        self.layer = layer
        self.attend = layer.update_and_attend
        self.keys: dict[int, torch.Tensor] = {}  # stream frame -> fp32 keys as last written
        self.values: dict[int, torch.Tensor] = {}
        self.slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # ... -> (keys, values) quantized once
        self.calls = 0
        self.last_plan = None
        layer.update_and_attend = self  # KVCache.begin hands out this attribute

    def held_frames(self, plan, end: int) -> list[int]:
        """Stream frames in buffer order over [0, end), from the cache's own bookkeeping."""
        per_frame = self.layer.tokens_per_frame
        frames = []
        for seg in plan.after.segments:
            if seg.buffer_start < end:
                assert seg.buffer_start == len(frames) * per_frame and seg.buffer_start + seg.length <= end
                frames += range(seg.stream_start // per_frame, (seg.stream_start + seg.length) // per_frame)
        assert len(frames) * per_frame == end
        return frames

    def __call__(self, q, k, v):
        plan, layer = self.layer.plan, self.layer
        self.last_plan = plan
        out = self.attend(q, k, v)
        per_frame = layer.tokens_per_frame
        held = self.held_frames(plan, plan.write_start)
        window_k = [self.slots[f][0] for f in held] + [k]
        window_v = [self.slots[f][1] for f in held] + [v]
        expected = sdpa(q, torch.cat(window_k, 1).to(k.dtype), torch.cat(window_v, 1).to(v.dtype))
        assert torch.equal(out, expected)
        first = next(s for s in plan.after.segments if s.buffer_start == plan.write_start).stream_start // per_frame
        for i in range(k.shape[1] // per_frame):
            frame_k, frame_v = (x[:, i * per_frame:(i + 1) * per_frame].float().clone() for x in (k, v))
            self.keys[first + i], self.values[first + i] = frame_k, frame_v
            self.slots[first + i] = (reference_slot(frame_k, layer.rule, layer.center_keys),
                                     reference_slot(frame_v, layer.rule, False))
        self.calls += 1
        return out


@pytest.mark.parametrize("rule", ["mse", "static_6"])
@pytest.mark.parametrize("centred", [False, True])
def test_dequantize_slots_equals_per_slot_reference(rule, centred):
    g = torch.Generator().manual_seed(1)
    slots = FrameSlots(2, 12, 3, 32, 4, rule, centred, "cpu")
    x = torch.randn(2, 12, 3, 32, generator=g) * torch.rand(2, 12, 1, 1, generator=g) * 5 + 0.5
    slots.write(x, 0)
    for end in (4, 12):
        args = (slots.codes[:, :end], slots.scales[:, :end], slots.amax, rule, 4, slots.mean)
        assert torch.equal(dequantize_slots(*args), dequantize_slots_reference(*args))
    assert (slots.amax > 0).all() and slots.amax.unique().numel() == 6  # one amax per (batch, frame)


@pytest.mark.parametrize("center_keys,guidance,batch", [(False, 1.0, 1), (True, 1.0, 2), (True, 2.0, 1)])
def test_streaming_storage_and_attention_equal_slow_reference(center_keys, guidance, batch):
    """Rolls, evictions, recaches, a pinned shot sink and a window re-encoding (prompt switch)."""
    model = tiny_model()
    noise, contexts = inputs(batch)
    stream = StreamConfig(**STREAM, guidance_scale=guidance)
    window = WindowBuffer()
    base = nvfp4_storage(window=window, center_keys=center_keys)
    references: list[SlowReference] = []  # one per layer, the caches' layers in build order

    def storage(spec, device):
        layer = base(spec, device)
        references.append(SlowReference(layer))
        return layer

    pointers = None
    switch = {3: text_context(batch, 77)}
    for _ in stream_latents(model, noise, contexts, stream, scene_cuts=[False, False, True, False, False],
                            negative_context=text_context(batch, 50), prompt_switch=switch.get,
                            kv_storage=storage):
        layer = references[0].layer
        now = [t.data_ptr() for t in (layer.keys.codes, layer.keys.scales, layer.keys.amax, window.k)]
        assert pointers is None or now == pointers  # in-place storage, one window
        pointers = now
    layers = model.config.num_layers
    assert len(references) == layers * (2 if guidance != 1.0 else 1)
    # 5 chunks x (2 steps + recache), plus the switch's re-encoding of 3 held segments (positive branch)
    assert all(ref.calls == 5 * 3 + (3 if i < layers else 0) for i, ref in enumerate(references))
    for reference in references:
        layer, state = reference.layer, reference.last_plan.after
        held = reference.held_frames(reference.last_plan, state.local_end)
        per_frame = layer.tokens_per_frame
        assert held != list(range(len(held)))  # frames were evicted
        for slot, frame in enumerate(held):
            tokens = slice(slot * per_frame, (slot + 1) * per_frame)
            for stored, written, centred in ((layer.keys, reference.keys, center_keys),
                                             (layer.values, reference.values, False)):
                x = written[frame]
                if centred:
                    x = x - x.mean(dim=1, keepdim=True).to(torch.bfloat16).float()
                for b in range(batch):
                    once = quantize(x[b], layer.rule)
                    assert torch.equal(stored.codes[b, tokens], once.codes)
                    assert torch.equal(stored.scales[b, tokens].view(torch.uint8), once.scales.view(torch.uint8))
                    assert torch.equal(stored.amax[b, slot], once.amax)


@pytest.mark.parametrize("center_keys", [False, True])
def test_generation_close_to_unquantized_cache(center_keys):
    model = tiny_model(seed=3)
    noise, contexts = inputs(seed=3)
    stream = StreamConfig(**STREAM)
    exact = generate_latents(model, noise, contexts, stream)
    quantized = generate_latents(model, noise, contexts, stream,
                                 kv_storage=nvfp4_storage(window=WindowBuffer(), center_keys=center_keys))
    assert sqnr_db(quantized, exact) >= MIN_LATENT_SQNR_DB
    assert not torch.equal(quantized, exact)


def attention_sqnr(center_keys: bool, offset: float, seed: int = 0) -> float:
    """One layer, a stream of 6 frames of keys with a per-channel offset on 4 of 32 channels
    per head (the outlier channels of trained keys), attended by random queries."""
    g = torch.Generator().manual_seed(seed)
    batch, per_frame, heads, head_dim = 1, 32, 2, 32
    layout = CacheLayout(capacity=6 * per_frame, sink_tokens=per_frame, global_sink_tokens=0,
                         tokens_per_frame=per_frame)
    cache = KVCache(layout, 1, batch, heads, head_dim, torch.float32, "cpu",
                    storage=nvfp4_storage(center_keys=center_keys))
    exact = KVCache(layout, 1, batch, heads, head_dim, torch.float32, "cpu")
    channel_offset = torch.zeros(heads, head_dim)
    channel_offset[:, torch.randperm(head_dim, generator=g)[:4]] = offset * torch.sign(torch.randn(heads, 4,
                                                                                                  generator=g))
    signal = error = 0.0
    for chunk in range(5):
        k, v, q = (torch.randn(batch, 2 * per_frame, heads, head_dim, generator=g) for _ in range(3))
        k = k + channel_offset
        (attend,), (attend_exact,) = cache.begin(2 * chunk, 2), exact.begin(2 * chunk, 2)
        out, ref = attend(q, k, v), attend_exact(q, k, v)
        cache.commit()
        exact.commit()
        signal += ref.pow(2).sum().item()
        error += (out - ref).pow(2).sum().item()
    return 10 * torch.log10(torch.tensor(signal / error)).item()


def test_key_centring_helps_offset_keys_and_costs_nothing_without():
    """The decision of docs/nvfp4_kv.md, at the layer level."""
    for seed in range(3):
        assert attention_sqnr(True, offset=3.0, seed=seed) > attention_sqnr(False, offset=3.0, seed=seed) + 1.5
        assert attention_sqnr(True, offset=0.0, seed=seed) > attention_sqnr(False, offset=0.0, seed=seed) - 0.5


def test_memory_5b_720p_at_least_3_5x_smaller():
    memory = kv_memory_5b_720p()
    layers, capacity, frames, heads, head_dim = 30, 32 * 880, 32, 24, 128
    assert memory.bf16_bytes == layers * 2 * capacity * heads * head_dim * 2  # 9.67 GiB
    per_tensor = capacity * heads * (head_dim // 2 + head_dim // 16) + frames * 4  # codes, scales, amax
    assert memory.nvfp4_bytes == layers * (2 * per_tensor + frames * heads * head_dim * 2)  # + key means
    assert memory.ratio >= 3.5
    assert kv_memory_5b_720p(center_keys=False).ratio >= memory.ratio


def test_cache_nbytes_counts_the_allocated_storage():
    layout = CacheLayout(capacity=12, sink_tokens=4, global_sink_tokens=0, tokens_per_frame=4)
    dense = KVCache(layout, 2, 2, 3, 32, torch.bfloat16, "cpu")
    assert dense.nbytes == 2 * 2 * 2 * 12 * 3 * 32 * 2  # layers x (k, v) x batch x tokens x heads x d x 2 B
    window = WindowBuffer()
    cache = KVCache(layout, 2, 2, 3, 32, torch.bfloat16, "cpu", storage=nvfp4_storage(window=window))
    codes, scales = 2 * 12 * 3 * 16, 2 * 12 * 3 * 2  # uint8 codes (d/2), e4m3 scales (d/16)
    amax, key_mean = 2 * 3 * 4, 2 * 3 * 3 * 32 * 2  # fp32 per (batch, frame); bf16 per (batch, frame, head, d)
    assert cache.nbytes == 2 * (2 * (codes + scales + amax) + key_mean)
    assert all(isinstance(layer, NVFP4LayerKV) and layer.window is window for layer in cache.layers)
    on_meta = KVCache(layout, 2, 2, 3, 32, torch.bfloat16, "meta", storage=nvfp4_storage())
    assert on_meta.nbytes == cache.nbytes  # how `longlive bench` sizes a cache without allocating it


def test_nvfp4_storage_needs_a_known_rule():
    with pytest.raises(UserError, match="scale rule"):
        nvfp4_storage(rule="nope")


INTERPRETED_KERNEL = """
import torch
from quant.kv import FrameSlots, _dequantize_slots_triton, dequantize_slots_reference
g = torch.Generator().manual_seed(0)
for centred in (False, True):
    slots = FrameSlots(2, 12, 3, 32, 4, "mse", centred, "cpu")
    slots.write(torch.randn(2, 12, 3, 32, generator=g) * torch.rand(2, 12, 1, 1, generator=g) * 9, 0)
    expected = dequantize_slots_reference(slots.codes[:, :8], slots.scales[:, :8], slots.amax, "mse", 4, slots.mean)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.zeros(2, 12, 3, 32, dtype=dtype)
        _dequantize_slots_triton(slots.codes[:, :8], slots.scales[:, :8], slots.amax[:, :2], "mse", 4,
                                 None if slots.mean is None else slots.mean[:, :2], out[:, :8])
        assert torch.equal(out[:, :8], expected.to(dtype)), (centred, dtype)
        assert (out[:, 8:] == 0).all()
print("ok")
"""


def test_triton_dequantize_kernel_in_the_cpu_interpreter(tmp_path_factory):
    """The CUDA kernel's code, run by Triton's interpreter (it must be set before triton is imported,
    hence another process, tests/triton_interpreter.py): equal to the per-slot reference, fp32 and
    bf16 (tests/test_gpu_quant_kv.py checks the compiled kernel)."""
    from tests.triton_interpreter import interpreted

    assert interpreted(tmp_path_factory, "kv_dequantize").strip() == "ok"
