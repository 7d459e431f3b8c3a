"""FP8 block linears (quant/fp8.py): codes against a slow table-lookup quantizer, the GEMM within
fp32 accumulation error of an fp64 oracle, the swap (300 layers of the 5B on meta), dtype casts,
state dicts, zero rows, config errors, SQNR floors per layer at 5B shapes and for a whole
streaming run of the tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.checkpoint import block_linear_names
from core.config import ModelConfig, StreamConfig
from core.dit import CausalWanDiT
from core.errors import UserError
from core.pipeline import generate_latents
from quant import fp8
from quant.fp8 import (
    AMAX_FLOOR,
    E4M3_MAX,
    FP8Config,
    FP8Linear,
    check_fp8_supported,
    dequantize_rows,
    fp8_gemm_reference,
    fp8_layers,
    quantize_fp8,
    quantize_rows_reference,
)
from quant.kv import WindowBuffer, nvfp4_storage
from quant.linear import DEFAULT_EXCLUDE, select_linears
from tests.conftest import SMALL_STREAM, tiny_model
from tests.test_pipeline import inputs
from tests.test_quant_linear import dit_forward, gaussian, linear_with, sqnr_db

# ----------------------------------------------------------------------------------------------
# A slow, obvious E4M3 quantizer: the 127 non-negative finite values from the format's definition,
# nearest by exhaustive search in fp64, ties to the even code.


def e4m3_values() -> torch.Tensor:
    codes = torch.arange(127, dtype=torch.float64)
    exponent, mantissa = torch.div(codes, 8, rounding_mode="floor"), codes % 8
    return torch.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))


def slow_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as uint8 bytes, fp32 scales) of the module docstring's rule, one element at a time."""
    rows = x.float().reshape(-1, x.shape[-1]).double()
    table = e4m3_values()
    codes = torch.empty(rows.shape, dtype=torch.uint8)
    scales = torch.empty(rows.shape[0], dtype=torch.float32)
    for r, row in enumerate(rows):
        scale = torch.tensor(max(row.abs().max().item(), AMAX_FLOOR) / E4M3_MAX).float()  # one fp32 rounding
        scales[r] = scale
        quotient = (row / scale.double()).float().double().clamp(-E4M3_MAX, E4M3_MAX)  # x / s rounded to fp32
        for i, value in enumerate(quotient.tolist()):
            distance = (table - abs(value)).abs()
            nearest = (distance == distance.min()).nonzero().flatten().tolist()
            code = nearest[0] if len(nearest) == 1 else next(c for c in nearest if c % 2 == 0)
            codes[r, i] = code | (128 if math.copysign(1.0, value) < 0 else 0)
    return codes.reshape(x.shape), scales.reshape(x.shape[:-1])


def spread_rows(shape, seed, dtype):
    """Rows spanning 20 orders of magnitude, outliers, zeros, negative zeros and E4M3 ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(4 * torch.randn(shape[0], 1, generator=g))
    x[0] = 0.0
    x[1, ::3] = -0.0
    x[2, 5] *= 300.0
    x[3] *= 1e-4 if dtype != torch.float32 else 1e-35  # subnormal quotients (fp32: a tiny amax)
    # amax 448 gives scale 1: midpoints of the E4M3 grid, normal and subnormal, both signs
    ties = [448.0, 1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, 15 / 1024, 432.0, -432.0, 248.0, -1.0625, 0.5 + 2**-5]
    x[4, :len(ties)] = torch.tensor(ties)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codes_and_scales_equal_the_slow_quantizer(dtype):
    x = spread_rows((6, 48), seed=3, dtype=dtype)
    codes, scales = quantize_rows_reference(x)
    slow_codes, slow_scales = slow_quantize_rows(x)
    assert codes.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    assert torch.equal(codes.view(torch.uint8), slow_codes)
    assert torch.equal(scales, slow_scales)
    # the tie row decodes to the even neighbours
    assert dequantize_rows(codes[4:5, :11], scales[4:5]).flatten().tolist() == [
        448.0, 1.0, 1.25, 0.0, 2.0**-8, 2.0**-6, 448.0, -448.0, 256.0, -1.0, 0.5]


def test_zero_rows_and_tokens_stay_finite():
    codes, scales = quantize_rows_reference(torch.zeros(3, 32))
    assert codes.view(torch.uint8).eq(0).all() and torch.equal(scales, torch.full((3,), AMAX_FLOOR / E4M3_MAX))
    weight = gaussian((32, 64), 1)
    weight[5] = 0.0  # a dead output channel
    layer = FP8Linear.from_linear(linear_with(weight, gaussian((32,), 2)))
    x = gaussian((4, 64), 3, scale=1.0)
    x[1] = 0.0  # an all-zero token
    y = layer(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[1], layer.bias) and torch.equal(y[:, 5], layer.bias[5].expand(4))


# ----------------------------------------------------------------------------------------------
# The GEMM.


def accumulation_bound(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Worst-case fp32 error of any summation order of K exact products, then two scalings, a bias
    add and the output rounding: gamma_K |a||b|^T + 4 u |y| (Higham, u = 2**-24)."""
    k = a.shape[1]
    u = 2.0**-24
    return k * u / (1 - k * u) * (a.abs() @ b.abs().T) + 4 * u * y.abs()


