"""LoRA adapters of DMD distillation (reference-model.md §7.4, reference-systems.md §6.7).

`attach_lora` wraps the 300 block linears of a built DiT in place in `LoRALinear`, laid out as
PEFT's `lora.Linear` (the base under `base_layer`, the adapter under `lora_A.default` /
`lora_B.default`), so every parameter name, and so every training checkpoint, is the one the
official PEFT injection gives; the model stays a `CausalWanDiT`, the base is frozen, the adapters
are fp32 master weights, seeded so every rank starts from the same values. (Our own module, not
PEFT's: importing peft imports transformers, ~4.6 s of every training start; tests hold the two
equal, names, values and gradients.) `lora_state_dict` gathers the adapters in the official
layout, PEFT keys without the adapter name:

    base_model.model.blocks.{i}.{self_attn,cross_attn}.{q,k,v,o}.lora_{A,B}.weight
    base_model.model.blocks.{i}.ffn.{0,2}.lora_{A,B}.weight

`save_lora_file` writes the standalone generator LoRA that `generate --lora` (and the official
inference with `lora_ckpt`) reads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.checkpoint import LORA_PREFIX, WRAPPER_TOKENS, atomic_write, block_linear_names

_ADAPTER = "default"  # PEFT's adapter name; the official files leave it out
_OURS = re.compile(rf"\.(lora_[AB])\.{_ADAPTER}\.weight$")


class LoRALinear(nn.Module):
    """`base_layer(x) + scaling * B(A(dropout(x)))` with `scaling = alpha / rank`, computed as
    PEFT's `lora.Linear` does (the input cast to the adapter's dtype, the sum cast back to the
    base's output dtype)."""

    def __init__(self, base_layer: nn.Linear, *, rank: int, alpha: float, dropout: float):
        super().__init__()
        device = base_layer.weight.device
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict({_ADAPTER: nn.Linear(base_layer.in_features, rank, bias=False, device=device)})
        self.lora_B = nn.ModuleDict({_ADAPTER: nn.Linear(rank, base_layer.out_features, bias=False, device=device)})
        self.lora_dropout = nn.ModuleDict({_ADAPTER: nn.Dropout(dropout) if dropout > 0 else nn.Identity()})
        self.scaling = alpha / rank

    @property
    def weight(self) -> Tensor:  # readers of `linear.weight` (dtype, device) see the base's
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        lora_A, lora_B = self.lora_A[_ADAPTER], self.lora_B[_ADAPTER]
        x = x.to(lora_A.weight.dtype)
        update = lora_B(lora_A(self.lora_dropout[_ADAPTER](x)))
        return (result + update * self.scaling).to(result.dtype)


def attach_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float, seed: int) -> nn.Module:
    """Wrap every block linear of `model` in `LoRALinear`, freeze everything else, keep the
    adapters in fp32 (`init_adapters`: the same values on every rank, device and base dtype);
    returns `model`."""
    for name in block_linear_names(len(model.blocks)):
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent)
        base = getattr(holder, child)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRA targets linear layers; {name} is {type(base).__name__}")
        setattr(holder, child, LoRALinear(base, rank=rank, alpha=alpha, dropout=dropout))
    init_adapters(model, seed)
    return model


def init_adapters(model: nn.Module, seed: int) -> None:
    """Train the adapters only, and (re)initialise them in fp32: A Kaiming-uniform (a = sqrt(5),
    PEFT's), drawn on the CPU from `seed` and the adapter's index, B zeros."""
    index = 0
    for name, param in model.named_parameters():
        is_adapter = _OURS.search(name) is not None
        param.requires_grad_(is_adapter)
        if not is_adapter:
            continue
        values = torch.zeros(param.shape, dtype=torch.float32)
        if ".lora_A." in name:
            generator = torch.Generator().manual_seed(seed * 1009 + index)
            nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
            index += 1
        param.data = values.to(param.device)


def official_lora_key(name: str) -> str:
    """A parameter name of an injected model -> its key in the official LoRA files."""
    for token in WRAPPER_TOKENS:
        name = name.replace(token, "")
    return LORA_PREFIX + _OURS.sub(r".\1.weight", name)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if _OURS.search(name)}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters, full (unsharded) on the CPU, under official keys. Collective under FSDP:
    every rank calls it; rank 0 gets the tensors, the other ranks an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    return {official_lora_key(name): value.detach().clone() for name, value in state.items()
            if _OURS.search(name)}


def scaled_for_merge(lora: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """The adapters with `alpha / rank` folded into B, so that they mean the same to a reader that
    assumes alpha = rank (scale 1: the official inference and `generate --lora`)."""
    if scale == 1.0:
        return dict(lora)
    return {key: value * scale if ".lora_B." in key else value for key, value in lora.items()}


def stack_loras(*loras: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Adapters trained one on top of another (a student distilled from a merged student) as one
    LoRA of the summed rank that adds up to the same update exactly: A's stacked along the rank,
    B's side by side, so B @ A = sum B_i @ A_i. Every input at scale 1 (alpha = rank, as exported);
    the result too."""
    keys = set(loras[0])
    if any(set(lora) != keys for lora in loras[1:]):
        raise ValueError("the LoRAs target different layers")
    stacked = {}
    for key in keys:
        dim = 0 if ".lora_A." in key else 1
        stacked[key] = torch.cat([lora[key].float() for lora in loras], dim=dim)
    return stacked


def save_lora_file(lora: Mapping[str, Tensor], path: Path, *, step: int, metadata: Mapping[str, Any]) -> Path:
    """Write a generator LoRA atomically: `.safetensors` = the bare PEFT dict (metadata as
    strings), anything else = the official `{"generator_lora": ..., "step": n}` pickle."""
    import json

    import safetensors.torch

    path = Path(path)
    tensors = {key: value.contiguous() for key, value in lora.items()}
    if path.suffix == ".safetensors":
        text = {"step": str(step), **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
        atomic_write(path, lambda temp: safetensors.torch.save_file(tensors, temp, text))
    else:
        atomic_write(path, lambda temp: torch.save({"generator_lora": tensors, "step": step, **metadata}, temp))
    return path
