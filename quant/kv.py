"""NVFP4 storage for the streaming KV cache (LongLive 2.0's `kv_quant`, reference-systems.md §3.5).

A `core.kv_cache.LayerStorage`: a cache built with `nvfp4_storage(...)` as its storage factory
holds NVFP4 layers from the start (no bf16 buffers ever exist); `core` knows nothing about it.
Per layer, keys and values are each stored as NVFP4: E2M1 codes, one E4M3 scale per 16 elements
along head_dim, and one fp32 amax per *slot*. A slot is one latent frame (`tokens_per_frame`
tokens), finer than the official slot of one chunk: every offset the cache uses (writes, rolls,
rewrites, evictions) is a whole number of frames, so every move is a move of whole slots and a
stored entry is never requantized.

Each call, the held history `[0, write_start)` is dequantized into one window buffer shared by
all layers (and by every cache built with the same `WindowBuffer`); the current chunk's own keys
and values go into the window unquantized (the official does the same) and the window is
attended whole, exactly like the bf16 cache.

`center_keys` (on by default, see docs/nvfp4_kv.md for the measurements): before quantizing a
key slot, the mean over the slot's tokens of every (head, channel) is subtracted and stored
(bf16); dequantization adds it back. This is not the official centring (which shifts only the
current chunk's keys at attention time and changes the logits); it leaves the attention exact
in expectation and removes the per-channel offsets of trained keys from the quantized part.

Legend: B batch, K capacity (tokens), F capacity (frames), T tokens per frame, N heads,
d head size, n new tokens, f new frames, m held tokens, R rows (tokens x heads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from core.attention import sdpa
from core.config import ModelConfig, StreamConfig
from core.eager import eager_method
from core.kv_cache import Attention, CacheLayout, KVCache, LayerSpec, Roll, StorageFactory, slide_left
from quant.kernels import quantize_triton
from quant.nvfp4 import (
    NVFP4Tensor,
    check_rule,
    decode_tables,
    dequantize,
    dequantize_values,
    quantize,
    rule_divisor,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path serves
    triton = None

# --------------------------------------------------------------------------------------------
# Dequantization with one amax per slot (frame)


def dequantize_slots(codes: Tensor, scales: Tensor, amax_BF: Tensor, rule: str, tokens_per_frame: int,
                     mean_BFNd: Tensor | None = None) -> Tensor:
    """fp32 `[B, m, N, d]` of the slots `codes [B, m, N, d/2]`, `scales [B, m, N, d/16]` whose
    frame i uses `amax_BF[:, i]` (then adds `mean_BFNd[:, i]`). The operations of
    `quant.nvfp4.dequantize`, `((q * s) * amax) / (Q*S)`, with a per-token amax: equal to it slot
    by slot, bit for bit (tests/test_quant_kv.py)."""
    frames = _frames(codes.shape[1], tokens_per_frame)
    slots = (frames, tokens_per_frame)  # split the tokens into slots: amax and mean broadcast over a slot
    values_BFTNd = dequantize_values(codes.unflatten(1, slots), scales.unflatten(1, slots),
                                     amax_BF[:, :frames, None, None, None], rule)
    if mean_BFNd is not None:
        values_BFTNd = values_BFTNd + mean_BFNd[:, :frames, None].float()
    return values_BFTNd.flatten(1, 2)


def dequantize_slots_reference(codes: Tensor, scales: Tensor, amax_BF: Tensor, rule: str, tokens_per_frame: int,
                               mean_BFNd: Tensor | None = None) -> Tensor:
    """Slow obvious form of `dequantize_slots`: `quant.nvfp4.dequantize` of each slot in turn."""
    frames = _frames(codes.shape[1], tokens_per_frame)
    out = torch.empty(*codes.shape[:-1], codes.shape[-1] * 2, dtype=torch.float32, device=codes.device)
    for b in range(codes.shape[0]):
        for i in range(frames):
            tokens = slice(i * tokens_per_frame, (i + 1) * tokens_per_frame)
            out[b, tokens] = dequantize(NVFP4Tensor(codes[b, tokens], scales[b, tokens], amax_BF[b, i], rule))
            if mean_BFNd is not None:
                out[b, tokens] = out[b, tokens] + mean_BFNd[b, i].float()
    return out


def _frames(tokens: int, tokens_per_frame: int) -> int:
    assert tokens % tokens_per_frame == 0, f"{tokens} tokens is not a whole number of frames"
    return tokens // tokens_per_frame


# --------------------------------------------------------------------------------------------
# Storage of one tensor (keys or values) of one layer


class FrameSlots:
    """NVFP4 storage of one `[B, K, N, d]` cache tensor, one fp32 amax per (batch, frame) slot."""

    def __init__(self, batch: int, capacity: int, heads: int, head_dim: int, tokens_per_frame: int,
                 rule: str, centred: bool, device, all_heads_max: Callable[[Tensor], Tensor] | None = None):
        if head_dim % 16:
            raise ValueError(f"NVFP4 KV storage needs head_dim % 16 == 0 (got {head_dim})")
        frames = _frames(capacity, tokens_per_frame)
        self.tokens_per_frame = tokens_per_frame
        self.rule = rule
        self.all_heads_max = all_heads_max  # a head shard (core.kv_cache.LayerSpec): the slot amax spans all heads
        self.codes = torch.zeros(batch, capacity, heads, head_dim // 2, dtype=torch.uint8, device=device)
        self.scales = torch.zeros(batch, capacity, heads, head_dim // 16, dtype=torch.float8_e4m3fn,
                                  device=device)
        self.amax = torch.zeros(batch, frames, dtype=torch.float32, device=device)
        # Per-slot, per-(head, channel) mean subtracted before quantizing (centred keys only).
        self.mean = (torch.zeros(batch, frames, heads, head_dim, dtype=torch.bfloat16, device=device)
                     if centred else None)

    @property
    def nbytes(self) -> int:
        tensors = [self.codes, self.scales, self.amax] + ([self.mean] if self.mean is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def write(self, x_BnND: Tensor, start: int) -> None:
        """Quantize the new frames `x` into the slots starting at token `start` (in place)."""
        per_frame = self.tokens_per_frame
        first = _frames(start, per_frame)
        x_BfTND = x_BnND.float().unflatten(1, (-1, per_frame))
        frames = x_BfTND.shape[1]
        if self.mean is not None:
            mean_BfND = x_BfTND.mean(dim=2).to(self.mean.dtype)
            self.mean[:, first:first + frames] = mean_BfND
            # Subtract the stored (rounded) mean, so that adding it back is exact.
            x_BfTND = x_BfTND - mean_BfND.float().unsqueeze(2)
        # One amax per (batch, frame) slot; a max is exact in any order, so this equals each
        # slot's own max|x| that quantize() would compute.
        amax_Bf = x_BfTND.abs().amax(dim=(2, 3, 4))
        if self.all_heads_max is not None:
            amax_Bf = self.all_heads_max(amax_Bf)
        self.amax[:, first:first + frames] = amax_Bf
        if x_BfTND.is_cuda and triton is not None:  # every slot of a batch element in one launch
            tokens = slice(start, start + frames * per_frame)
            for b in range(x_BfTND.shape[0]):
                quantize_triton(x_BfTND[b], self.rule, slot_amax=amax_Bf[b],
                                out=NVFP4Tensor(self.codes[b, tokens], self.scales[b, tokens], amax_Bf[b], self.rule))
            return
        for b in range(x_BfTND.shape[0]):
            for i in range(frames):
                slot = quantize(x_BfTND[b, i], self.rule, amax=amax_Bf[b, i])
                tokens = slice(start + i * per_frame, start + (i + 1) * per_frame)
                self.codes[b, tokens] = slot.codes
                self.scales[b, tokens] = slot.scales

    def slide(self, roll: Roll) -> None:
        """Apply a cache roll: whole slots move left, nothing is requantized."""
        per_frame = self.tokens_per_frame
        slide_left(self.codes, roll)
        slide_left(self.scales, roll)
        frame_roll = Roll(_frames(roll.dst, per_frame), _frames(roll.src, per_frame),
                          _frames(roll.length, per_frame))
        slide_left(self.amax, frame_roll)
        if self.mean is not None:
            slide_left(self.mean, frame_roll)

    def dequantize_into(self, out_BKND: Tensor, end: int) -> None:
        """`out[:, :end]` = the dequantized slots `[0, end)`, in `out`'s dtype."""
        if end == 0:
            return
        frames = _frames(end, self.tokens_per_frame)
        mean = self.mean[:, :frames] if self.mean is not None else None
        if out_BKND.is_cuda and _triton_dequant_supported(out_BKND.shape[-1]):
            _dequantize_slots_triton(self.codes[:, :end], self.scales[:, :end], self.amax[:, :frames],
                                     self.rule, self.tokens_per_frame, mean, out_BKND[:, :end])
            return
        out_BKND[:, :end] = dequantize_slots(self.codes[:, :end], self.scales[:, :end],
                                             self.amax[:, :frames], self.rule, self.tokens_per_frame,
                                             mean).to(out_BKND.dtype)