@pytest.mark.parametrize("shape", [(8, 64, 48), (33, 3072, 96), (5, 14336, 32)])
def test_gemm_reference_within_fp32_accumulation_of_the_exact_product(shape):
    m, k, n = shape
    a_codes, a_scales = quantize_rows_reference(gaussian((m, k), 1, scale=1.0))
    b_codes, b_scales = quantize_rows_reference(gaussian((n, k), 2))
    bias = gaussian((n,), 3, scale=0.1)
    y = fp8_gemm_reference(a_codes, a_scales, b_codes, b_scales, bias, torch.float32)
    a, b = dequantize_rows(a_codes, a_scales, torch.float64), dequantize_rows(b_codes, b_scales, torch.float64)
    exact = a @ b.T + bias.double()
    assert ((y.double() - exact).abs() <= accumulation_bound(a, b, exact)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_is_quantized_weight_and_tokens_then_the_reference_gemm(dtype, bias):
    weight = gaussian((48, 64), 4, dtype)
    layer = FP8Linear.from_linear(linear_with(weight, gaussian((48,), 5, dtype, 0.1) if bias else None))
    w_codes, w_scales = quantize_rows_reference(weight)
    assert torch.equal(layer.weight.view(torch.uint8), w_codes.view(torch.uint8))
    assert torch.equal(layer.weight_scale, w_scales)
    x = gaussian((2, 3, 64), 6, dtype, scale=1.0)
    x_codes, x_scales = quantize_rows_reference(x.reshape(6, 64))
    expected = fp8_gemm_reference(x_codes, x_scales, w_codes, w_scales, layer.bias, dtype).reshape(2, 3, 48)
    out = layer(x)
    assert out.dtype == dtype and torch.equal(out, expected)


def test_compiled_layer_equals_eager_in_one_graph():
    # aot_eager needs no C++ compiler; fullgraph proves the quantization and GEMM do not break it.
    layer = FP8Linear.from_linear(linear_with(gaussian((32, 64), 7), gaussian((32,), 8)))
    x = gaussian((4, 64), 9, scale=1.0)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), layer(x))


# ----------------------------------------------------------------------------------------------
# The swap.


def test_swap_selects_exactly_the_300_block_linears_of_the_5b_on_meta():
    with torch.device("meta"):
        model = CausalWanDiT(ModelConfig.preset("wan2.2-ti2v-5b"))
    quantize_fp8(model)
    layers = fp8_layers(model)
    assert list(layers) == block_linear_names(30)
    shapes = {name.split(".", 2)[2]: tuple(layer.weight.shape) for name, layer in layers.items()}
    assert shapes["self_attn.q"] == shapes["cross_attn.o"] == (3072, 3072)
    assert shapes["ffn.0"] == (14336, 3072) and shapes["ffn.2"] == (3072, 14336)
    assert all(layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
               for layer in layers.values())
    assert FP8Config().exclude == DEFAULT_EXCLUDE


def test_swap_on_the_tiny_model_and_state_dict():
    model = tiny_model()
    quantize_fp8(model)
    assert list(fp8_layers(model)) == block_linear_names(2)
    assert [n for n, m in model.named_modules() if type(m) is nn.Linear] == [
        "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
        "head.head"]
    state = model.state_dict()
    assert state["blocks.0.ffn.0.weight"].dtype == torch.float8_e4m3fn
    assert state["blocks.0.ffn.0.weight_scale"].shape == (256,) and state["blocks.0.ffn.0.bias"].shape == (256,)
    assert select_linears(model) == []  # a second swap finds nothing left


def test_filter_narrows_the_selection():
    model = quantize_fp8(tiny_model(), filter=lambda name, m: m.out_features == 256)
    assert list(fp8_layers(model)) == ["blocks.0.ffn.0", "blocks.1.ffn.0"]


