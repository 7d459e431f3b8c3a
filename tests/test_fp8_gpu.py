"""GPU checks of the FP8 linears (skipped without CUDA / FP8 tensor cores): the Triton quantizer ==
the CPU reference bit for bit, torch._scaled_mm == the plain-torch reference GEMM (within fp32
accumulation error without fast accumulation, an SQNR floor with it), the layer's two paths, and
compiled DiT blocks == eager."""

from __future__ import annotations

import pytest
import torch

from core.optimize import compile_blocks
from quant.fp8 import (
    FP8Config,
    FP8Linear,
    dequantize_rows,
    fp8_gemm_available,
    fp8_gemm_reference,
    quantize_fp8,
    quantize_rows,
    quantize_rows_reference,
)
from tests.conftest import tiny_model
from tests.test_fp8 import accumulation_bound, activations, spread_rows
from tests.test_quant_linear import dit_forward, gaussian, linear_with, sqnr_db

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or not fp8_gemm_available("cuda"),
                               reason="needs FP8 tensor cores (compute capability >= 8.9)")
SHAPES = [(3072, 3072), (14336, 3072), (3072, 14336)]  # (N, K) of the 5B block linears


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [3072, 14336, 200])
def test_triton_quantizer_equals_cpu_reference(dtype, width):
    x = spread_rows((64, width), seed=width, dtype=dtype)
    codes, scales = quantize_rows(x.cuda())  # the Triton kernel in eager CUDA runs
    ref_codes, ref_scales = quantize_rows_reference(x)
    assert torch.equal(bits(codes).cpu(), bits(ref_codes)) and torch.equal(scales.cpu(), ref_scales)


@needs_fp8
@pytest.mark.parametrize("shape", SHAPES)
def test_scaled_mm_within_accumulation_error_of_the_reference(shape):
    n, k = shape
    x = activations(512, k, 1, 100).cuda()
    layer = FP8Linear.from_linear(linear_with(gaussian(shape, 2, torch.bfloat16),
                                              gaussian((n,), 3, torch.bfloat16, 0.02)).cuda(), fast_accum=False)
    codes, scales = quantize_rows(x)
    out = layer(x)  # _scaled_mm, bf16 out
    a, b = dequantize_rows(codes, scales, torch.float64), layer.dequantized_weight(torch.float64)
    exact = a @ b.T + layer.bias.double()
    bf16_step = 2.0**-8 * exact.abs()  # the output is rounded once to bf16
    # Hopper's FP8 MMA accumulates a few K-steps in reduced precision before each fp32 promotion,
    # so the fp32 worst case (gamma_K with u = 2**-24) gets u = 2**-20 here (~16x headroom).
    tolerance = accumulation_bound(a, b, exact) * 16 + bf16_step
    assert ((out.double() - exact).abs() <= tolerance).all()


@needs_fp8
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_accumulation_stays_close_to_the_reference(shape):
    n, k = shape
    x = activations(512, k, 4, 100).cuda()
    layer = FP8Linear.from_linear(linear_with(gaussian(shape, 5, torch.bfloat16),
                                              gaussian((n,), 6, torch.bfloat16, 0.02)).cuda(), fast_accum=True)
    codes, scales = quantize_rows(x)
    reference = fp8_gemm_reference(codes, scales, layer.weight, layer.weight_scale, layer.bias, torch.float32)
    assert sqnr_db(reference, layer(x)) >= 35.0  # the FP8 quantization itself is ~28.5 dB


@needs_fp8
def test_emulated_and_tensor_core_layers_agree():
    weight, bias = gaussian((256, 512), 7, torch.bfloat16), gaussian((256,), 8, torch.bfloat16, 0.02)
    fast = FP8Linear.from_linear(linear_with(weight, bias).cuda(), fast_accum=False)
    emulated = FP8Linear.from_linear(linear_with(weight, bias).cuda(), emulate=True)
    assert torch.equal(bits(fast.weight), bits(emulated.weight))
    x = gaussian((3, 40, 512), 9, torch.bfloat16, 1.0).cuda()
    assert sqnr_db(emulated(x), fast(x)) >= 45.0  # same codes; accumulation order and rounding only


@needs_fp8
def test_compiled_blocks_are_as_accurate_as_eager():
    # Inductor fuses the per-token quantization into the LayerNorm / GELU kernels. Its bf16 rounding
    # of the fused producers differs from eager's, which moves some codes by one step, so compiled
    # and eager FP8 differ at the FP8 noise level; what must hold is that compiling costs no
    # accuracy against the fp32 model.
    reference = dit_forward_cuda(tiny_model().cuda())
    model = quantize_fp8(tiny_model().cuda().to(torch.bfloat16), FP8Config())
    eager = dit_forward_cuda(model)
    compiled = dit_forward_cuda(compile_blocks(model))
    eager_db, compiled_db = sqnr_db(reference, eager), sqnr_db(reference, compiled)
    assert torch.isfinite(compiled).all() and compiled_db >= eager_db - 1.0, (eager_db, compiled_db)


def dit_forward_cuda(model):
    return dit_forward(_OnDevice(model)).cpu()


class _OnDevice:
    """Feeds `tests.test_quant_linear.dit_forward`'s CPU inputs to a CUDA bf16 model."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, t, context, **kwargs):
        return self.model(x.cuda(), t.cuda(), context.cuda().to(torch.bfloat16), **kwargs).float()
