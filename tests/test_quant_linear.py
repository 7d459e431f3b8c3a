"""NVFP4 linear layers and the module swap (quant/linear.py): selection, the four modes against
slow step-by-step references built from quant.nvfp4, SQNR per rule, save/load round trips."""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from core.checkpoint import block_linear_names
from core.config import ModelConfig, QuantMode
from core.dit import CausalWanDiT, module_bytes
from core.errors import UserError
from quant import linear as ql
from quant import packed
from quant.linear import DEFAULT_EXCLUDE, NVFP4Config, quantize_model, select_linears
from quant.nvfp4 import RULES, dequantize, quantize, random_hadamard_transform
from quant.nvfp4_linear import NVFP4Linear
from quant.nvfp4_train import NVFP4TrainingConfig, NVFP4TrainLinear
from quant.packed import save_quantized
from tests.conftest import text_context, tiny_model

TINY = ModelConfig.preset("tiny")


def swap_config(mode: str = "w4a16", **rules):
    """The swap config of a mode name ("train": the training layers)."""
    return NVFP4TrainingConfig(**rules) if mode == "train" else NVFP4Config(mode=mode, **rules)


def load_quantized(path, config: ModelConfig, mode=QuantMode.w4a16, dtype=torch.bfloat16) -> CausalWanDiT:
    with torch.device("meta"):
        model = CausalWanDiT(config)
    return packed.load_packed(path, model, mode).to(dtype=dtype).eval()


