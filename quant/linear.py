"""The NVFP4 module swap (reference-systems.md §3.3, §3.4): config + transform + filter.

`quantize_model(model, config, filter)` replaces the selected `nn.Linear`s in place: with an
`NVFP4Config` by packed inference layers (`quant.nvfp4_linear.NVFP4Linear`, mode w4a16 / w4a4 /
native), with an `NVFP4TrainingConfig` by training layers that keep bf16 master weights
(`quant.nvfp4_train.NVFP4TrainLinear`). The selection is the official one: every plain linear
outside `DEFAULT_EXCLUDE`, exactly the 300 block linears of the 5B. The packed file format lives
in `quant/packed.py`.

The checks that need the machine (native mode needs Blackwell) run once, before any model is
built, in the builder (`check_native_supported`); the swap itself does not repeat them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from core.config import QuantMode, check_types, require
from core.errors import UserError
from quant.nvfp4 import BLOCK, RULES
from quant.nvfp4_linear import DequantScratch, NVFP4Linear
from quant.nvfp4_train import NVFP4TrainingConfig, NVFP4TrainLinear

# The official filter list (utils/quant.py): everything outside the blocks and the norms stays
# high precision; with it exactly the 300 block linears of the 5B are quantized.
DEFAULT_EXCLUDE = (
    "text_embedding.0", "text_embedding.2", "patch_embedding", "time_projection.1",
    "time_embedding.0", "time_embedding.2", "head.head", "head.modulation",
    "re:.*norm_k$", "re:.*norm_q$", "re:.*norm1$", "re:.*norm2$", "re:.*norm3$",
)


@dataclass(frozen=True)
class NVFP4Config:
    """The module swap for inference: packed weights (1-D blocks along K unless `weight_2d`) that
    run in `mode`, activations quantized with `activation_rule` where the mode does."""

    mode: QuantMode = QuantMode.w4a16
    weight_rule: str = "mse"
    activation_rule: str = "mse"
    weight_2d: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("weight_rule", "activation_rule"):
            value = getattr(self, name)
            require(value in RULES, f"{name} must be one of {', '.join(RULES)} (got {value!r})")


SwapConfig = NVFP4Config | NVFP4TrainingConfig


def ar_training_config(seed: int = 0) -> NVFP4TrainingConfig:
    """The official NVFP4 settings of AR training (the `NVFP4TrainingConfig` defaults)."""
    return NVFP4TrainingConfig(seed=seed)


def check_exclude(exclude: Sequence[str]) -> tuple[str, ...]:
    """The exclude list as a tuple; a ValueError for a string or a bad `re:` pattern."""
    require(not isinstance(exclude, str),
            f"exclude must be a list of module names or 're:' patterns (got the string {exclude!r})")
    for pattern in exclude:
        require(isinstance(pattern, str) and pattern != "",
                f"exclude entries must be module names or 're:' patterns (got {pattern!r})")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise ValueError(f"exclude pattern {pattern!r} is not a valid regex ({err})") from None
    return tuple(exclude)


def select_linears(model: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> list[str]:
    """Names of the plain `nn.Linear` modules not excluded: an entry excludes the module of that
    exact name, or with a `re:` prefix every module whose name the regex matches anywhere
    (`re.search`, as the official filter)."""
    exclude = check_exclude(exclude)
    exact = {p for p in exclude if not p.startswith("re:")}
    patterns = [re.compile(p[3:]) for p in exclude if p.startswith("re:")]
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not isinstance(module, NVFP4TrainLinear)
            and name not in exact and not any(p.search(name) for p in patterns)]


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
    raise UserError(f"--quant-mode native needs an NVIDIA Blackwell GPU (compute capability 10.x or 12.x, "
                    f"found {found}); use --quant-mode w4a16 or w4a4")


# ----------------------------------------------------------------------------------------------
# The swap.


def _check_shape(name: str, linear: nn.Linear, config: SwapConfig) -> None:
    fix = "leave it out (exclude / the filter) or pad the layer"
    if linear.in_features % BLOCK:
        raise UserError(f"{name} has in_features={linear.in_features}, not a multiple of {BLOCK} "
                        f"(NVFP4 keeps one scale per {BLOCK} inputs): {fix}")
    training = isinstance(config, NVFP4TrainingConfig)
    if (training or config.weight_2d) and linear.out_features % BLOCK:
        raise UserError(f"{name} has out_features={linear.out_features}, not a multiple of {BLOCK} "
                        f"(needed by 2-D weight tiles and the NVFP4 dgrad): {fix}")
    if not training and config.mode == QuantMode.native and linear.in_features % (2 * BLOCK):
        raise UserError(f"{name} has in_features={linear.in_features}, not a multiple of {2 * BLOCK} "
                        f"(the FP4 tensor-core GEMM needs it): {fix}")


def quantize_model(model: nn.Module, config: SwapConfig,
                   filter: Callable[[str, nn.Module], bool] | None = None, *,
                   exclude: Sequence[str] = DEFAULT_EXCLUDE,
                   on_layer: Callable[[str, nn.Linear, nn.Module], None] | None = None) -> nn.Module:
    """Swap the selected linears in place (LoRA must be merged first) and return the model.
    Weights are quantized from their current values on their device; on `meta` the swap only
    builds empty layers. `on_layer(name, old_linear, new_layer)` is called after each swap."""
    names = select_linears(model, exclude)
    if filter is not None:
        names = [name for name in names if filter(name, model.get_submodule(name))]
    for name in names:
        _check_shape(name, model.get_submodule(name), config)
    # Swapping a model in parts (say one block at a time) keeps one scratch for the whole model.
    scratch = next((m.scratch for m in model.modules() if isinstance(m, NVFP4Linear) and m.scratch is not None),
                   None) or DequantScratch()
    for index, name in enumerate(names):
        linear = model.get_submodule(name)
        if isinstance(config, NVFP4TrainingConfig):
            layer = NVFP4TrainLinear(linear, config, seed=config.seed + index)
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


def set_mode(model: nn.Module, mode: QuantMode) -> nn.Module:
    """Switch every NVFP4Linear of a model to another inference mode."""
    for layer in nvfp4_layers(model).values():
        layer.mode = mode
    return model
