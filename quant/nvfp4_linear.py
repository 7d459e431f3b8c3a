"""NVFP4 inference linear layer (reference-systems.md §3.3): a packed weight that runs in one of
three `QuantMode`s.

  w4a16   packed weight, dequantized on the fly into the activation dtype, then a cuBLAS GEMM
          (`F.linear`). Works on any GPU and on the CPU; the NVFP4 error is the weight's only.
  w4a4    the NVFP4 tensor-core GEMM, emulated as FourOverSix's PyTorch matmul backend does it:
          the activation is quantized every call (activation rule, 1-D blocks along K, nearest),
          both operands are dequantized to fp32, fp32 matmul, output in the input dtype, + bias.
  native  the same GEMM on Blackwell FP4 tensor cores (`torch._scaled_mm` on float4_e2m1fn_x2
          operands with blocked E4M3 scales, the two tensor scales applied to its output).

Also the device dispatch of quantize / dequantize (Triton on CUDA, bit-identical to the torch
reference that serves the CPU and 2-D tiles) and the emulated FP4 GEMM the training layer shares.

Legend: M tokens (leading dims flattened), K in_features, N out_features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.config import QuantMode
from quant.kernels import dequantize_triton, quantize_triton, triton_available
from quant.nvfp4 import BLOCK, NVFP4Tensor, as_float4_x2, dequantize, quantize, rule_divisor, to_blocked

PACKED_BUFFERS = ("weight_codes", "weight_scales", "weight_amax")

# ----------------------------------------------------------------------------------------------
# Quantize / dequantize on the best path of the device.


def quantize_tensor(x: Tensor, rule: str, rounding: str = "nearest", *, block_2d: bool = False,
                    noise: Tensor | None = None) -> NVFP4Tensor:
    """`quant.nvfp4.quantize` through the Triton kernel on CUDA (bit-identical), else the reference."""
    if x.is_cuda and not block_2d and triton_available():
        return quantize_triton(x, rule, rounding, noise=noise)
    return quantize(x, rule, rounding, block_2d=block_2d, noise=noise)


def dequantize_tensor(t: NVFP4Tensor, dtype: torch.dtype) -> Tensor:
    """`quant.nvfp4.dequantize` through the Triton kernel on CUDA (bit-identical), else the reference."""
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
    """A·Bᵀ of two quantized row-major operands, emulated: dequantize both to fp32, fp32 matmul
    (also under an autocast region, which would otherwise round the operands to bf16)."""
    with torch.autocast(a.codes.device.type, enabled=False):
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



class NVFP4Linear(nn.Module):
    """A linear layer with a packed NVFP4 weight (buffers `weight_codes`, `weight_scales`,
    `weight_amax`) and a high-precision `bias`. `rule` is a plain attribute: the file metadata
    carries it, the tensors do not (pitfall 10)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rule: str = "mse",
                 mode: QuantMode = QuantMode.w4a16, activation_rule: str = "mse", device=None, dtype=None):
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
    def mode(self) -> QuantMode:
        return self._mode

    @mode.setter
    def mode(self, mode: QuantMode) -> None:
        self._mode = QuantMode(mode)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rule: str = "mse", mode: QuantMode = QuantMode.w4a16,
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
        if self.mode == QuantMode.w4a16:
            # F.linear saves the weight when x needs a gradient: the scratch must not be reused then.
            keep = torch.is_grad_enabled() and x.requires_grad
            return F.linear(x, self.dequantized_weight(x.dtype, keep=keep), self.bias)
        x_MK = x.reshape(-1, self.in_features)
        if self.mode == QuantMode.w4a4:
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
