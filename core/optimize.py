"""Speed transforms applied to a built model from outside (the model code stays eager)."""

from __future__ import annotations

from core.dit import CausalWanDiT


def compile_blocks(model: CausalWanDiT, mode: str | None = None) -> CausalWanDiT:
    """torch.compile every transformer block: fuses the norms, adaLN modulation, RoPE and gates
    around the matmuls. Cache writes and attention stay eager (see core/kv_cache.py)."""
    for block in model.blocks:
        block.compile(dynamic=False, mode=mode)
    return model