def test_state_dict_loads_into_a_meta_built_swap():
    model = quantize_fp8(tiny_model())
    with torch.device("meta"):
        empty = CausalWanDiT(ModelConfig.preset("tiny"))
    quantize_fp8(empty)
    empty.load_state_dict(model.state_dict(), strict=True, assign=True)
    assert torch.equal(dit_forward(empty.eval()), dit_forward(model))


def test_dtype_casts_keep_the_fp8_weight_and_scales():
    model = quantize_fp8(tiny_model())
    layer = model.blocks[0].self_attn.q
    codes, scales = layer.weight.view(torch.uint8).clone(), layer.weight_scale.clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        cast(model)
        assert layer.weight.dtype == torch.float8_e4m3fn and torch.equal(layer.weight.view(torch.uint8), codes)
        assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scales)
    model.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16 and model.head.head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs,needle", [
    (dict(exclude="head.head"), "exclude must be a list"),
    (dict(exclude=("re:(",)), "not a valid regex"),
    (dict(exclude=("",)), "exclude entries must be"),
    (dict(fast_accum="yes"), "fast_accum must be true or false"),
    (dict(emulate=1), "emulate must be true or false"),
])
def test_config_validation(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        FP8Config(**kwargs)


@pytest.mark.parametrize("features", [(24, 32), (32, 24)])
def test_sizes_not_multiple_of_16_are_one_line_user_errors(features):
    model = nn.Sequential(nn.Linear(*features))
    with pytest.raises(UserError, match="not a multiple of 16") as info:
        quantize_fp8(model, FP8Config(exclude=()))
    assert "\n" not in str(info.value) and isinstance(model[0], nn.Linear)  # nothing swapped


def test_fp8_device_check(monkeypatch):
    check_fp8_supported("cpu")  # the emulation runs anywhere
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA A100")
    monkeypatch.setattr(fp8, "_capability", lambda index: (8, 0))
    monkeypatch.setattr(fp8, "_has_fp8_tensor_cores", lambda index: False)
    with pytest.raises(UserError, match=r"found NVIDIA A100 sm_80\): use --precision bf16 or nvfp4") as info:
        check_fp8_supported("cuda:0")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# Numerics: SQNR floors, measured values in the comments (docs/fp8.md).


def activations(tokens, width, seed, outlier_gain):
    """LayerNorm-like activations; 1 channel in 384 scaled by `outlier_gain` (trained DiTs' outliers)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g)
    if outlier_gain:
        x[:, torch.randperm(width, generator=g)[: width // 384]] *= outlier_gain
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(3072, 3072), (14336, 3072), (3072, 14336)])  # (N, K): q/k/v/o, ffn.0, ffn.2
def test_layer_sqnr_at_5b_shapes(shape):
    # Measured against the exact product of the bf16 operands (128 tokens): 28.50-28.54 dB without
    # outliers, 28.9-29.5 dB with them; the bf16 F.linear scores 55.6 dB on the same reference.
    n, k = shape
    weight, bias = gaussian(shape, n + k, torch.bfloat16), gaussian((n,), 1, torch.bfloat16, 0.02)
    layer = FP8Linear.from_linear(linear_with(weight, bias))
    for outlier_gain in (0, 100):
        x = activations(16, k, 2, outlier_gain)
        exact = x.float() @ weight.float().T + bias.float()  # fp32 rounding: ~130 dB, negligible here
        assert sqnr_db(exact, layer(x)) >= 27.5, outlier_gain
        assert sqnr_db(exact, F.linear(x, weight, bias)) >= 50.0


def test_streaming_run_sqnr_floor_alone_and_with_the_nvfp4_kv_cache():
    # Whole streaming run of the tiny model (4 chunks of 2 frames, 4 steps + recache each), fp32
    # reference vs FP8 (emulated GEMMs): 39.53 / 41.12 / 41.28 dB for seeds 0 / 1 / 2 (NVFP4 w4a4
    # scores 28.78 / 30.69 / 30.32 dB on the same runs); FP8 weights + NVFP4 KV cache (mse):
    # 39.31 / 40.75 / 40.94 dB. The two combine: the cache is a separate transform.
    noise, contexts = inputs(frames=8, seed=0)
    stream = StreamConfig(**SMALL_STREAM)
    reference = generate_latents(tiny_model(0), noise, contexts, stream)
    quantized = generate_latents(quantize_fp8(tiny_model(0)), noise, contexts, stream)
    assert sqnr_db(reference, quantized) >= 37.0
    window = WindowBuffer()
    with_kv = generate_latents(quantize_fp8(tiny_model(0)), noise, contexts, stream,
                               kv_storage=nvfp4_storage("mse", window))
    assert sqnr_db(reference, with_kv) >= 37.0