def gaussian(shape, seed, dtype=torch.float32, scale=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return (x * (scale if scale is not None else shape[-1] ** -0.5)).to(dtype)


def linear_with(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref = ref.double()
    return 10 * math.log10(ref.pow(2).sum().item() / (ref - approx.double()).pow(2).sum().item())


def dit_forward(model: CausalWanDiT) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 48, 4, 8, 8, generator=g)
    t = torch.tensor([[900.0, 900.0, 400.0, 400.0]])
    with torch.no_grad():
        return model(x, t, text_context(1, seed=5), frames_per_block=2).float()


# ----------------------------------------------------------------------------------------------
# Config and selection.


def test_selection_is_the_300_block_linears_of_the_5b():
    with torch.device("meta"):
        model = CausalWanDiT(ModelConfig.preset("wan2.2-ti2v-5b"))
    assert select_linears(model) == block_linear_names(30)


@pytest.mark.parametrize("exclude,expected", [
    ((), None),  # every nn.Linear
    (DEFAULT_EXCLUDE, block_linear_names(2)),
    (DEFAULT_EXCLUDE + ("re:ffn",), [n for n in block_linear_names(2) if "ffn" not in n]),  # search
    (DEFAULT_EXCLUDE + ("re:^ffn",), block_linear_names(2)),  # anchored: matches nothing
    (DEFAULT_EXCLUDE + ("blocks.1.self_attn.q", "self_attn.k"), [  # exact names only
        n for n in block_linear_names(2) if n != "blocks.1.self_attn.q"]),
])
def test_select_linears_patterns(exclude, expected):
    model = tiny_model()
    every = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert select_linears(model, exclude) == (every if expected is None else expected)


@pytest.mark.parametrize("config,kwargs,needle", [
    (NVFP4Config, dict(mode="w8a8"), "bad value for 'mode': 'w8a8' (allowed: w4a16, w4a4, native)"),
    (NVFP4Config, dict(weight_rule="nvfp4"), "weight_rule must be one of static_6"),
    (NVFP4Config, dict(activation_rule="max"), "activation_rule must be one of"),
    (NVFP4Config, dict(weight_2d="yes"), "bad value for 'weight_2d': expected true or false"),
    (NVFP4TrainingConfig, dict(gradient_rule=""), "gradient_rule must be one of"),
    (NVFP4TrainingConfig, dict(seed=1.5), "bad value for 'seed': expected an integer"),
])
def test_swap_config_validation(config, kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        config(**kwargs)


@pytest.mark.parametrize("exclude,needle", [("head.head", "exclude must be a list"), (("re:(",), "not a valid regex")])
def test_exclude_validation(exclude, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        select_linears(tiny_model(), exclude)


def test_weight_tiles_default_per_config():
    assert NVFP4TrainingConfig().weight_2d is True and NVFP4Config().weight_2d is False
    official = ql.ar_training_config()
    assert (official.weight_rule, official.activation_rule, official.gradient_rule, official.weight_2d) == \
        ("static_6", "mse", "mse", True)


# ----------------------------------------------------------------------------------------------
# The swap.


@pytest.mark.parametrize("mode", ["w4a16", "w4a4", "train"])
def test_swap_replaces_exactly_the_block_linears(mode):
    model = tiny_model()
    before = {name: p for name, p in model.named_parameters()}
    quantize_model(model, swap_config(mode))
    kind = NVFP4TrainLinear if mode == "train" else NVFP4Linear
    swapped = [n for n, m in model.named_modules() if isinstance(m, kind)]
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert swapped == block_linear_names(2)
    assert plain == ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                     "time_projection.1", "head.head"]
    names = list(model.state_dict())
    if mode == "train":  # same parameters, same names: FSDP and checkpoints see a normal model
        assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()
        assert all(p is before[n] for n, p in model.named_parameters())
    else:
        assert "blocks.0.ffn.0.weight_codes" in names and "blocks.0.ffn.0.weight" not in names
        layer = model.blocks[0].ffn[0]
        assert layer.weight_codes.shape == (256, 64) and layer.weight_codes.dtype == torch.uint8
        assert layer.weight_scales.shape == (256, 8) and layer.weight_scales.dtype == torch.float8_e4m3fn
        assert layer.weight_amax.shape == () and layer.weight_amax.dtype == torch.float32
        assert layer.scratch is model.blocks[1].self_attn.q.scratch  # one scratch per model
    # a second swap finds nothing left to do
    assert select_linears(model) == []


def test_filter_narrows_the_selection():
    model = tiny_model()
    quantize_model(model, NVFP4Config(), filter=lambda name, m: m.out_features == 256)
    assert [n for n, m in model.named_modules() if isinstance(m, NVFP4Linear)] == \
        ["blocks.0.ffn.0", "blocks.1.ffn.0"]


def test_inner_dim_not_multiple_of_16_is_a_user_error():
    model = nn.Sequential(nn.Linear(24, 32))
    with pytest.raises(UserError, match=r"0 has in_features=24, not a multiple of 16") as info:
        quantize_model(model, NVFP4Config(), exclude=())
    assert "\n" not in str(info.value)


def test_native_mode_needs_blackwell(monkeypatch):
    message = ("--quant-mode native needs an NVIDIA Blackwell GPU (compute capability 10.x or 12.x, "
               "found {}); use --quant-mode w4a16 or w4a4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as info:
        ql.check_native_supported()
    assert str(info.value) == message.format("no GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    with pytest.raises(UserError) as info:
        ql.check_native_supported("cuda")
    assert str(info.value) == message.format("NVIDIA H200 sm_90")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (10, 0))
    ql.check_native_supported("cuda")  # a B200 passes
    with pytest.raises(UserError) as info:
        ql.check_native_supported("cpu")
    assert str(info.value) == message.format("--device cpu")


def test_swapping_in_parts_keeps_one_scratch():
    model = tiny_model()
    for index in range(2):
        quantize_model(model, NVFP4Config(), filter=lambda name, _, i=index: name.startswith(f"blocks.{i}."))
    scratches = {id(m.scratch) for m in ql.nvfp4_layers(model).values()}
    assert len(scratches) == 1 and model.blocks[0].ffn[0].scratch.numel == 256 * 128


# ----------------------------------------------------------------------------------------------
# Accuracy of the rules at the 5B shapes.

# Measured (Gaussian N(0, 1/K) weights in bf16, 64 rows, both shapes): static_6 20.44, static_4
# 20.16, mse 21.21, mae 21.08, abs_max 20.99 dB; the floors sit 0.2-0.25 dB below.
SQNR_FLOOR_DB = {"static_6": 20.2, "static_4": 19.9, "mse": 21.0, "mae": 20.85, "abs_max": 20.75}


@functools.cache
def rows_of_5b_weight(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 64 rows of a Gaussian bf16 weight of `shape`, and the whole tensor's amax."""
    weight = gaussian(shape, seed=shape[0], dtype=torch.bfloat16)
    return weight[:64].clone(), weight.abs().amax().float()


@pytest.mark.parametrize("shape", [(3072, 3072), (14336, 3072)])
@pytest.mark.parametrize("rule", RULES)
def test_weight_sqnr_per_rule_at_5b_shapes(rule, shape):
    # Rows are quantized independently once the tensor amax is fixed, so 64 rows quantized with
    # the full tensor's amax are exactly those rows of the full quantization (and 50x cheaper).
    rows, amax = rows_of_5b_weight(shape)
    packed = quantize(rows, rule, amax=amax)
    measured = sqnr_db(rows, dequantize(packed))
    assert measured >= SQNR_FLOOR_DB[rule], measured


def test_four_over_six_beats_static_6():
    weight = gaussian((64, 3072), seed=3, dtype=torch.bfloat16)
    static = sqnr_db(weight, dequantize(quantize(weight, "static_6")))
    assert sqnr_db(weight, dequantize(quantize(weight, "mse"))) > static + 0.5


# ----------------------------------------------------------------------------------------------
# Inference modes against their definitions.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_w4a16_is_dequantized_weight_then_linear(dtype, bias):
    weight, b = gaussian((96, 64), 1, dtype), (gaussian((96,), 2, dtype, 0.1) if bias else None)
    layer = NVFP4Linear.from_linear(linear_with(weight, b), rule="mse")
    x = gaussian((2, 5, 64), 3, dtype, 1.0)
    expected = F.linear(x, dequantize(quantize(weight, "mse"), dtype), b)
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rules", [("mse", "mse"), ("static_6", "abs_max")])
def test_w4a4_equals_fp32_product_of_dequantized_operands(dtype, rules):
    weight_rule, activation_rule = rules
    weight, b = gaussian((48, 128), 4, dtype), gaussian((48,), 5, dtype, 0.1)
    layer = NVFP4Linear.from_linear(linear_with(weight, b), rule=weight_rule, mode="w4a4",
                                    activation_rule=activation_rule)
    x = gaussian((3, 7, 128), 6, dtype, 2.0)
    x_q = dequantize(quantize(x.reshape(-1, 128), activation_rule))
    w_q = dequantize(quantize(weight, weight_rule))
    expected = ((x_q @ w_q.T).to(dtype) + b).reshape(3, 7, 48)
    out = layer(x)
    assert out.dtype == dtype and torch.equal(out, expected)


@pytest.mark.parametrize("mode,floor_db", [("w4a16", 26.5), ("w4a4", 24.0)])
def test_tiny_dit_forward_sqnr(mode, floor_db):
    # Measured (rules mse): w4a16 27.67 dB, w4a4 24.98 dB of the 2-layer DiT output against fp32.
    model = tiny_model()
    reference = dit_forward(model)
    quantize_model(model, swap_config(mode))
    measured = sqnr_db(reference, dit_forward(model))
    assert measured >= floor_db, measured


def test_compiled_layer_equals_eager():
    # aot_eager traces the dequantize custom op through its fake implementation (no C++ compiler
    # needed); fullgraph proves it does not break the graph.
    layer = NVFP4Linear.from_linear(linear_with(gaussian((32, 64), 7), gaussian((32,), 8)), rule="mse")
    x = gaussian((4, 64), 9, scale=1.0)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), layer(x))


def test_dtype_casts_keep_the_packed_weight():
    model = tiny_model()
    quantize_model(model, NVFP4Config())
    layer = model.blocks[0].self_attn.q
    codes, scales, amax = layer.weight_codes.clone(), layer.weight_scales.clone(), layer.weight_amax.clone()
    model.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16 and model.head.head.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight_codes, codes)
    assert layer.weight_scales.dtype == torch.float8_e4m3fn and torch.equal(layer.weight_scales.view(torch.uint8),
                                                                            scales.view(torch.uint8))
    assert layer.weight_amax.dtype == torch.float32 and torch.equal(layer.weight_amax, amax)


def test_module_bytes():
    model = tiny_model(dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    assert module_bytes(model) == 2 * params
    quantize_model(model, NVFP4Config())
    packed = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NVFP4Linear))
    # each quantized weight: 2 bytes/element -> 1/2 (codes) + 1/16 (scales) bytes/element + 4 (amax)
    assert module_bytes(model) == 2 * (params - packed) + packed * 9 // 16 + 4 * 20


