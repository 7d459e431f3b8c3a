"""FP8 (E4M3) block linears for Hopper: W8A8 with per-output-channel weight scales and dynamic
per-token activation scales (the official TorchAO recipe, reference-systems.md §3.7, §7.6 of
reference-model.md), applied to a built model from outside as config + transform + filter.

Format, for a row r of any matrix X [rows, K] (a weight's output channel, or a token):

    s_r = max(amax_r, AMAX_FLOOR) / 448                 fp32, correctly rounded
    q_r = e4m3_rne(clamp(X_r / s_r, -448, 448))         float8_e4m3fn, saturating

so a row's largest value maps to ±448 and nothing overflows. `AMAX_FLOOR` (2**-40) is the zero-row
rule: an all-zero row (or token) gets codes 0 and the finite scale 2**-40 / 448, never 0 / 0,
so its product is exactly 0 and no NaN appears. Non-finite inputs are not clipped: they stay
non-finite in the output.

GEMM: `Y = (q_x · q_wᵀ) ⊙ (s_x s_wᵀ) + b`: products of E4M3 values are exact in fp32, so the only
rounding besides the two quantizations is the fp32 accumulation (and the output cast). On a GPU
with FP8 tensor cores (compute capability >= 8.9) that is one `torch._scaled_mm` (row-major codes
[M, K], column-major weight codes, scales [M, 1] and [1, N], bf16 output with the bias added in its
epilogue); elsewhere, or with `emulate`, the plain-torch `fp8_gemm_reference` (codes to fp32, fp32
matmul, then the scales), which is also the test oracle. `fast_accum` (TorchAO's default for
inference) lets Hopper's tensor cores accumulate without periodic fp32 promotion: faster, a little
less accurate; docs/fp8.md has the measurements.

Activation quantization: in eager CUDA runs the Triton kernel of quant/fp8_kernels.py (one pass,
bit-identical to `quantize_rows_reference`); under torch.compile the plain torch ops of
`quantize_rows_reference`, which Inductor fuses into the kernel that produces the activation
(LayerNorm + modulation, GELU). Inductor's fp32 division is not correctly rounded, so a compiled
layer may differ from eager in the last bit of a scale and, rarely, one code step.

State dict of a swapped linear L: `L.weight` (float8_e4m3fn [N, K]), `L.weight_scale` (fp32 [N]),
`L.bias` (model dtype). Dtype casts of the model (`.to(torch.bfloat16)`) leave the first two alone.

Legend: M tokens (leading dims flattened), K in_features, N out_features.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.config import require
from core.errors import UserError
from quant.fp8_kernels import MAX_ROW, quantize_rows_triton
from quant.kernels import triton_available
from quant.linear import DEFAULT_EXCLUDE, check_exclude, select_linears

E4M3_MAX = 448.0
AMAX_FLOOR = 2.0**-40  # exact in fp32 and fp64; far below any real activation or weight row
ALIGN = 16  # torch._scaled_mm wants K and N multiples of 16
FP8_BUFFERS = ("weight", "weight_scale")
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada, Hopper, Blackwell


@dataclass
class FP8Config:
    """What to swap and how. `exclude`: module names or `re:` patterns left in high precision
    (default: everything but the 300 block linears). `fast_accum`: the tensor cores' fast FP8
    accumulation (TorchAO's inference default). `emulate`: always use the plain-torch GEMM, also
    on a GPU with FP8 tensor cores (numerics studies)."""

    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    fast_accum: bool = True
    emulate: bool = False

    def __post_init__(self) -> None:
        self.exclude = check_exclude(self.exclude)
        for key in ("fast_accum", "emulate"):
            require(isinstance(getattr(self, key), bool), f"{key} must be true or false (got {getattr(self, key)!r})")


# ----------------------------------------------------------------------------------------------
# Quantization and the reference GEMM.


def quantize_rows_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """`x [..., K]` -> (codes float8_e4m3fn `[..., K]`, scales fp32 `[...]`), one scale per row
    (module docstring). Plain torch ops: the CPU path, the compiled path, and the definition the
    Triton kernel is tested against. Both divisions have tensor divisors, so CUDA computes them
    correctly rounded too (it turns a division by a Python number into a reciprocal multiply)."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1)
    scale = amax.clamp(min=AMAX_FLOOR) / amax.new_full((), E4M3_MAX)
    codes = (x32 / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """`quantize_rows_reference` on the fastest path: the one-pass Triton kernel in eager CUDA
    runs (same bytes), the torch ops under torch.compile (fused into the producer) and on CPU."""
    if x.is_cuda and not torch.compiler.is_compiling() and x.shape[-1] <= MAX_ROW and triton_available():
        return quantize_rows_triton(x, AMAX_FLOOR, E4M3_MAX)
    return quantize_rows_reference(x)


def dequantize_rows(codes: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """codes · scale per row, in fp32, then cast to `dtype`."""
    return (codes.float() * scales.unsqueeze(-1)).to(dtype)


def fp8_gemm_reference(a_codes: Tensor, a_scales: Tensor, b_codes: Tensor, b_scales: Tensor,
                       bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """`(A·Bᵀ) ⊙ (s_a s_bᵀ) + bias` for row-quantized `A [M, K]`, `B [N, K]`: exact E4M3
    products accumulated in fp32 (what the tensor cores compute), scaled in fp32, one cast."""
    acc_MN = a_codes.float() @ b_codes.float().T
    y_MN = acc_MN * a_scales.unsqueeze(1) * b_scales.unsqueeze(0)
    if bias is not None:
        y_MN = y_MN + bias.float()
    return y_MN.to(out_dtype)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@torch.compiler.assume_constant_result
def _has_fp8_tensor_cores(index: int) -> bool:
    return _capability(index) >= MIN_CAPABILITY


def fp8_gemm_available(device: torch.device | str) -> bool:
    """Whether `device` runs `torch._scaled_mm` on FP8 tensor cores (CUDA, capability >= 8.9)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _has_fp8_tensor_cores(torch.cuda.current_device() if device.index is None else device.index)


def check_fp8_supported(device: torch.device | str) -> None:
    """One-line UserError for `--precision fp8` on a GPU without FP8 tensor cores. The CPU is
    allowed: it runs the plain-torch emulation (tiny models, tests)."""
    device = torch.device(device)
    if device.type != "cuda" or fp8_gemm_available(device):
        return
    if not torch.cuda.is_available():
        raise UserError("--precision fp8 on --device cuda: no CUDA GPU found; use --device cpu (emulated FP8) "
                        "or a GPU with FP8 tensor cores")
    index = torch.cuda.current_device() if device.index is None else device.index
    major, minor = _capability(index)
    raise UserError(f"--precision fp8 needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, "
                    f"Blackwell; found {torch.cuda.get_device_name(index)} sm_{major}{minor}): use --precision "
                    f"bf16 or nvfp4")


# ----------------------------------------------------------------------------------------------
# The layer.


class FP8Linear(nn.Module):
    """A linear layer with E4M3 weight codes (buffer `weight`, `[N, K]`), one fp32 scale per
    output channel (buffer `weight_scale`, `[N]`) and a high-precision `bias`; activations are
    quantized per token on every call. Inference only (no backward through the FP8 GEMM)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, fast_accum: bool = True,
                 emulate: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fast_accum = fast_accum
        self.emulate = emulate
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, fast_accum: bool = True, emulate: bool = False) -> FP8Linear:
        """Quantize `linear`'s current weight on its device (LoRA merged first). A meta linear
        gives an empty meta layer, to be filled by `load_state_dict(..., assign=True)`."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, fast_accum=fast_accum,
                    emulate=emulate, device=weight.device, dtype=weight.dtype)
        if not weight.is_meta:
            layer.weight, layer.weight_scale = quantize_rows(weight)
            if linear.bias is not None:
                layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    def _apply(self, fn, recurse=True):
        # Casts of the model (`.to(torch.bfloat16)`, `.half()`) would turn the E4M3 codes and the
        # fp32 scales into the model dtype: these two buffers follow device moves only.
        before = {name: self._buffers[name] for name in FP8_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_rows(self.weight, self.weight_scale, dtype)

    def forward(self, x: Tensor) -> Tensor:
        x_MK = x.reshape(-1, self.in_features)
        codes, scales = quantize_rows(x_MK)
        if not self.emulate and x.is_cuda and _has_fp8_tensor_cores(x.device.index):
            y_MN = self._scaled_mm(codes, scales).to(x.dtype)
        else:
            y_MN = fp8_gemm_reference(codes, scales, self.weight, self.weight_scale, self.bias, x.dtype)
        return y_MN.reshape(*x.shape[:-1], self.out_features)

    def _scaled_mm(self, codes_MK: Tensor, scales_M: Tensor) -> Tensor:
        """The FP8 tensor-core GEMM, bf16 out; a bf16 bias rides in the epilogue."""
        fused_bias = self.bias is not None and self.bias.dtype == torch.bfloat16
        y_MN = torch._scaled_mm(codes_MK, self.weight.t(), scales_M.unsqueeze(1), self.weight_scale.unsqueeze(0),
                                bias=self.bias if fused_bias else None, out_dtype=torch.bfloat16,
                                use_fast_accum=self.fast_accum)
        if self.bias is not None and not fused_bias:
            y_MN = y_MN + self.bias.to(torch.bfloat16)
        return y_MN

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fast_accum={self.fast_accum}, emulate={self.emulate}")


# ----------------------------------------------------------------------------------------------
# The swap.


def _check_shape(name: str, linear: nn.Linear) -> None:
    for key in ("in_features", "out_features"):
        size = getattr(linear, key)
        if size % ALIGN:
            raise UserError(f"{name} has {key}={size}, not a multiple of {ALIGN} (the FP8 GEMM needs it): "
                            f"leave it out (FP8Config.exclude / the filter) or pad the layer")


def quantize_fp8(model: nn.Module, config: FP8Config | None = None,
                 filter: Callable[[str, nn.Module], bool] | None = None) -> nn.Module:
    """Swap the selected `nn.Linear`s of `model` in place for `FP8Linear` and return the model.
    Same selection as NVFP4 (`quant.linear.select_linears` with `config.exclude`: the 300 block
    linears of the 5B), narrowed by `filter(name, module)`. Weights are quantized from their
    current values on their device; LoRA must be merged first; on `meta` the swap only builds
    empty layers."""
    config = config or FP8Config()
    names = select_linears(model, config.exclude)
    if filter is not None:
        names = [name for name in names if filter(name, model.get_submodule(name))]
    for name in names:
        _check_shape(name, model.get_submodule(name))
    for name in names:
        layer = FP8Linear.from_linear(model.get_submodule(name), fast_accum=config.fast_accum,
                                      emulate=config.emulate)
        model.set_submodule(name, layer)
    return model


def fp8_layers(model: nn.Module) -> dict[str, FP8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}
