"""NVFP4 on CUDA: the Triton kernels equal the torch reference bit for bit at the 5B shapes, and the
torch reference gives the same bits on CUDA as on the CPU."""

import pytest
import torch

from quant import nvfp4

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from quant.kernels import dequantize_triton, quantize_triton  # noqa: E402

WEIGHT_SHAPES = [(3072, 3072), (14336, 3072)]


def _input(shape, dtype, seed=0):
    """Gaussian rows with per-row spread (1e-3..1e3) and a few large outliers."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=g, device="cuda")
    x *= torch.exp(2.5 * torch.randn(*shape[:-1], 1, generator=g, device="cuda"))
    x.view(-1)[::9973] *= 300.0
    return x.to(dtype)


def _same(a: nvfp4.NVFP4Tensor, b: nvfp4.NVFP4Tensor) -> None:
    assert torch.equal(a.codes, b.codes), f"{(a.codes != b.codes).sum().item()} code bytes differ"
    assert torch.equal(a.scales.view(torch.uint8), b.scales.view(torch.uint8)), "scales differ"
    assert torch.equal(a.amax, b.amax)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("rounding", nvfp4.ROUNDINGS)
@pytest.mark.parametrize("rule", nvfp4.RULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_triton_quantize_equals_reference(shape, dtype, rule, rounding):
    x = _input(shape, dtype)
    noise = None
    if rounding == "stochastic":
        noise = torch.rand(shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) - 0.5
    ref = nvfp4.quantize(x, rule, rounding, noise=noise)
    got = quantize_triton(x, rule, rounding, noise=noise)
    _same(ref, got)
    for out_dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(_bits(dequantize_triton(got, out_dtype)), _bits(nvfp4.dequantize(ref, out_dtype)))


def test_triton_edge_cases_equal_reference():
    # Tiny blocks next to a huge amax give E4M3 subnormal and zero scales; zero blocks; an amax override
    # below the data's max saturates scales at 448; a 3-D input with K = 128 (the KV-cache layout).
    x = _input((512, 256), torch.float32)
    x[:7] *= 1e-6
    x[7:9] = 0.0
    x[9, :16] = -0.0
    cases = [(x, None), (x, x.abs().amax() * 0.25), (_input((40, 24, 128), torch.bfloat16, seed=3), None)]
    for data, amax in cases:
        for rule in nvfp4.RULES:
            _same(nvfp4.quantize(data, rule, amax=amax), quantize_triton(data, rule, amax=amax))
    zero = torch.zeros(64, 32, device="cuda")
    _same(nvfp4.quantize(zero, "mse"), quantize_triton(zero, "mse"))


def test_dequantize_into_out_buffer():
    t = quantize_triton(_input((256, 128), torch.bfloat16), "mse")
    window = torch.full((3, 256, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    dequantize_triton(t, torch.bfloat16, out=window[1])
    assert torch.equal(_bits(window[1]), _bits(nvfp4.dequantize(t, torch.bfloat16)))
    assert torch.isnan(window[0]).all() and torch.isnan(window[2]).all()
    half = dequantize_triton(t, torch.float16)
    assert torch.equal(_bits(half), _bits(nvfp4.dequantize(t, torch.float16)))


@pytest.mark.parametrize("rule", nvfp4.RULES)
def test_reference_cpu_equals_cuda(rule):
    x = _input((1024, 512), torch.float32)
    noise = torch.rand(x.shape, device="cuda") - 0.5
    for rounding in nvfp4.ROUNDINGS:
        for block_2d in (False, True):
            on_gpu = nvfp4.quantize(x, rule, rounding, noise=noise, block_2d=block_2d)
            on_cpu = nvfp4.quantize(x.cpu(), rule, rounding, noise=noise.cpu(), block_2d=block_2d)
            _same(on_gpu.to("cpu"), on_cpu)
            assert torch.equal(_bits(nvfp4.dequantize(on_gpu).cpu()), _bits(nvfp4.dequantize(on_cpu)))
