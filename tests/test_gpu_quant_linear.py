"""GPU checks of the NVFP4 linears (skipped without CUDA): Triton quantize/dequantize inside the
layers == the CPU reference bit for bit, w4a16 through the shared scratch == F.linear on the
reference weight, w4a4 and train mode == their definitions on the GPU, compiled == eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.optimize import compile_blocks
from quant.linear import NVFP4Config, quantize_model
from quant.nvfp4 import dequantize, quantize
from quant.nvfp4_linear import DequantScratch, NVFP4Linear
from quant.nvfp4_train import NVFP4TrainingConfig, NVFP4TrainLinear
from tests.conftest import text_context, tiny_model
from tests.test_quant_linear import gaussian, linear_with, reference_train_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("shape", [(3072, 3072), (14336, 3072), (3072, 14336)])
@pytest.mark.parametrize("rule", ["mse", "static_6"])
def test_w4a16_cuda_equals_cpu_reference(shape, rule):
    weight, bias = gaussian(shape, 1, torch.bfloat16), gaussian(shape[:1], 2, torch.bfloat16, 0.1)
    cpu = NVFP4Linear.from_linear(linear_with(weight, bias), rule=rule)
    gpu = NVFP4Linear.from_linear(linear_with(weight, bias).cuda(), rule=rule, scratch=DequantScratch())
    for name in ("weight_codes", "weight_scales", "weight_amax"):  # Triton quantize == CPU reference
        assert torch.equal(bits(getattr(gpu, name)).cpu(), bits(getattr(cpu, name))), name
    reference_weight = dequantize(cpu.packed_weight(), torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(gpu.dequantized_weight(torch.bfloat16).cpu(), reference_weight)
        x = gaussian((512, shape[1]), 3, torch.bfloat16, 1.0).cuda()
        out = gpu(x)
        assert torch.equal(out, F.linear(x, reference_weight.cuda(), bias.cuda()))
    # and close to the CPU math in fp32
    cpu_out = F.linear(x.cpu().float(), reference_weight.float(), bias.float())
    assert (out.float().cpu() - cpu_out).abs().max() <= 0.02 * cpu_out.abs().max()


def test_scratch_is_shared_and_never_feeds_autograd():
    model = tiny_model(dtype=torch.bfloat16).cuda()
    quantize_model(model, NVFP4Config())
    q, ffn = model.blocks[0].self_attn.q, model.blocks[1].ffn[2]
    with torch.no_grad():
        a, b = q.dequantized_weight(torch.bfloat16), ffn.dequantized_weight(torch.bfloat16)
    assert a.data_ptr() == b.data_ptr()  # the same buffer, sized for the largest weight
    assert q.scratch is ffn.scratch and q.scratch.numel == 256 * 128
    # with autograd the weight is kept for dgrad: a fresh tensor, correct gradients
    x = gaussian((4, 128), 1, torch.bfloat16, 1.0).cuda().requires_grad_()
    loss = q(x).sum()
    with torch.no_grad():
        ffn.dequantized_weight(torch.bfloat16)  # would overwrite a weight kept in the scratch
    loss.backward()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, dequantize(q.packed_weight(), torch.bfloat16), q.bias).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_w4a4_cuda_equals_definition(dtype):
    weight, bias = gaussian((256, 512), 4, dtype), gaussian((256,), 5, dtype, 0.1)
    layer = NVFP4Linear.from_linear(linear_with(weight, bias).cuda(), rule="mse", mode="w4a4")
    x = gaussian((2, 300, 512), 6, dtype, 2.0).cuda()
    x_q = quantize(x.reshape(-1, 512), "mse")  # torch reference on the GPU
    expected = ((dequantize(x_q) @ dequantize(quantize(weight.cuda(), "mse")).T).to(dtype) + bias.cuda())
    with torch.no_grad():
        assert torch.equal(layer(x), expected.reshape(2, 300, 256))


@pytest.mark.parametrize("rules", [NVFP4TrainingConfig("static_6", "mse", "mse", True),
                                   NVFP4TrainingConfig("mse", "mse", "mse", False)])
def test_train_gemms_cuda_equal_the_reference(rules):
    weight, bias = gaussian((256, 512), 10, torch.bfloat16), gaussian((256,), 11, torch.bfloat16, 0.1)
    layer = NVFP4TrainLinear(linear_with(weight, bias).cuda(), rules, seed=7)
    x = gaussian((3, 100, 512), 12, torch.bfloat16, 1.0).cuda().requires_grad_()
    dy = gaussian((3, 100, 256), 13, torch.bfloat16, 1.0).cuda()
    y = layer(x)
    y.backward(dy)
    ref_y, ref_dx, ref_dw, ref_db = reference_train_step(x.detach(), weight.cuda(), bias.cuda(), dy, rules, seed=7)
    assert torch.equal(y, ref_y)
    assert torch.equal(x.grad, ref_dx)
    assert torch.equal(layer.weight.grad, ref_dw)
    assert torch.equal(layer.bias.grad, ref_db)


def test_compiled_equals_eager():
    layer = NVFP4Linear.from_linear(linear_with(gaussian((384, 256), 1, torch.bfloat16),
                                                gaussian((384,), 2, torch.bfloat16)).cuda(),
                                    rule="mse", scratch=DequantScratch())
    with torch.no_grad():
        weight = torch.compile(lambda: layer.dequantized_weight(torch.bfloat16), fullgraph=True)()
        assert torch.equal(weight, dequantize(layer.packed_weight(), torch.bfloat16))
        x = gaussian((64, 256), 3, torch.bfloat16, 1.0).cuda()
        compiled = torch.compile(layer, fullgraph=True)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1.6e-2, atol=1e-2)

    model = tiny_model(dtype=torch.bfloat16).cuda()
    quantize_model(model, NVFP4Config())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 48, 4, 8, 8, generator=g).cuda()
    t = torch.tensor([[900.0, 900.0, 400.0, 400.0]], device="cuda")
    context = text_context(1, seed=3).cuda()
    with torch.no_grad():
        eager = model(x, t, context, frames_per_block=2).float()
        compiled = compile_blocks(model)(x, t, context, frames_per_block=2).float()
    assert (compiled - eager).abs().max() <= 0.03 * eager.abs().max()
