"""Triton NVFP4 quantise / dequantise kernels, bit-identical to the torch reference in quant.nvfp4.

1-D blocks only: the 16-element groups of a [..., K] tensor (K % 16 == 0) are consecutive in
memory, so the kernels treat the input as a flat array of NB groups; one program handles GROUPS of
them as a [GROUPS, 16] tile. The math is the reference's, op for op, in fp32: correctly rounded
divisions (`div_rn` per block; per element an fp64 multiply by the block's fp64 reciprocal, which
rounds to the same fp32 quotient, see `_div_exact`), FMA contraction off (it would change the error
sums), the E4M3 / E2M1 / bf16 round-to-nearest-even done with exact integer and magic-number
arithmetic (so the CPU interpreter agrees too), and the same adjacent-pairs tree for the per-block
error sums.

Triton is imported on the first kernel call, so this module imports without it; the CPU
interpreter works with TRITON_INTERPRET=1 set before that first call.

Shape legend: NB = number of 16-element blocks, G = blocks per program (GROUPS).
"""

from __future__ import annotations

import functools

import torch

from core.errors import UserError
from quant.nvfp4 import (
    ADAPTIVE_RULES,
    BLOCK,
    NVFP4Tensor,
    check_input,
    check_rounding,
    check_rule,
    make_noise,
    resolve_amax,
    rule_divisor,
    rule_limits,
)

QUANT_GROUPS = 64  # 16-element blocks per program (1024 elements)
DEQUANT_GROUPS = 128
NUM_WARPS = 4
ERROR_IDS = {"mse": 0, "mae": 1, "abs_max": 2}

_kernels: dict | None = None
tl = triton = None  # set by _load_kernels (the kernels look names up in this module's globals)