# --------------------------------------------------------------------------------------------
# The shared window and the layer


class WindowBuffer:
    """The dequantized attention window, keys and values `[B, K, N, d]`. Layers attend one at a
    time, so one buffer serves every layer of every cache built with it (e.g. both CFG branches);
    it is allocated on first use and again only if a different shape/dtype/device asks for it."""

    def __init__(self):
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        k = self.k
        if k is None or tuple(k.shape) != tuple(shape) or k.dtype != dtype or k.device != device:
            self.k = torch.empty(shape, dtype=dtype, device=device)
            self.v = torch.empty_like(self.k)
        return self.k, self.v

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()


class NVFP4LayerKV:
    """NVFP4 key/value storage of one layer (the `core.kv_cache.LayerStorage` protocol: `plan`,
    `update_and_attend`, `nbytes`)."""

    def __init__(self, spec: LayerSpec, device, *, rule: str = "mse", center_keys: bool = True,
                 window: WindowBuffer | None = None, attention: Attention = sdpa):
        self.rule = check_rule(rule)
        self.center_keys = center_keys
        per_frame = spec.layout.tokens_per_frame
        self.tokens_per_frame = per_frame
        self.shape = (spec.batch, spec.layout.capacity, spec.heads, spec.head_dim)
        self.keys = FrameSlots(*self.shape, per_frame, rule, center_keys, device, spec.all_heads_max)
        self.values = FrameSlots(*self.shape, per_frame, rule, False, device, spec.all_heads_max)
        self.window = window if window is not None else WindowBuffer()
        self.attention = attention
        self.plan = None

    @property
    def nbytes(self) -> int:
        """Storage bytes (the shared window is not counted)."""
        return self.keys.nbytes + self.values.nbytes

    @eager_method
    def update_and_attend(self, q_BnND: Tensor, k_BnND: Tensor, v_BnND: Tensor) -> Tensor:
        """Apply the plan (roll slots, quantize the new frames), then attend over the dequantized
        history followed by the current chunk at full precision."""
        plan = self.plan
        assert plan is not None, "KVCache.begin() was not called"
        if plan.roll is not None:
            self.keys.slide(plan.roll)
            self.values.slide(plan.roll)
        if plan.keep_kv:  # a denoising step's keys are rewritten by the recache pass: not stored
            self.keys.write(k_BnND, plan.write_start)
            self.values.write(v_BnND, plan.write_start)
        window_k, window_v = self.window.get(self.shape, k_BnND.dtype, k_BnND.device)
        self.keys.dequantize_into(window_k, plan.write_start)
        self.values.dequantize_into(window_v, plan.write_start)
        window_k[:, plan.write_start:plan.write_end] = k_BnND
        window_v[:, plan.write_start:plan.write_end] = v_BnND
        return self.attention(q_BnND, window_k[:, :plan.write_end], window_v[:, :plan.write_end])


