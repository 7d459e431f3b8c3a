"""Triton per-row FP8 (E4M3) quantizer, bit-identical to `quant.fp8.quantize_rows_reference`.

One program quantizes one row of a `[M, K]` matrix held whole in registers (K <= 16384 covers
every DiT linear): the row's amax, its scale `max(amax, floor) / 448`, the codes
`e4m3(clamp(x / scale, ±448))`. Divisions are `div_rn` (correctly rounded, like torch's
tensor divisions); the E4M3 round-to-nearest-even is done on the fp32 bits, so the CPU
interpreter (TRITON_INTERPRET=1, set before the first call) computes the same bytes as the GPU.

This is the eager CUDA path of `FP8Linear`: one read of the activation, one write of the codes.
Under torch.compile the layer uses the torch reference ops instead, which Inductor fuses into
the kernel that produces the activation.
"""

from __future__ import annotations

import torch

from core.errors import UserError

MAX_ROW = 16384  # widest row one program holds (the 5B's ffn.2 input is 14336)

_kernel = None
tl = triton = None  # set by _load_kernel (the kernel looks names up in this module's globals)


def _load_kernel():
    """Import triton and define the kernel once."""
    global _kernel
    if _kernel is not None:
        return _kernel
    try:
        import triton as triton_module
        import triton.language as tl_module
    except ImportError as err:
        raise UserError("the FP8 Triton quantizer needs the `triton` package (pip install triton, or use "
                        "quant.fp8.quantize_rows_reference)") from err
    globals().update(tl=tl_module, triton=triton_module)
    triton, tl = triton_module, tl_module  # noqa: F811 (the same objects, for the decorators below)

    @triton.jit
    def _e4m3_code(mag):
        # |v| <= 448 (fp32) -> its E4M3 byte without sign, rounded to nearest, ties to even.
        bits = mag.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # keep 3 of fp32's 23 mantissa bits
        normal = (((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)  # exponent bias 127 -> 7
        # Below 2**-6 the E4M3 step is 2**-9, the fp32 ulp at 2**14: the sum rounds, the difference is exact.
        subnormal = (((mag + 16384.0) - 16384.0) * 512.0).to(tl.int32)
        return tl.where(mag < 0.015625, subnormal, normal)

    @triton.jit
    def quantize_rows_kernel(x_ptr, codes_ptr, scales_ptr, K, row_stride, amax_floor, e4m3_max,
                             BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        live = cols < K
        x = tl.load(x_ptr + row * row_stride + cols, mask=live, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.div_rn(tl.maximum(amax, amax_floor), e4m3_max)
        y = tl.div_rn(x, scale)
        code = _e4m3_code(tl.minimum(tl.abs(y), e4m3_max))
        sign = (y.to(tl.int32, bitcast=True) >> 24) & 0x80  # also for -0.0 and values rounding to zero
        tl.store(codes_ptr + row * K + cols, (code | sign).to(tl.uint8), mask=live)
        tl.store(scales_ptr + row, scale)

    globals()["_e4m3_code"] = _e4m3_code  # jit functions resolve helpers through the module globals
    _kernel = quantize_rows_kernel
    return _kernel


def quantize_rows_triton(x: torch.Tensor, amax_floor: float,
                         e4m3_max: float = 448.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [..., K]` (fp32 / bf16 / fp16) -> (codes float8_e4m3fn `[..., K]`, scales fp32 `[...]`),
    one scale per row; see the module docstring. `amax_floor` keeps zero rows finite."""
    width = x.shape[-1]
    if width > MAX_ROW:
        raise UserError(f"rows of {width} elements exceed the FP8 quantizer's {MAX_ROW}: use "
                        f"quant.fp8.quantize_rows_reference")
    kernel = _load_kernel()
    rows = x.reshape(-1, width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    codes = torch.empty(rows.shape, dtype=torch.uint8, device=x.device)
    scales = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    if rows.numel():
        block = triton.next_power_of_2(width)
        kernel[(rows.shape[0],)](rows, codes, scales, width, rows.stride(0), amax_floor, e4m3_max,
                                 BLOCK=block, num_warps=min(16, max(4, block // 1024)))
    return codes.view(torch.float8_e4m3fn).reshape(x.shape), scales.reshape(x.shape[:-1])
