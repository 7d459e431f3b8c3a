"""FP8 (E4M3) storage for the streaming KV cache (`--kv-precision fp8`).

A `core.kv_cache.LayerStorage`: keys and values are held as E4M3 codes with one fp32 scale per
(batch, head) for the whole window, the layout FlashAttention-3's FP8 forward reads directly
(`q/k/v_descale [B, N]`). So with `--attention fp8` the window is never re-quantized: each call
quantizes only the queries and the new keys/values, and the kernel attends over the stored codes.
Without it, the window is decoded into one shared bf16 buffer and attended by SDPA (any device).
Half the bytes of the bf16 cache.

Why one running scale: a kernel takes one descale per head for every key, so a head's scale must
cover every stored token. It is the running max of `amax / 448`, rounded up to a power of two, over
everything written since the stream began (or `reset`); when a write raises it, the stored codes of
that head are re-encoded to the new scale (`codes * old / new`, a power of two: exact for every
normal code, only codes below E4M3's normal range, < 2**-6 of the scale, round again). No host sync,
no branch on the host: the re-encoding runs on every call with ratio exactly 1 for a head whose scale
did not grow, which leaves those codes bit for bit. On CUDA it is a Triton kernel that skips such heads
without reading them (`quant.fp8_kernels.rescale_heads_triton`): once the scales settle, a write
touches only the new tokens. (The whole-window pass it replaces took 16 % of a 2-step FP8 block on
an H100: docs/BENCHMARKS.md, 2026-12-07.)

Legend: B batch, K capacity (tokens), N heads, d head size, n new tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from core.attention import sdpa
from core.eager import eager_method
from core.kv_cache import LayerSpec, StorageFactory, slide_left
from quant.fp8 import AMAX_FLOOR, E4M3_MAX
from quant.fp8_attention import QuantizedQKV
from quant.fp8_kernels import rescale_heads_triton
from quant.kernels import triton_available
from quant.kv import WindowBuffer

FP8 = torch.float8_e4m3fn

# (queries [B, n, N, d] in the working dtype, keys, values over the window) -> [B, n, N, d]
CodeAttention = Callable[[Tensor, QuantizedQKV, QuantizedQKV], Tensor]


def head_scales(x_BnND: Tensor) -> Tensor:
    """fp32 `[B, N]`: the smallest power of two >= `max(amax, AMAX_FLOOR) / 448` over each head's
    tokens and channels. A power of two, so that re-encoding at a grown scale is an exact shift of
    every normal code (E4M3's relative precision is the same in every binade, so the rounding up
    costs no mantissa bits)."""
    amax = x_BnND.float().abs().amax(dim=(1, 3))
    mantissa, exponent = torch.frexp(amax.clamp(min=AMAX_FLOOR) / amax.new_full((), E4M3_MAX))
    return torch.ldexp(torch.ones_like(mantissa), exponent - (mantissa == 0.5).to(exponent.dtype))


def encode(x_BnND: Tensor, scale_BN: Tensor) -> Tensor:
    """E4M3 codes of `x` at the given per-head scales (saturating)."""
    return (x_BnND.float() / scale_BN[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def grown_scales(scale_BN: Tensor, x_BnND: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(new scales covering `x`, ratio old / new (1 where a head did not grow), `x`'s codes at the new
    scales): everything of a write that reads the new tokens only."""
    new_scale = torch.maximum(scale_BN, head_scales(x_BnND))
    return new_scale, scale_BN / new_scale, encode(x_BnND, new_scale)


def rescale_stored(codes_BKND: Tensor, ratio_BN: Tensor) -> None:
    """Re-encode every stored code of head (b, n) at `ratio[b, n]` times its value. In place; x * 1 is
    x, so heads with ratio 1 keep their codes."""
    codes_BKND.copy_((codes_BKND.float() * ratio_BN[:, None, :, None]).to(FP8))


def write_step(codes_BKND: Tensor, scale_BN: Tensor, x_BnND: Tensor, start: int, *,
               grow: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]] = grown_scales,
               rescale: Callable[[Tensor, Tensor], None] = rescale_stored) -> None:
    """One write of `x` at token `start`: grow the scale to cover `x`, re-encode the stored codes to
    it (exact where it did not grow), store `x`'s codes. In place. (`grow` / `rescale`: other
    implementations of the same two steps, see `fast_write_step`.)"""
    new_scale, ratio, x_codes = grow(scale_BN, x_BnND)
    rescale(codes_BKND, ratio)
    codes_BKND[:, start:start + x_BnND.shape[1]] = x_codes
    scale_BN.copy_(new_scale)