def nvfp4_storage(rule: str = "mse", window: WindowBuffer | None = None, *,
                  center_keys: bool = True, attention: Attention = sdpa) -> StorageFactory:
    """A `KVCache` storage factory: every layer NVFP4 (`NVFP4LayerKV`), all sharing one
    dequantized `window` (pass the same one to the caches of both guidance branches), attending
    with `attention` (default SDPA)."""
    check_rule(rule)
    window = window if window is not None else WindowBuffer()

    def make(spec: LayerSpec, device) -> NVFP4LayerKV:
        return NVFP4LayerKV(spec, device, rule=rule, center_keys=center_keys, window=window, attention=attention)

    return make


# --------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class KVMemory:
    bf16_bytes: int  # storage of one bf16 cache (one guidance branch)
    nvfp4_bytes: int  # storage of one NVFP4 cache
    window_bytes: int  # the shared dequantized window (bf16 keys + values, one per process)

    @property
    def ratio(self) -> float:
        return self.bf16_bytes / self.nvfp4_bytes


def kv_memory_5b_720p(center_keys: bool = True, rule: str = "mse") -> KVMemory:
    """Cache storage of the 5B at 704x1280 with the default stream (32-frame window, 880 tokens
    per frame, 24 heads of 128, 30 layers, batch 1), allocated on the meta device."""
    config = ModelConfig.preset("wan2.2-ti2v-5b")
    tokens_per_frame = (704 // 16 // 2) * (1280 // 16 // 2)  # VAE stride 16, patch 2x2 -> 22 x 40
    layout = CacheLayout.from_stream(StreamConfig(), tokens_per_frame)

    def meta_cache(**storage) -> KVCache:
        return KVCache(layout, config.num_layers, 1, config.num_heads, config.head_dim, torch.bfloat16, "meta",
                       **storage)

    bf16 = meta_cache().nbytes
    nvfp4 = meta_cache(storage=nvfp4_storage(rule, center_keys=center_keys)).nbytes
    window = 2 * layout.capacity * config.num_heads * config.head_dim * 2
    return KVMemory(bf16_bytes=bf16, nvfp4_bytes=nvfp4, window_bytes=window)


# --------------------------------------------------------------------------------------------
# CUDA: one Triton kernel dequantizes all held slots of a batch element (per-row amax lookup).


def _triton_dequant_supported(head_dim: int) -> bool:
    return triton is not None and head_dim >= 32 and head_dim & (head_dim - 1) == 0  # tl.arange: powers of 2


def _dequantize_slots_triton(codes: Tensor, scales: Tensor, amax_BF: Tensor, rule: str, tokens_per_frame: int,
                             mean_BFNd: Tensor | None, out_BmND: Tensor) -> None:
    """`out[...] = dequantize_slots(...)` in out's dtype, one kernel for all held slots."""
    batch, held, heads, head_dim = out_BmND.shape
    for t in (codes, scales, out_BmND):  # rows of one batch element must be contiguous
        assert t[0].is_contiguous() or held == 0
    e2m1, e4m3 = decode_tables(out_BmND.device)
    divisor = torch.tensor([rule_divisor(rule)], dtype=torch.float32, device=out_BmND.device)
    mean = mean_BFNd if mean_BFNd is not None else amax_BF  # any pointer: not read without a mean
    rows = held * heads
    block_rows = max(1, 4096 // head_dim)
    grid = (triton.cdiv(rows, block_rows), batch)
    _dequant_slots_kernel[grid](
        codes, scales.view(torch.uint8), amax_BF, mean, out_BmND, e2m1, e4m3, divisor,
        rows, heads, tokens_per_frame * heads,
        codes.stride(0), scales.stride(0), amax_BF.stride(0), mean.stride(0), out_BmND.stride(0),
        HALF=head_dim // 2, HAS_MEAN=mean_BFNd is not None, BLOCK_ROWS=block_rows,
        enable_fp_fusion=False)  # no FMA contraction: each product/sum rounds like the torch reference


if triton is not None:

    @triton.jit
    def _dequant_slots_kernel(codes_ptr, scales_ptr, amax_ptr, mean_ptr, out_ptr, e2m1_ptr, e4m3_ptr, divisor_ptr,
                              rows, heads, rows_per_frame,
                              codes_stride, scales_stride, amax_stride, mean_stride, out_stride,
                              HALF: tl.constexpr, HAS_MEAN: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        # Program (i, b): rows [i * BLOCK_ROWS, ...) of batch element b; row = token * heads + head.
        b = tl.program_id(1).to(tl.int64)
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
        byte_col = tl.arange(0, HALF)[None, :]
        ok = row < rows
        byte = tl.load(codes_ptr + b * codes_stride + row * HALF + byte_col, mask=ok, other=0).to(tl.int32)
        scale_bits = tl.load(scales_ptr + b * scales_stride + row * (HALF // 8) + byte_col // 8, mask=ok, other=0)
        scale = tl.load(e4m3_ptr + scale_bits.to(tl.int32))
        frame = row // rows_per_frame
        amax = tl.load(amax_ptr + b * amax_stride + frame, mask=ok, other=0.0)
        divisor = tl.load(divisor_ptr)
        low = tl.div_rn((tl.load(e2m1_ptr + (byte & 15)) * scale) * amax, divisor)  # even element
        high = tl.div_rn((tl.load(e2m1_ptr + (byte >> 4)) * scale) * amax, divisor)
        values = tl.interleave(low, high)
        col = tl.arange(0, 2 * HALF)[None, :]
        if HAS_MEAN:
            mean_row = frame * heads + row % heads
            values += tl.load(mean_ptr + b * mean_stride + mean_row * (2 * HALF) + col, mask=ok, other=0.0).to(
                tl.float32)
        if out_ptr.dtype.element_ty == tl.bfloat16:  # round to nearest even explicitly, as torch does
            bits = values.to(tl.int32, bitcast=True)
            values = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        tl.store(out_ptr + b * out_stride + row * (2 * HALF) + col, values.to(out_ptr.dtype.element_ty), mask=ok)
