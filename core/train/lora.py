"""LoRA adapters of DMD distillation through PEFT (reference-model.md §7.4, reference-systems.md §6.7).

`attach_lora` injects PEFT LoRA layers into the 300 block linears of a built DiT in place (the
model stays a `CausalWanDiT`; the base is frozen, the adapters are fp32 master weights, seeded so
every rank starts from the same values). `lora_state_dict` gathers the adapters in the official
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


def attach_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float, seed: int) -> nn.Module:
    """Inject LoRA into every block linear of `model`, freeze everything else, keep the adapters
    in fp32; returns `model`. Initialisation as PEFT's (A Kaiming-uniform with a = sqrt(5), B
    zeros), drawn in fp32 on the CPU from `seed` and the layer's index: the same values on every
    rank, device and base dtype."""
    import peft  # slow import (transformers): only LoRA users pay for it

    targets = block_linear_names(len(model.blocks))
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    peft.inject_adapter_in_model(config, model, adapter_name=_ADAPTER)
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
    return model


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
