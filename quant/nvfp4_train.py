"""NVFP4 training linear layer (reference-systems.md §3.3): bf16 master weights, every GEMM of
fprop, dgrad and wgrad emulated in NVFP4 (2-D weight tiles, stochastic gradients, a random
Hadamard transform in wgrad).

Legend: M tokens (leading dims flattened), K in_features, N out_features, Mp = M padded to 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.config import check_types, require
from quant.nvfp4 import BLOCK, RULES, NVFP4Tensor, make_noise, random_hadamard_transform
from quant.nvfp4_linear import dequantize_tensor, fp4_gemm, fp4_linear, quantize_tensor


@dataclass(frozen=True)
class NVFP4TrainingConfig:
    """The module swap for training: which rules the three GEMMs use. Defaults are the official AR
    settings (static_6 weights in 16x16 tiles so W and Wᵀ share scales, mse activations and
    gradients). Layer i of a swap draws its stochastic-rounding noise from a generator seeded
    with `seed + i`."""

    weight_rule: str = "static_6"
    activation_rule: str = "mse"
    gradient_rule: str = "mse"
    weight_2d: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("weight_rule", "activation_rule", "gradient_rule"):
            value = getattr(self, name)
            require(value in RULES, f"{name} must be one of {', '.join(RULES)} (got {value!r})")


def _quantize_gradient(g: Tensor, rule: str, generator: torch.Generator) -> NVFP4Tensor:
    """A gradient operand: stochastic rounding with noise drawn from the layer's generator."""
    return quantize_tensor(g, rule, "stochastic", noise=make_noise(g, None, generator))


def nvfp4_dgrad(dy_MN: Tensor, weight_NK: Tensor, rules: NVFP4TrainingConfig, generator: torch.Generator,
                out_dtype: torch.dtype) -> Tensor:
    """dX = Q(dY, gradient rule, stochastic) · Q(Wᵀ)ᵀ, blocks of both along N."""
    dy_q = _quantize_gradient(dy_MN, rules.gradient_rule, generator)
    w_t_q = quantize_tensor(weight_NK.t().contiguous(), rules.weight_rule, block_2d=rules.weight_2d)
    return fp4_gemm(dy_q, w_t_q, out_dtype)


def nvfp4_wgrad(dy_MN: Tensor, x_tilde_MK: Tensor, rules: NVFP4TrainingConfig, generator: torch.Generator,
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
    def forward(ctx, x, weight, bias, rules: NVFP4TrainingConfig, generator: torch.Generator):
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
        rules: NVFP4TrainingConfig = ctx.rules
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


class _FrozenNVFP4LinearFunction(torch.autograd.Function):
    """Y = Q(X)·W_qᵀ + b with a weight quantized once (W_q and the quantized Wᵀ): fprop and dgrad
    of `_NVFP4LinearFunction`, no weight or bias gradient (a frozen LoRA base)."""

    @staticmethod
    def forward(ctx, x, bias, w_q: NVFP4Tensor, w_t_q: NVFP4Tensor, rules: NVFP4TrainingConfig,
                generator: torch.Generator):
        x_MK = x.reshape(-1, x.shape[-1])
        y_MN = fp4_linear(quantize_tensor(x_MK, rules.activation_rule), w_q, bias, x.dtype)
        ctx.w_t_q, ctx.rules, ctx.generator = w_t_q, rules, generator
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y_MN.reshape(*x.shape[:-1], w_q.shape[0])

    @staticmethod
    def backward(ctx, dy):
        dx = None
        if ctx.needs_input_grad[0]:
            dy_q = _quantize_gradient(dy.reshape(-1, dy.shape[-1]), ctx.rules.gradient_rule, ctx.generator)
            dx = fp4_gemm(dy_q, ctx.w_t_q, ctx.x_dtype).reshape(ctx.x_shape)
        return dx, None, None, None, None, None


class NVFP4TrainLinear(nn.Linear):
    """An `nn.Linear` (same `weight` / `bias` parameters, same state-dict names, so FSDP, PEFT and
    checkpoints see a normal linear) whose forward and backward GEMMs run in emulated NVFP4; the
    forward re-quantizes the current master weight on every call."""

    def __init__(self, linear: nn.Linear, rules: NVFP4TrainingConfig, seed: int = 0):
        nn.Module.__init__(self)  # adopt the linear's parameters instead of allocating new ones
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.rules = rules
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._frozen: tuple[NVFP4Tensor, NVFP4Tensor] | None = None

    def reseed(self, seed: int) -> None:
        """Restart the stochastic-rounding noise (e.g. a different seed per data-parallel rank)."""
        self.seed = seed
        self._generators.clear()

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def materialize(self) -> None:
        """Quantize the frozen master weight once (W, and Wᵀ for dgrad) and run from those: the
        official materialisation of a frozen LoRA base before FSDP. The same numbers as
        re-quantizing on every call; the weight must not train or change afterwards."""
        assert not self.weight.requires_grad, "materialize() is for a frozen weight"
        weight = self.weight.detach()
        rule, tiles = self.rules.weight_rule, self.rules.weight_2d
        self._frozen = (quantize_tensor(weight, rule, block_2d=tiles),
                        quantize_tensor(weight.t().contiguous(), rule, block_2d=tiles))

    def forward(self, x: Tensor) -> Tensor:
        if self._frozen is not None:
            bias = None if self.bias is None else self.bias.detach()
            return _FrozenNVFP4LinearFunction.apply(x, bias, *self._frozen, self.rules, self.generator(x.device))
        return _NVFP4LinearFunction.apply(x, self.weight, self.bias, self.rules, self.generator(x.device))

    def extra_repr(self) -> str:
        r = self.rules
        return (f"{super().extra_repr()}, weight_rule={r.weight_rule}, activation_rule={r.activation_rule}, "
                f"gradient_rule={r.gradient_rule}, weight_2d={r.weight_2d}")