# The scale of an empty head: what `head_scales` gives an all-zero write (2**-48), a power of two
# like every later scale.
FLOOR_SCALE = float(head_scales(torch.zeros(1, 1, 1, 1)))


@functools.cache
def _compiled_grown_scales():
    return torch.compile(grown_scales, dynamic=None)


def fast_write_step(codes_BKND: Tensor, scale_BN: Tensor, x_BnND: Tensor, start: int) -> None:
    """`write_step`, bit for bit; on CUDA the new tokens' part compiled (a few fused passes instead of
    a dozen kernels) and the stored codes re-encoded only for heads whose scale grew (Triton)."""
    if codes_BKND.is_cuda and triton_available():
        write_step(codes_BKND, scale_BN, x_BnND, start, grow=_compiled_grown_scales(), rescale=rescale_heads_triton)
    else:
        write_step(codes_BKND, scale_BN, x_BnND, start)


class FP8LayerKV:
    """FP8 key/value storage of one layer (the `core.kv_cache.LayerStorage` protocol: `plan`,
    `update_and_attend`, `nbytes`; `reset` forgets the running scales)."""

    def __init__(self, spec: LayerSpec, device, *, attention: CodeAttention | None = None,
                 window: WindowBuffer | None = None):
        shape = (spec.batch, spec.layout.capacity, spec.heads, spec.head_dim)
        self.k_codes = torch.zeros(shape, dtype=FP8, device=device)
        self.v_codes = torch.zeros_like(self.k_codes)
        self.k_scale = torch.empty(spec.batch, spec.heads, dtype=torch.float32, device=device)
        self.v_scale = torch.empty_like(self.k_scale)
        self.window = window if window is not None else WindowBuffer()
        self.attention = attention
        self.plan = None
        self.reset()

    def reset(self) -> None:
        """A new stream: the scales start from the floor again (so a stream never depends on the
        one before it)."""
        self.k_scale.fill_(FLOOR_SCALE)
        self.v_scale.fill_(FLOOR_SCALE)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k_codes, self.v_codes, self.k_scale, self.v_scale))

    def window_qkv(self, end: int) -> tuple[QuantizedQKV, QuantizedQKV]:
        """The stored keys and values `[0, end)` as codes + per-head scales `[B, N, 1]`."""
        return (QuantizedQKV(self.k_codes[:, :end], self.k_scale[..., None], end),
                QuantizedQKV(self.v_codes[:, :end], self.v_scale[..., None], end))

    @eager_method
    def update_and_attend(self, q_BnND: Tensor, k_BnND: Tensor, v_BnND: Tensor) -> Tensor:
        """Apply the plan (roll, write the new keys/values as codes), then attend over the window."""
        plan = self.plan
        assert plan is not None, "KVCache.begin() was not called"
        if plan.roll is not None:  # fp8 has no copy kernels everywhere: move the bytes
            slide_left(self.k_codes.view(torch.uint8), plan.roll)
            slide_left(self.v_codes.view(torch.uint8), plan.roll)
        fast_write_step(self.k_codes, self.k_scale, k_BnND, plan.write_start)
        fast_write_step(self.v_codes, self.v_scale, v_BnND, plan.write_start)
        k, v = self.window_qkv(plan.write_end)
        if self.attention is not None:
            return self.attention(q_BnND, k, v)
        return self._attend_decoded(q_BnND, k, v)

    def _attend_decoded(self, q_BnND: Tensor, k: QuantizedQKV, v: QuantizedQKV) -> Tensor:
        """SDPA over the window decoded into the shared buffer (working dtype)."""
        end = k.codes.shape[1]
        window_k, window_v = self.window.get(tuple(self.k_codes.shape), q_BnND.dtype, q_BnND.device)
        for out, stored in ((window_k, k), (window_v, v)):
            out[:, :end] = decode(stored.codes, stored.scales[..., 0]).to(q_BnND.dtype)
        return sdpa(q_BnND, window_k[:, :end], window_v[:, :end])


def decode(codes_BLND: Tensor, scale_BN: Tensor) -> Tensor:
    """fp32 values of per-head codes."""
    return codes_BLND.float() * scale_BN[:, None, :, None]


def fp8_storage(attention: CodeAttention | None = None, window: WindowBuffer | None = None) -> StorageFactory:
    """A `KVCache` storage factory: every layer FP8 (`FP8LayerKV`), attending with `attention`
    over the stored codes (e.g. `quant.fp8_attention.FA3FP8Attention.attend_cached`) or, when None,
    with SDPA over a decoded window shared by every layer."""
    window = window if window is not None else WindowBuffer()

    def make(spec: LayerSpec, device) -> FP8LayerKV:
        return FP8LayerKV(spec, device, attention=attention, window=window)

    return make
