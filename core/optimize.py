"""Speed transforms applied to a built model from outside (the model code stays eager)."""

from __future__ import annotations

import torch

from core.dit import CausalWanDiT


def wants_compile(setting: str, device: torch.device) -> bool:
    """RuntimeConfig.compile ("auto" | "always" | "never") on a device."""
    return setting == "always" or (setting == "auto" and device.type == "cuda")


def compile_blocks(model: CausalWanDiT, mode: str | None = None) -> CausalWanDiT:
    """torch.compile every transformer block: fuses the norms, adaLN modulation, RoPE and gates
    around the matmuls. Cache writes and attention stay eager (see core/kv_cache.py)."""
    for block in model.blocks:
        block.compile(dynamic=False, mode=mode)
    return model