@functools.cache  # asked per layer per forward; the answer cannot change within a process
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _load_kernels() -> dict:
    """Import triton and define the kernels once (their globals `tl`/`triton` are set here)."""
    global _kernels
    if _kernels is not None:
        return _kernels
    try:
        import triton as triton_module
        import triton.language as tl_module
    except ImportError as err:
        raise UserError(
            "the NVFP4 Triton kernels need the `triton` package (pip install triton, or use the torch "
            "reference quant.nvfp4.quantize)"
        ) from err
    globals().update(tl=tl_module, triton=triton_module)
    triton, tl = triton_module, tl_module  # noqa: F811 (the same objects, for the decorators below)

    @triton.jit
    def _rne_bits(y):
        # Add 1.5 * 2**23: for 0 <= y < 2**22 (or y >= -0.5) the fp32 sum has no fraction bits left, so it is
        # rne(y) + 1.5 * 2**23 (ties to even), and its low mantissa bits are rne(y) as an integer.
        return y + 12582912.0

    @triton.jit
    def _div_exact(a, inv64):
        # fp32 a / b, correctly rounded, as RN32(a * RN64(1 / b)) with inv64 = RN64(1 / b): the product is
        # within 2**-52 (relative) of a / b, while a quotient of two fp32 numbers is never nearer than about
        # 2**-49 to an fp32 rounding midpoint (and never on one), so both round to the same fp32 number.
        # Much cheaper than a per-element div.rn, and the CPU interpreter computes it identically.
        return (a.to(tl.float64) * inv64).to(tl.float32)

    @triton.jit
    def _e4m3_round(v):
        # Round v >= 0 to the nearest E4M3 value (ties to even), saturating at 448; result in fp32.
        v = tl.minimum(v, 448.0)
        bits = v.to(tl.int32, bitcast=True)
        lsb = (bits >> 20) & 1  # lowest kept mantissa bit (E4M3 keeps 3 of fp32's 23)
        normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
        subnormal = (v + 16384.0) - 16384.0  # fp32 ulp at 2**14 is 2**-9, the E4M3 subnormal step
        return tl.where(v < 0.015625, subnormal, normal)

    @triton.jit
    def _e4m3_byte(r):
        # An fp32 value already on the E4M3 grid -> its byte.
        bits = r.to(tl.int32, bitcast=True)
        normal = (((bits >> 23) - 120) << 3) | ((bits >> 20) & 7)
        subnormal = (r * 512.0).to(tl.int32)
        return tl.where(r < 0.015625, subnormal, normal)

    @triton.jit
    def _e4m3_value(b):
        # E4M3 byte (int32, sign bit clear) -> fp32.
        e = b >> 3
        m = b & 7
        normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        subnormal = m.to(tl.float32) * 0.001953125
        return tl.where(e == 0, subnormal, normal)

    @triton.jit
    def _e2m1_round(scaled, noise, STOCHASTIC: tl.constexpr):
        # One rounding at the local step (0.5 below 2, 1 in [2, 4), 2 from 4): y = |x| / step (+ noise) is
        # rounded to an integer n; the grid magnitude is n * step and the code index n + (0, 2, 4).
        # Same values as the reference's three roundings (scaling by 2 or 1/2 is exact).
        mag = tl.abs(scaled)
        low = mag < 2.0
        mid = mag < 4.0
        per_unit = tl.where(low, 2.0, tl.where(mid, 1.0, 0.5))
        y = mag * per_unit
        if STOCHASTIC:
            y = y + noise
        t = _rne_bits(y)
        count = tl.minimum(t.to(tl.int32, bitcast=True) - 0x4B400000, 8)  # 8 > any in-range count
        index = tl.minimum(count + tl.where(low, 0, tl.where(mid, 2, 4)), 7)
        grid = tl.minimum((t - 12582912.0) * tl.where(low, 0.5, tl.where(mid, 1.0, 2.0)), 6.0)
        return index, grid

    @triton.jit
    def _e2m1_value(c):
        # E2M1 code (int32 0..15) -> fp32, built from bits: 2**(e-1) * (1 + m/2), or m/2 when e == 0.
        e = (c >> 1) & 3
        m = c & 1
        bits = tl.where(e == 0, m * 0x3F000000, ((e + 126) << 23) | (m << 22))
        return (bits | ((c & 8) << 28)).to(tl.float32, bitcast=True)

    @triton.jit
    def _with_sign(mag, negative):
        # Set the sign bit (Triton negates as 0 - x, which would lose -0.0).
        return (mag.to(tl.int32, bitcast=True) | (negative.to(tl.int32) << 31)).to(tl.float32, bitcast=True)

    @triton.jit
    def _to_bf16_rne(v):
        # fp32 -> bf16 with ties to even done on the bits (the CPU interpreter's own cast truncates).
        bits = v.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return rounded.to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def _pair_sum_16(e, G: tl.constexpr):
        # Adjacent pairs level by level, as quant.nvfp4._pair_tree_sum.
        a, b = tl.split(tl.reshape(e, [G, 8, 2]))
        a, b = tl.split(tl.reshape(a + b, [G, 4, 2]))
        a, b = tl.split(tl.reshape(a + b, [G, 2, 2]))
        a, b = tl.split(a + b)
        return a + b

    @triton.jit
    def _block_error(d, ERROR: tl.constexpr, G: tl.constexpr):
        if ERROR == 0:
            return _pair_sum_16(d * d, G)
        elif ERROR == 1:
            return _pair_sum_16(tl.abs(d), G)
        else:
            return tl.max(tl.abs(d), axis=1)

    @triton.jit
    def _candidate(x64, noise, s, amax, qs, STOCHASTIC: tl.constexpr):
        # Scaled values x / (s * amax / (Q*S)) (0 where s == 0), rounded: (code index, grid magnitude, sign).
        step = tl.div_rn(s * amax, qs)  # s, amax: per block
        inv_step = 1.0 / step.to(tl.float64)  # fp64 division is always correctly rounded
        scaled = tl.where(s[:, None] != 0.0, _div_exact(x64, inv_step[:, None]), 0.0)
        index, grid = _e2m1_round(scaled, noise, STOCHASTIC)
        return index, grid, scaled < 0.0

    @triton.jit
    def quantize_kernel(
        x_ptr,
        noise_ptr,
        amax_ptr,
        codes_ptr,
        scales_ptr,
        n_blocks,
        blocks_per_amax,
        q,
        qs,
        ADAPTIVE: tl.constexpr,
        ERROR: tl.constexpr,
        STOCHASTIC: tl.constexpr,
        G: tl.constexpr,
    ):
        blk = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
        live = blk < n_blocks
        offs = blk[:, None] * 16 + tl.arange(0, 16)[None, :]
        x = tl.load(x_ptr + offs, mask=live[:, None], other=0.0).to(tl.float32)
        if STOCHASTIC:
            noise = tl.load(noise_ptr + offs, mask=live[:, None], other=0.0)
        else:
            noise = x  # unused
        amax = tl.load(amax_ptr + blk // blocks_per_amax, mask=live, other=1.0)  # per block: slot amax

        bmax = tl.max(tl.abs(x), axis=1)
        s_hp = tl.div_rn(bmax, q) * tl.div_rn(qs, amax)
        s_hp = tl.where(amax == 0.0, 0.0, s_hp)
        s = _e4m3_round(s_hp)
        x64 = x.to(tl.float64)
        index, grid, neg = _candidate(x64, noise, s, amax, qs, STOCHASTIC)
        if ADAPTIVE:
            s4 = _e4m3_round(s_hp * 1.5)
            index4, grid4, neg4 = _candidate(x64, noise, s4, amax, qs, STOCHASTIC)
            inv_qs = 1.0 / (tl.zeros([1], dtype=tl.float64) + qs)
            deq6 = _div_exact((_with_sign(grid, neg) * s[:, None]) * amax[:, None], inv_qs)
            deq4 = _div_exact((_with_sign(grid4, neg4) * s4[:, None]) * amax[:, None], inv_qs)
            pick4 = _block_error(deq4 - x, ERROR, G) < _block_error(deq6 - x, ERROR, G)
            index = tl.where(pick4[:, None], index4, index)
            neg = tl.where(pick4[:, None], neg4, neg)
            s = tl.where(pick4, s4, s)

        code = index | (neg.to(tl.int32) << 3)
        low, high = tl.split(tl.reshape(code, [G, 8, 2]))
        packed = (low | (high << 4)).to(tl.uint8)  # the even element in the low nibble
        tl.store(codes_ptr + blk[:, None] * 8 + tl.arange(0, 8)[None, :], packed, mask=live[:, None])
        tl.store(scales_ptr + blk, _e4m3_byte(s).to(tl.uint8), mask=live)

    @triton.jit
    def dequantize_kernel(codes_ptr, scales_ptr, amax_ptr, out_ptr, n_blocks, qs, G: tl.constexpr):
        # codes_ptr: the packed codes viewed as int64, one word (16 nibbles) per block.
        blk = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
        live = blk < n_blocks
        word = tl.load(codes_ptr + blk, mask=live, other=0)
        code = ((word[:, None] >> (4 * tl.arange(0, 16).to(tl.int64))[None, :]) & 15).to(tl.int32)
        s = _e4m3_value(tl.load(scales_ptr + blk, mask=live, other=0).to(tl.int32))
        amax = tl.load(amax_ptr)
        inv_qs = 1.0 / (tl.zeros([1], dtype=tl.float64) + qs)
        values = _div_exact((_e2m1_value(code) * s[:, None]) * amax, inv_qs)
        if out_ptr.dtype.element_ty == tl.bfloat16:
            values = _to_bf16_rne(values)
        offs = blk[:, None] * 16 + tl.arange(0, 16)[None, :]
        tl.store(out_ptr + offs, values.to(out_ptr.dtype.element_ty), mask=live[:, None])

    # Triton resolves the helpers called inside a kernel through the module globals.
    helpers = (_rne_bits, _div_exact, _e4m3_round, _e4m3_byte, _e4m3_value, _e2m1_round, _e2m1_value)
    helpers += (_with_sign, _to_bf16_rne)
    globals().update({fn.fn.__name__: fn for fn in (*helpers, _pair_sum_16, _block_error, _candidate)})
    _kernels = {"quantize": quantize_kernel, "dequantize": dequantize_kernel}
    return _kernels


def _launch_options() -> dict:
    # FMA contraction would fuse d*d into the error sums' adds and break bit-exactness.
    return {"num_warps": NUM_WARPS, "enable_fp_fusion": False}


def quantize_triton(
    x: torch.Tensor,
    rule: str = "static_6",
    rounding: str = "nearest",
    noise: torch.Tensor | None = None,
    amax=None,
    *,
    slot_amax: torch.Tensor | None = None,
    out: NVFP4Tensor | None = None,
) -> NVFP4Tensor:
    """Same result as quant.nvfp4.quantize(x, rule, rounding, noise=noise, amax=amax) with 1-D blocks.

    `slot_amax [n]`: x is `n` equal slots along its first dim, each quantized with its own amax (one
    launch for what would be `n` calls; the returned `amax` is that vector). `out`: write the codes
    and scales into these (contiguous) buffers instead of new ones."""
    check_rule(rule)
    check_rounding(rounding)
    check_input(x)
    kernels = _load_kernels()
    x = x.detach().contiguous()
    if slot_amax is not None:
        assert amax is None and x.shape[0] % slot_amax.numel() == 0, "slots must split the first dim"
        amax_t = slot_amax.detach().float().contiguous()
    else:
        amax_t = resolve_amax(x, amax)
    stochastic = rounding == "stochastic"
    noise_t = make_noise(x, noise, None).contiguous() if stochastic else x
    n_blocks = x.numel() // BLOCK
    if out is not None:
        assert out.codes.is_contiguous() and out.scales.is_contiguous() and out.codes.numel() * 2 == x.numel()
        codes, scales = out.codes.view(-1), out.scales.view(torch.uint8).view(-1)
    else:
        codes = torch.empty(x.numel() // 2, dtype=torch.uint8, device=x.device)
        scales = torch.empty(n_blocks, dtype=torch.uint8, device=x.device)
    q, s = rule_limits(rule)
    grid = (triton.cdiv(n_blocks, QUANT_GROUPS),)
    if n_blocks > 0:
        kernels["quantize"][grid](
            x,
            noise_t,
            amax_t,
            codes,
            scales,
            n_blocks,
            n_blocks // amax_t.numel(),
            q,
            q * s,
            ADAPTIVE=rule in ADAPTIVE_RULES,
            ERROR=ERROR_IDS.get(rule, 0),
            STOCHASTIC=stochastic,
            G=QUANT_GROUPS,
            **_launch_options(),
        )
    lead, k = x.shape[:-1], x.shape[-1]
    return NVFP4Tensor(codes=codes.reshape(*lead, k // 2),
                       scales=scales.view(torch.float8_e4m3fn).reshape(*lead, k // BLOCK), amax=amax_t, rule=rule)


def dequantize_triton(t: NVFP4Tensor, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None):
    """Same values as quant.nvfp4.dequantize(t, dtype); written into `out` (contiguous, t.shape) when given."""
    kernels = _load_kernels()
    if out is None:
        out = torch.empty(t.shape, dtype=dtype, device=t.codes.device)
    elif out.shape != t.shape or not out.is_contiguous() or out.device != t.codes.device:
        raise ValueError(f"out must be a contiguous {tuple(t.shape)} tensor on {t.codes.device}")
    codes = t.codes.contiguous()
    if codes.storage_offset() % 8 != 0:
        codes = codes.clone()  # the kernel reads 8-byte words
    codes = codes.view(-1).view(torch.int64)
    scales = t.scales.contiguous().view(torch.uint8)
    amax = t.amax.float().reshape(()).contiguous()
    n_blocks = codes.numel()
    if n_blocks > 0:
        grid = (triton.cdiv(n_blocks, DEQUANT_GROUPS),)
        kernels["dequantize"][grid](
            codes, scales, amax, out, n_blocks, rule_divisor(t.rule), G=DEQUANT_GROUPS, **_launch_options()
        )
    return out