# ----------------------------------------------------------------------------------------------
# Train mode: all three GEMMs against a slow step-by-step reference with the same noise.


def reference_train_step(x, weight, bias, dy, rules: NVFP4TrainingConfig, seed: int):
    """§3.3 written out with quant.nvfp4 only, on x's device: returns (y, dx, dw, db)."""
    dev = x.device
    g = torch.Generator(device=dev).manual_seed(seed)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    x_q = quantize(x2, rules.activation_rule)
    w_q = quantize(weight, rules.weight_rule, block_2d=rules.weight_2d)
    y = (dequantize(x_q) @ dequantize(w_q).T).to(x.dtype)
    if bias is not None:
        y = y + bias
    y = y.reshape(*x.shape[:-1], n)
    dy2 = dy.reshape(-1, n)
    # dgrad: stochastic Q(dY) (noise drawn first), Q(W^T) with its blocks along N
    dy_q = quantize(dy2, rules.gradient_rule, "stochastic", noise=torch.rand(dy2.shape, generator=g, device=dev) - 0.5)
    wt_q = quantize(weight.T.contiguous(), rules.weight_rule, block_2d=rules.weight_2d)
    dx = (dequantize(dy_q) @ dequantize(wt_q).T).to(x.dtype).reshape(x.shape)
    # wgrad: transposes padded with zero tokens to a multiple of 16, RHT along the tokens,
    # the FP4 copy of the forward input (never the input itself)
    mp = -(-m // 16) * 16
    dy_t = torch.zeros(n, mp, device=dev)
    dy_t[:, :m] = dy2.T.float()
    x_t = torch.zeros(k, mp, device=dev)
    x_t[:, :m] = dequantize(x_q, x.dtype).T.float()
    dy_t_q = quantize(random_hadamard_transform(dy_t), rules.gradient_rule, "stochastic",
                      noise=torch.rand((n, mp), generator=g, device=dev) - 0.5)
    x_t_q = quantize(random_hadamard_transform(x_t), rules.activation_rule)
    dw = (dequantize(dy_t_q) @ dequantize(x_t_q).T).to(weight.dtype)
    db = None if bias is None else dy2.sum(0).to(bias.dtype)
    return y, dx, dw, db


@pytest.mark.parametrize("rule", RULES)
def test_2d_tiles_make_w_and_w_transposed_share_scales(rule):
    # dgrad quantizes Wᵀ on its own; with 16x16 tiles that must give exactly Q(W)ᵀ (§3.3).
    weight = gaussian((48, 80), 14)
    assert torch.equal(dequantize(quantize(weight.T.contiguous(), rule, block_2d=True)),
                       dequantize(quantize(weight, rule, block_2d=True)).T)


def test_set_mode_switches_every_layer():
    model = quantize_model(tiny_model(), NVFP4Config())
    ql.set_mode(model, QuantMode.w4a4)
    assert {m.mode for m in ql.nvfp4_layers(model).values()} == {QuantMode.w4a4}
    with pytest.raises(ValueError, match="'train' is not a valid QuantMode"):
        ql.set_mode(model, "train")


TRAIN_RULES = NVFP4TrainingConfig(weight_rule="static_6", activation_rule="mse", gradient_rule="mse", weight_2d=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [(2, 24), (1, 32)])  # 48 tokens (padded to 48), 32 tokens
@pytest.mark.parametrize("rules,bias", [
    (TRAIN_RULES, True),  # the AR training config (§3.4)
    (NVFP4TrainingConfig("mse", "mse", "mse", True), False),  # the DMD generator config
    (NVFP4TrainingConfig("mse", "static_6", "abs_max", False), True),  # 1-D weight blocks
])
def test_train_gemms_equal_the_reference(dtype, tokens, rules, bias):
    weight = gaussian((48, 64), 10, dtype).requires_grad_()
    b = gaussian((48,), 11, dtype, 0.1).requires_grad_() if bias else None
    layer = NVFP4TrainLinear(linear_with(weight.detach(), None if b is None else b.detach()), rules, seed=123)
    x = gaussian((*tokens, 64), 12, dtype, 1.0).requires_grad_()
    dy = gaussian((*tokens, 48), 13, dtype, 1.0)
    y = layer(x)
    y.backward(dy)
    ref_y, ref_dx, ref_dw, ref_db = reference_train_step(x.detach(), weight.detach(), None if b is None else b.detach(),
                                                         dy, rules, seed=123)
    assert torch.equal(y, ref_y)
    assert torch.equal(x.grad, ref_dx)
    assert torch.equal(layer.weight.grad, ref_dw)
    if bias:
        assert torch.equal(layer.bias.grad, ref_db)
    # sanity: the NVFP4 gradients point where the exact ones do
    exact_dx, exact_dw = dy.float().reshape(-1, 48) @ weight.detach().float(), \
        dy.float().reshape(-1, 48).T @ x.detach().float().reshape(-1, 64)
    assert F.cosine_similarity(x.grad.float().reshape(1, -1), exact_dx.reshape(1, -1)).item() > 0.95
    assert F.cosine_similarity(layer.weight.grad.float().reshape(1, -1), exact_dw.reshape(1, -1)).item() > 0.9


def test_train_noise_is_seeded_per_layer():
    def grads(seed):
        layer = NVFP4TrainLinear(linear_with(gaussian((32, 32), 1), None), TRAIN_RULES, seed=seed)
        x = gaussian((16, 32), 2, scale=1.0).requires_grad_()
        layer(x).backward(gaussian((16, 32), 3, scale=1.0))
        return x.grad, layer.weight.grad

    assert all(torch.equal(a, b) for a, b in zip(grads(5), grads(5), strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(grads(5), grads(6), strict=True))
    model = tiny_model()
    quantize_model(model, NVFP4TrainingConfig(seed=100))
    assert [m.seed for m in model.modules() if isinstance(m, NVFP4TrainLinear)] == list(range(100, 120))


def test_train_mode_model_trains_and_keeps_state_dict_names():
    model = tiny_model()
    names = list(model.state_dict())
    quantize_model(model, NVFP4TrainingConfig())
    assert list(model.state_dict()) == names
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 48, 2, 4, 4, generator=g)
    out = model(x, torch.tensor([[500.0, 500.0]]), text_context(1, seed=1), frames_per_block=2)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Save / load.


@functools.cache
def _quantized_tiny(mode: str, rule: str) -> CausalWanDiT:
    model = tiny_model(dtype=torch.bfloat16)
    return quantize_model(model, NVFP4Config(mode=mode, weight_rule=rule, activation_rule=rule))


def quantized_tiny(mode="w4a16", rule="mse") -> CausalWanDiT:
    return copy.deepcopy(_quantized_tiny(mode, rule))


@pytest.mark.parametrize("mode,rule", [("w4a16", "mse"), ("w4a4", "static_6")])
def test_save_load_round_trip(tmp_path, mode, rule):
    model = quantized_tiny(mode, rule)
    path = save_quantized(model, tmp_path / "q.safetensors", {"preset": "tiny", "note": {"a": 1}})
    loaded = load_quantized(path, TINY, mode=mode, dtype=torch.bfloat16)
    expected, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name].view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else got[name],
                           tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor), name
    assert all(m.rule == rule and m.mode == mode for m in ql.nvfp4_layers(loaded).values())
    assert torch.equal(dit_forward(loaded), dit_forward(model))
    metadata = safetensors.safe_open(str(path), "pt").metadata()
    assert metadata["format"] == "longlive-nvfp4" and metadata["format_version"] == "1"
    assert metadata["rule"] == rule and metadata["mode"] == mode and metadata["layers"] == "20"
    assert metadata["preset"] == "tiny" and metadata["note"] == '{"a": 1}'
    assert ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in json.loads(metadata["model_config"]).items()}) == TINY


