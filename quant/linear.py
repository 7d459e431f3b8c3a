"""NVFP4 linear layers, the module swap, and the packed checkpoint format (reference-systems.md
§3.3, §3.4).

A swapped `nn.Linear` (Y = X Wᵀ + b) runs in one of four modes:

  w4a16   packed weight, dequantized on the fly into the activation dtype, then a cuBLAS GEMM
          (`F.linear`). Works on any GPU and on the CPU; the NVFP4 error is the weight's only.
  w4a4    the NVFP4 tensor-core GEMM, emulated as FourOverSix's PyTorch matmul backend does it:
          the activation is quantized every call (activation rule, 1-D blocks along K, nearest),
          both operands are dequantized to fp32, fp32 matmul, output in the input dtype, + bias.
  native  the same GEMM on Blackwell FP4 tensor cores (`torch._scaled_mm` on float4_e2m1fn_x2
          operands with blocked E4M3 scales, the two tensor scales applied to its output).
  train   bf16 master weights (names unchanged); fprop, dgrad and wgrad all emulated in NVFP4
          as in the §3.3 table (2-D weight tiles, stochastic gradients, RHT in wgrad).

Packed checkpoint (`save_quantized` / `load_quantized`, one .safetensors file): every tensor of
the bare model state dict, except that each quantized linear `L` holds `L.weight_codes` (uint8
[N, K/2]), `L.weight_scales` (F8_E4M3 [N, K/16], row-major), `L.weight_amax` (F32 scalar) and
`L.bias` instead of `L.weight`; string metadata `format`, `format_version`, `rule`,
`activation_rule`, `mode`, `layers`, `model_config` (JSON) plus what the writer adds.

Legend: M tokens (leading dims flattened), K in_features, N out_features, Mp = M padded to 16.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.checkpoint import atomic_write, check_shapes, normalize_keys
from core.config import ModelConfig, require
from core.dit import CausalWanDiT
from core.errors import UserError, first_line
from core.hooks import storage_bytes
from quant.kernels import dequantize_triton, quantize_triton, triton_available
from quant.nvfp4 import (
    BLOCK,
    RULES,
    NVFP4Tensor,
    as_float4_x2,
    dequantize,
    make_noise,
    quantize,
    random_hadamard_transform,
    rule_divisor,
    to_blocked,
)

MODES = ("w4a16", "w4a4", "native", "train")
INFERENCE_MODES = ("w4a16", "w4a4", "native")  # the modes a packed weight runs in
PACKED_BUFFERS = ("weight_codes", "weight_scales", "weight_amax")
FORMAT_NAME = "longlive-nvfp4"
FORMAT_VERSION = 1

# The official filter list (utils/quant.py): everything outside the blocks and the norms stays
# high precision; with it exactly the 300 block linears of the 5B are quantized.
DEFAULT_EXCLUDE = (
    "text_embedding.0", "text_embedding.2", "patch_embedding", "time_projection.1",
    "time_embedding.0", "time_embedding.2", "head.head", "head.modulation",
    "re:.*norm_k$", "re:.*norm_q$", "re:.*norm1$", "re:.*norm2$", "re:.*norm3$",
)


# ----------------------------------------------------------------------------------------------
# Configuration and selection.


@dataclass
class QuantConfig:
    """What to quantize and how. `weight_2d` None means: 16x16 weight tiles in train mode (so W
    and Wᵀ share scales), 1-D blocks otherwise (pitfall 11). Layer i of a train-mode swap draws
    its stochastic-rounding noise from a generator seeded with `seed + i`."""

    mode: str = "w4a16"
    weight_rule: str = "mse"
    activation_rule: str = "mse"
    gradient_rule: str = "mse"
    weight_2d: bool | None = None
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.mode in MODES, f"mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        for name in ("weight_rule", "activation_rule", "gradient_rule"):
            value = getattr(self, name)
            require(value in RULES, f"{name} must be one of {', '.join(RULES)} (got {value!r})")
        if self.weight_2d is None:
            self.weight_2d = self.mode == "train"
        require(isinstance(self.weight_2d, bool), f"weight_2d must be true or false (got {self.weight_2d!r})")
        require(not isinstance(self.exclude, str),
                f"exclude must be a list of module names or 're:' patterns (got the string {self.exclude!r})")
        self.exclude = tuple(self.exclude)
        for pattern in self.exclude:
            require(isinstance(pattern, str) and pattern != "",
                    f"exclude entries must be module names or 're:' patterns (got {pattern!r})")
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise ValueError(f"exclude pattern {pattern!r} is not a valid regex ({err})") from None
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool),
                f"seed must be an integer (got {self.seed!r})")


def ar_training_config(seed: int = 0) -> QuantConfig:
    """The official NVFP4 settings of AR training: emulated train-mode GEMMs, static_6 weights in
    16x16 tiles (W and Wᵀ share scales), mse activation and gradient rules."""
    return QuantConfig(mode="train", weight_rule="static_6", activation_rule="mse", gradient_rule="mse",
                       weight_2d=True, seed=seed)


def select_linears(model: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> list[str]:
    """Names of the plain `nn.Linear` modules not excluded: an entry excludes the module of that
    exact name, or with a `re:` prefix every module whose name the regex matches anywhere
    (`re.search`, as the official filter)."""
    exact = {p for p in exclude if not p.startswith("re:")}
    patterns = [re.compile(p[3:]) for p in exclude if p.startswith("re:")]
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not isinstance(module, NVFP4TrainLinear)
            and name not in exact and not any(p.search(name) for p in patterns)]


# ----------------------------------------------------------------------------------------------
# Quantize / dequantize on the best path of the device (Triton on CUDA, bit-identical to the
# torch reference, which serves the CPU and 2-D tiles).


def quantize_tensor(x: Tensor, rule: str, rounding: str = "nearest", *, block_2d: bool = False,
                    noise: Tensor | None = None) -> NVFP4Tensor:
    if x.is_cuda and not block_2d and triton_available():
        return quantize_triton(x, rule, rounding, noise=noise)
    return quantize(x, rule, rounding, block_2d=block_2d, noise=noise)


def dequantize_tensor(t: NVFP4Tensor, dtype: torch.dtype) -> Tensor:
    if t.codes.is_cuda and triton_available():
        return dequantize_triton(t, dtype)
    return dequantize(t, dtype)


@torch.library.custom_op("longlive::nvfp4_dequantize", mutates_args=())
def nvfp4_dequantize(codes: Tensor, scales: Tensor, amax: Tensor, rule: str, dtype: torch.dtype) -> Tensor:
    """The dequantized weight as one opaque op, so torch.compile keeps a swapped block in one
    graph (Triton kernel on CUDA, torch reference elsewhere)."""
    return dequantize_tensor(NVFP4Tensor(codes, scales, amax, rule), dtype)


@nvfp4_dequantize.register_fake
def _nvfp4_dequantize_fake(codes, scales, amax, rule, dtype):
    return codes.new_empty((*codes.shape[:-1], 2 * codes.shape[-1]), dtype=dtype)


def fp4_gemm(a: NVFP4Tensor, b: NVFP4Tensor, out_dtype: torch.dtype) -> Tensor:
    """A·Bᵀ of two quantized row-major operands, emulated: dequantize both to fp32, fp32 matmul."""
    return (dequantize_tensor(a, torch.float32) @ dequantize_tensor(b, torch.float32).T).to(out_dtype)


def fp4_linear(x_q: NVFP4Tensor, w_q: NVFP4Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """Y = Q(X)·Q(W)ᵀ + b, emulated: the forward of both the w4a4 and the train layer."""
    y_MN = fp4_gemm(x_q, w_q, out_dtype)
    return y_MN if bias is None else y_MN + bias


class DequantScratch:
    """One flat buffer per (device, dtype) shared by the NVFP4Linear layers of a model: in w4a16
    each weight is dequantized into it right before its GEMM, so at most one high-precision
    weight exists at a time (layers run one after another on one stream)."""

    def __init__(self) -> None:
        self.numel = 0  # the largest weight of the layers sharing it
        self._buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def reserve(self, numel: int) -> None:
        self.numel = max(self.numel, numel)

    def view(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get((device, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(max(self.numel, numel), device=device, dtype=dtype)
            self._buffers[(device, dtype)] = buffer
        return buffer[:numel].view(shape)


def check_native_supported(device: torch.device | str | None = None) -> None:
    """UserError unless this machine has a Blackwell GPU (and a torch with FP4 tensors) and the
    run is not placed on the CPU."""
    if device is not None and device != "auto" and torch.device(device).type != "cuda":
        found = f"--device {device}"
    elif not torch.cuda.is_available():
        found = "no GPU"
    else:
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        if major in (10, 12) and hasattr(torch, "float4_e2m1fn_x2"):
            return
        found = f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"
    raise UserError(f"--mode native needs an NVIDIA Blackwell GPU (compute capability 10.x or 12.x, "
                    f"found {found}); use --mode w4a16 or w4a4")


def check_mode_supported(mode: str, device: torch.device | str | None = None) -> None:
    """One-line UserError when `mode` is unknown or cannot run on `device` ("auto", "cpu", "cuda",
    ...): native needs Blackwell; w4a16, w4a4 and train run anywhere."""
    if mode not in MODES:
        raise UserError(f"--mode {mode}: choose one of {', '.join(MODES)}")
    if mode == "native":
        check_native_supported(device)


# ----------------------------------------------------------------------------------------------
# Inference layer.


class NVFP4Linear(nn.Module):
    """A linear layer with a packed NVFP4 weight (buffers `weight_codes`, `weight_scales`,
    `weight_amax`) and a high-precision `bias`. `rule` is a plain attribute: the file metadata
    carries it, the tensors do not (pitfall 10)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rule: str = "mse",
                 mode: str = "w4a16", activation_rule: str = "mse", device=None, dtype=None):
        super().__init__()
        assert in_features % BLOCK == 0, f"in_features {in_features} is not a multiple of {BLOCK}"
        self.in_features = in_features
        self.out_features = out_features
        self.rule = rule
        self.activation_rule = activation_rule
        self.mode = mode
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                         device=device))
        self.register_buffer("weight_scales", torch.zeros(out_features, in_features // BLOCK,
                                                          dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_amax", torch.zeros((), dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.scratch: DequantScratch | None = None
        self._blocked_scales: Tensor | None = None  # native mode: the weight scales, swizzled once

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in INFERENCE_MODES:
            raise ValueError(f"NVFP4Linear mode must be one of {', '.join(INFERENCE_MODES)} (got {mode!r})")
        self._mode = mode

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rule: str = "mse", mode: str = "w4a16",
                    activation_rule: str = "mse", block_2d: bool = False,
                    scratch: DequantScratch | None = None) -> NVFP4Linear:
        """Quantize `linear`'s current weight (on its device). A meta linear gives an empty
        meta layer, to be filled by `load_state_dict(..., assign=True)`."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, rule=rule, mode=mode,
                    activation_rule=activation_rule, device=weight.device, dtype=weight.dtype)
        if not weight.is_meta:
            layer.load_packed(quantize_tensor(weight, rule, block_2d=block_2d))
            if linear.bias is not None:
                layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        layer.scratch = scratch
        if scratch is not None:
            scratch.reserve(linear.in_features * linear.out_features)
        return layer

    def load_packed(self, packed: NVFP4Tensor) -> None:
        assert packed.shape == (self.out_features, self.in_features), (packed.shape, self.out_features)
        assert packed.rule == self.rule, (packed.rule, self.rule)
        self.weight_codes = packed.codes
        self.weight_scales = packed.scales
        self.weight_amax = packed.amax.float().reshape(())
        self._blocked_scales = None

    def packed_weight(self) -> NVFP4Tensor:
        return NVFP4Tensor(self.weight_codes, self.weight_scales, self.weight_amax, self.rule)

    @property
    def packed_nbytes(self) -> int:
        return self.packed_weight().nbytes

    def _apply(self, fn, recurse=True):
        # Casts of the model (`.to(torch.bfloat16)`, `.half()`) would turn the E4M3 scales and the
        # fp32 amax into the model dtype: the packed buffers follow device moves only.
        before = {name: self._buffers[name] for name in PACKED_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self._blocked_scales = None
        return self

    def dequantized_weight(self, dtype: torch.dtype, *, keep: bool = False) -> Tensor:
        """The weight [N, K] in `dtype`. On CUDA in eager mode it lands in the shared scratch
        buffer, valid until the next layer runs; `keep` (or autograd needing the weight for
        dgrad) gives a fresh tensor instead."""
        codes = self.weight_codes
        if torch.compiler.is_compiling() or self.scratch is None or not codes.is_cuda or keep \
                or not triton_available():
            return torch.ops.longlive.nvfp4_dequantize(codes, self.weight_scales, self.weight_amax, self.rule, dtype)
        out = self.scratch.view((self.out_features, self.in_features), codes.device, dtype)
        return dequantize_triton(self.packed_weight(), dtype, out=out)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "w4a16":
            # F.linear saves the weight when x needs a gradient: the scratch must not be reused then.
            keep = torch.is_grad_enabled() and x.requires_grad
            return F.linear(x, self.dequantized_weight(x.dtype, keep=keep), self.bias)
        x_MK = x.reshape(-1, self.in_features)
        if self.mode == "w4a4":
            y_MN = fp4_linear(quantize_tensor(x_MK, self.activation_rule), self.packed_weight(), self.bias, x.dtype)
        else:
            y_MN = self._native_gemm(x_MK)
            if self.bias is not None:
                y_MN = y_MN + self.bias
        return y_MN.reshape(*x.shape[:-1], self.out_features)

    def _native_gemm(self, x_MK: Tensor) -> Tensor:
        """Blackwell FP4 GEMM: codes and blocked E4M3 scales go to the tensor cores, the two tensor
        scales amax/(Q*S) multiply the fp32-accumulated result (K must be a multiple of 32)."""
        xq = quantize_tensor(x_MK, self.activation_rule)  # (the Triton quantizer makes it contiguous)
        if self._blocked_scales is None:
            self._blocked_scales = to_blocked(self.weight_scales)
        y_MN = torch._scaled_mm(as_float4_x2(xq.codes), as_float4_x2(self.weight_codes).t(),
                                to_blocked(xq.scales), self._blocked_scales, out_dtype=torch.bfloat16)
        tensor_scale = (xq.amax / rule_divisor(self.activation_rule)) * (self.weight_amax / rule_divisor(self.rule))
        return (y_MN.float() * tensor_scale).to(x_MK.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rule={self.rule}, mode={self.mode}")


# ----------------------------------------------------------------------------------------------
# Training layer: bf16 master weights, every GEMM in emulated NVFP4.


@dataclass(frozen=True)
class GemmRules:
    weight_rule: str
    activation_rule: str
    gradient_rule: str
    weight_2d: bool


def _quantize_gradient(g: Tensor, rule: str, generator: torch.Generator) -> NVFP4Tensor:
    """A gradient operand: stochastic rounding with noise drawn from the layer's generator."""
    return quantize_tensor(g, rule, "stochastic", noise=make_noise(g, None, generator))


def nvfp4_dgrad(dy_MN: Tensor, weight_NK: Tensor, rules: GemmRules, generator: torch.Generator,
                out_dtype: torch.dtype) -> Tensor:
    """dX = Q(dY, gradient rule, stochastic) · Q(Wᵀ)ᵀ, blocks of both along N."""
    dy_q = _quantize_gradient(dy_MN, rules.gradient_rule, generator)
    w_t_q = quantize_tensor(weight_NK.t().contiguous(), rules.weight_rule, block_2d=rules.weight_2d)
    return fp4_gemm(dy_q, w_t_q, out_dtype)


def nvfp4_wgrad(dy_MN: Tensor, x_tilde_MK: Tensor, rules: GemmRules, generator: torch.Generator,
                out_dtype: torch.dtype) -> Tensor:
    """dW = Q(RHT(dYᵀ), gradient rule, stochastic) · Q(RHT(X̃ᵀ), activation rule)ᵀ, blocks and the
    Hadamard transform along the tokens; tokens are zero-padded to a multiple of 16 (zero tokens
    add nothing to the product)."""
    pad = (-dy_MN.shape[0]) % BLOCK
    dy_t = random_hadamard_transform(F.pad(dy_MN.t().float(), (0, pad)))  # [N, Mp]
    x_t = random_hadamard_transform(F.pad(x_tilde_MK.t().float(), (0, pad)))  # [K, Mp]
    dy_q = _quantize_gradient(dy_t, rules.gradient_rule, generator)
    x_q = quantize_tensor(x_t, rules.activation_rule)
    return fp4_gemm(dy_q, x_q, out_dtype)


class _NVFP4LinearFunction(torch.autograd.Function):
    """Y = Q(X)·Q(W)ᵀ + b with the §3.3 backward. Only the FP4 copy of X is kept for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, rules: GemmRules, generator: torch.Generator):
        x_MK = x.reshape(-1, x.shape[-1])
        x_q = quantize_tensor(x_MK, rules.activation_rule)
        w_q = quantize_tensor(weight.detach(), rules.weight_rule, block_2d=rules.weight_2d)
        y_MN = fp4_linear(x_q, w_q, bias, x.dtype)
        ctx.save_for_backward(x_q.codes, x_q.scales, x_q.amax, weight)
        ctx.rules, ctx.generator = rules, generator
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y_MN.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        codes, scales, amax, weight = ctx.saved_tensors
        rules: GemmRules = ctx.rules
        dy_MN = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = nvfp4_dgrad(dy_MN, weight, rules, ctx.generator, ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            x_tilde = dequantize_tensor(NVFP4Tensor(codes, scales, amax, rules.activation_rule), ctx.x_dtype)
            dw = nvfp4_wgrad(dy_MN, x_tilde, rules, ctx.generator, weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = dy_MN.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None


class NVFP4TrainLinear(nn.Linear):
    """An `nn.Linear` (same `weight` / `bias` parameters, same state-dict names, so FSDP, PEFT and
    checkpoints see a normal linear) whose forward and backward GEMMs run in emulated NVFP4; the
    forward re-quantizes the current master weight on every call."""

    def __init__(self, linear: nn.Linear, rules: GemmRules, seed: int = 0):
        nn.Module.__init__(self)  # adopt the linear's parameters instead of allocating new ones
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.rules = rules
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def reseed(self, seed: int) -> None:
        """Restart the stochastic-rounding noise (e.g. a different seed per data-parallel rank)."""
        self.seed = seed
        self._generators.clear()

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def forward(self, x: Tensor) -> Tensor:
        return _NVFP4LinearFunction.apply(x, self.weight, self.bias, self.rules, self.generator(x.device))

    def extra_repr(self) -> str:
        r = self.rules
        return (f"{super().extra_repr()}, weight_rule={r.weight_rule}, activation_rule={r.activation_rule}, "
                f"gradient_rule={r.gradient_rule}, weight_2d={r.weight_2d}")


# ----------------------------------------------------------------------------------------------
# The swap.


def _check_shape(name: str, linear: nn.Linear, config: QuantConfig) -> None:
    fix = "leave it out (QuantConfig.exclude / the filter) or pad the layer"
    if linear.in_features % BLOCK:
        raise UserError(f"{name} has in_features={linear.in_features}, not a multiple of {BLOCK} "
                        f"(NVFP4 keeps one scale per {BLOCK} inputs): {fix}")
    if (config.mode == "train" or config.weight_2d) and linear.out_features % BLOCK:
        raise UserError(f"{name} has out_features={linear.out_features}, not a multiple of {BLOCK} "
                        f"(needed by 2-D weight tiles and the NVFP4 dgrad): {fix}")
    if config.mode == "native" and linear.in_features % (2 * BLOCK):
        raise UserError(f"{name} has in_features={linear.in_features}, not a multiple of {2 * BLOCK} "
                        f"(the FP4 tensor-core GEMM needs it): {fix}")


def quantize_model(model: nn.Module, config: QuantConfig,
                   filter: Callable[[str, nn.Module], bool] | None = None, *,
                   on_layer: Callable[[str, nn.Linear, nn.Module], None] | None = None) -> nn.Module:
    """Swap the selected linears in place (LoRA must be merged first) and return the model.
    Weights are quantized from their current values on their device; on `meta` the swap only
    builds empty layers. `on_layer(name, old_linear, new_layer)` is called after each swap."""
    names = select_linears(model, config.exclude)
    if filter is not None:
        names = [name for name in names if filter(name, model.get_submodule(name))]
    for name in names:
        _check_shape(name, model.get_submodule(name), config)
    if config.mode == "native":
        check_native_supported()
    rules = GemmRules(config.weight_rule, config.activation_rule, config.gradient_rule, config.weight_2d)
    # Swapping a model in parts (say one block at a time) keeps one scratch for the whole model.
    scratch = next((m.scratch for m in model.modules() if isinstance(m, NVFP4Linear) and m.scratch is not None),
                   None) or DequantScratch()
    for index, name in enumerate(names):
        linear = model.get_submodule(name)
        if config.mode == "train":
            layer = NVFP4TrainLinear(linear, rules, seed=config.seed + index)
        else:
            layer = NVFP4Linear.from_linear(linear, rule=config.weight_rule, mode=config.mode,
                                            activation_rule=config.activation_rule, block_2d=config.weight_2d,
                                            scratch=scratch)
        model.set_submodule(name, layer)
        if on_layer is not None:
            on_layer(name, linear, layer)
    return model


def nvfp4_layers(model: nn.Module) -> dict[str, NVFP4Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, NVFP4Linear)}


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch every NVFP4Linear of a model to another inference mode."""
    if mode not in INFERENCE_MODES:
        raise UserError(f"--mode {mode}: a packed NVFP4 model runs in {', '.join(INFERENCE_MODES)}")
    if mode == "native":
        check_native_supported()
    for layer in nvfp4_layers(model).values():
        layer.mode = mode
    return model


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (each tensor once: `parameters()` and `buffers()`
    skip repeats), as `core.hooks.storage_bytes` counts them."""
    return storage_bytes(model)


# ----------------------------------------------------------------------------------------------
# The packed checkpoint.


def quantized_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Bare names -> contiguous CPU tensors: the packed buffers of the NVFP4 layers and every
    other parameter of the model as it is."""
    if any(isinstance(m, NVFP4TrainLinear) for m in model.modules()):
        raise ValueError("train-mode layers hold bf16 master weights: swap with an inference mode "
                         "(w4a16 / w4a4) to export packed NVFP4 weights")
    return {name: t.detach().to("cpu").contiguous() for name, t in normalize_keys(model.state_dict()).items()}


def _metadata_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def save_quantized(model: nn.Module, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the packed model to one .safetensors file atomically (format in the module doc)."""
    path = Path(path)
    layers = nvfp4_layers(model)
    if not layers:
        raise ValueError("the model has no NVFP4 layers: run quantize_model first")
    rules = {(layer.rule, layer.activation_rule) for layer in layers.values()}
    if len(rules) != 1:
        raise ValueError(f"one file holds one scale rule; the layers use {sorted(rules)}")
    (rule, activation_rule), = rules
    text = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "rule": rule,
        "activation_rule": activation_rule,
        "mode": next(iter(layers.values())).mode,
        "layers": str(len(layers)),
    }
    config = getattr(model, "config", None)
    if isinstance(config, ModelConfig):
        text["model_config"] = json.dumps(dataclasses.asdict(config))
    for key, value in (metadata or {}).items():
        if key in ("format", "format_version"):
            raise ValueError(f"metadata key {key!r} is reserved")
        text[str(key)] = _metadata_text(value)
    tensors = quantized_state_dict(model)
    atomic_write(path, lambda temp: safetensors.torch.save_file(tensors, temp, text))
    return path


def read_quantized(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a packed NVFP4 file; every problem is a one-line UserError."""
    path = Path(path)
    fix = "convert the bf16 or official checkpoint with `longlive convert-nvfp4 IN OUT.safetensors`"
    if not path.is_file():
        raise UserError(f"NVFP4 checkpoint {path} not found: check the path, or {fix}")
    if path.suffix != ".safetensors":
        raise UserError(f"{path} is not a packed NVFP4 .safetensors file: {fix}")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            check_format(metadata, path)
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (safetensors.SafetensorError, OSError, RuntimeError) as err:
        raise UserError(f"cannot read {path} ({first_line(err)}): the file is truncated or corrupt; "
                        f"convert it again") from err
    return tensors, metadata


def is_nvfp4_file(path: str | Path) -> bool:
    """Whether `path` is a packed NVFP4 file of ours (by its metadata; unreadable files: False,
    so the caller's own loader reports them)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("format") == FORMAT_NAME
    except (safetensors.SafetensorError, OSError):
        return False


def check_format(metadata: Mapping[str, str], path: str | Path) -> None:
    if metadata.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not a packed NVFP4 checkpoint (no '{FORMAT_NAME}' format metadata): "
                        f"convert it with `longlive convert-nvfp4 {path} OUT.safetensors`")
    version = metadata.get("format_version", "")
    if version != str(FORMAT_VERSION):
        raise UserError(f"{path} has NVFP4 format version {version!r}; this longlive reads version "
                        f"{FORMAT_VERSION}: convert the bf16 checkpoint again with this version")
    rule = metadata.get("rule")
    if rule not in RULES:
        raise UserError(f"{path} records an unknown scale rule {rule!r}: the file is damaged; convert it again")


def load_quantized(path: str | Path, model_config: ModelConfig, mode: str = "w4a16",
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> CausalWanDiT:
    """A ready packed model in eval mode: built on meta, the file's NVFP4 layers swapped in,
    loaded with assign (no copy), then moved to `device`; unquantized weights in `dtype`."""
    if mode not in INFERENCE_MODES:
        raise UserError(f"--mode {mode}: a packed NVFP4 checkpoint runs in {', '.join(INFERENCE_MODES)} "
                        f"(training needs the bf16 weights)")
    tensors, metadata = read_quantized(path)
    suffix = "." + PACKED_BUFFERS[0]
    packed_layers = {name[: -len(suffix)] for name in tensors if name.endswith(suffix)}
    config = QuantConfig(mode=mode, weight_rule=metadata["rule"],
                         activation_rule=metadata.get("activation_rule", metadata["rule"]), exclude=())
    with torch.device("meta"):
        model = CausalWanDiT(model_config)
    quantize_model(model, config, filter=lambda name, _: name in packed_layers)
    check_shapes({name: tuple(t.shape) for name, t in model.state_dict().items()}, tensors,
                 f"NVFP4 checkpoint {path}", "the model", "check --preset / the file")
    expected_dtypes = {"weight_codes": torch.uint8, "weight_scales": torch.float8_e4m3fn,
                       "weight_amax": torch.float32}
    for name, tensor in tensors.items():
        kind = name.rsplit(".", 1)[-1]
        if kind in expected_dtypes and tensor.dtype != expected_dtypes[kind]:
            raise UserError(f"NVFP4 checkpoint {path}: {name} is {tensor.dtype}, expected "
                            f"{expected_dtypes[kind]}: the file is damaged; convert it again")
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()
