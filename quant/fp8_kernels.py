"""Triton FP8 (E4M3) kernels: the per-row quantizer, bit-identical to
`quant.fp8.quantize_rows_reference`, and the FP8 KV cache's re-encoding of grown heads
(`rescale_heads_triton`, bit-identical to `quant.fp8_kv.rescale_stored`).

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
_rescale_kernel = None
tl = triton = None  # set by _load_kernel (the kernel looks names up in this module's globals)


def _load_kernel():
    """Import triton and define the kernels once."""
    global _kernel, _rescale_kernel
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

    @triton.jit
    def rescale_heads_kernel(codes_ptr, ratio_ptr, K, N, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program: BLOCK_T tokens of one (batch, head) of codes [B, K, N, D] (bytes). A head whose
        # ratio is 1 keeps its codes: the program returns at once (masked-off loads were not free:
        # 0.11 ms a call on an H100 for the index arithmetic alone, docs/BENCHMARKS.md).
        head = tl.program_id(0)  # b * N + n
        ratio = tl.load(ratio_ptr + head)
        if ratio != 1.0:  # a head whose scale did not grow: nothing to read or write
            b = (head // N).to(tl.int64)
            n = head % N
            t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
            d = tl.arange(0, BLOCK_D)
            offsets = ((b * K + t[:, None]) * N + n) * D + d[None, :]
            live = (t[:, None] < K) & (d[None, :] < D)
            byte = tl.load(codes_ptr + offsets, mask=live, other=0).to(tl.int32)
            # E4M3 byte -> fp32 bits: sign, exponent bias 7 -> 127, 3 mantissa bits; subnormals m * 2**-9
            exponent = (byte >> 3) & 15
            mantissa = byte & 7
            normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
            magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)
            scaled = magnitude * ratio  # a power of two <= 1: exact in fp32
            code = _e4m3_code(scaled)  # <= the stored magnitude <= 448: no clamp
            tl.store(codes_ptr + offsets, (code | (byte & 0x80)).to(tl.uint8), mask=live)

    globals()["_e4m3_code"] = _e4m3_code  # jit functions resolve helpers through the module globals
    _rescale_kernel = rescale_heads_kernel
    _kernel = quantize_rows_kernel
    return _kernel


def rescale_heads_triton(codes_BKND: torch.Tensor, ratio_BN: torch.Tensor) -> None:
    """In place: every E4M3 code of head (b, n) of `codes [B, K, N, D]` times `ratio [B, N]` (a power
    of two <= 1), re-rounded to E4M3. Heads whose ratio is exactly 1 are not read or written, so a
    cache write whose scales did not grow costs nothing here. Equal byte for byte to
    `quant.fp8_kv.rescale_stored`."""
    _load_kernel()
    B, K, N, D = codes_BKND.shape
    if not codes_BKND.is_contiguous():
        raise ValueError("the FP8 cache codes must be contiguous [B, K, N, D]")
    ratio = ratio_BN.float().contiguous()  # (already fp32 [B, N] from quant.fp8_kv.grown_scales: no copy)
    if codes_BKND.numel():
        block_t = 128
        _rescale_kernel[(B * N, triton.cdiv(K, block_t))](codes_BKND.view(torch.uint8), ratio, K, N, D,
                                                          BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(D))


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