def test_load_in_another_mode_and_dtype(tmp_path):
    path = save_quantized(quantized_tiny(), tmp_path / "q.safetensors")
    loaded = load_quantized(path, TINY, mode="w4a4", dtype=torch.float32)
    assert all(m.mode == "w4a4" for m in ql.nvfp4_layers(loaded).values())
    assert loaded.head.head.weight.dtype == torch.float32
    assert loaded.blocks[0].ffn[0].weight_scales.dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="bad value for 'mode': 'train'"):
        load_quantized(path, TINY, mode="train")


def write_bad(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.safetensors"
    good = save_quantized(quantized_tiny(), tmp_path / "good.safetensors")
    data = good.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(b"\x00\x01not a safetensors file" * 10)
    elif kind == "plain":  # a bf16 generator, not converted
        safetensors.torch.save_file({k: v.contiguous() for k, v in tiny_model().state_dict().items()}, path)
    elif kind == "version":
        tensors = safetensors.torch.load_file(good)
        meta = dict(safetensors.safe_open(str(good), "pt").metadata(), format_version="9")
        safetensors.torch.save_file(tensors, path, meta)
    return path


@pytest.mark.parametrize("kind,needle", [
    ("truncated", "the file is truncated or corrupt; convert it again"),
    ("garbage", "the file is truncated or corrupt; convert it again"),
    ("plain", "is not a packed NVFP4 checkpoint (no 'longlive-nvfp4' format metadata): convert it with"),
    ("version", "has NVFP4 format version '9'; this longlive reads version 1"),
])
def test_bad_files_are_one_line_user_errors(tmp_path, kind, needle):
    path = write_bad(tmp_path, kind)
    with pytest.raises(UserError) as info:
        load_quantized(path, TINY)
    assert needle in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind,expected", [("good", True), ("plain", False), ("garbage", False),
                                           ("truncated", False), ("pt", False)])
def test_is_nvfp4_file(tmp_path, kind, expected):
    if kind == "good":
        path = save_quantized(quantized_tiny(), tmp_path / "q.safetensors")
    elif kind == "pt":
        path = tmp_path / "gen.pt"
        torch.save({"generator": {}}, path)
    else:
        path = write_bad(tmp_path, kind)
    assert packed.is_nvfp4_file(path) is expected


def test_wrong_preset_and_missing_file(tmp_path):
    path = save_quantized(quantized_tiny(), tmp_path / "q.safetensors")
    wide = ModelConfig(**{**TINY.__dict__, "ffn_dim": 512})
    with pytest.raises(UserError, match="does not match the model: .*with the wrong shape"):
        load_quantized(path, wide)
    with pytest.raises(UserError, match="not found"):
        load_quantized(tmp_path / "missing.safetensors", TINY)
    (tmp_path / "model_4o6.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="is not a packed NVFP4 .safetensors file"):
        load_quantized(tmp_path / "model_4o6.pt", TINY)
