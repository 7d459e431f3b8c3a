"""How storage formats plug into generation from outside `core/` (quantization lives in `quant/`
and is wired in by the CLI): a loader that builds the DiT, and a transform for every KV cache.

`core` calls these hooks and never imports a quantizer (design.md §2, dependency direction)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import ModelConfig
from core.dit import CausalWanDiT
from core.pipeline import CacheTransform

# (config, checkpoint or None for seeded random weights, lora, device, dtype, seed) -> eval DiT
DitLoader = Callable[[ModelConfig, "Path | None", "Path | None", torch.device, torch.dtype, int],
                     CausalWanDiT]


@dataclass(frozen=True)
class ModelHooks:
    label: str = ""  # what the summary calls the storage, e.g. "nvfp4 w4a16 (mse), kv nvfp4 (mse)"
    load_dit: DitLoader | None = None  # None: the plain bf16 build
    cache_transform: CacheTransform | None = None  # None: bf16 caches


def storage_bytes(obj: object) -> int:
    """Bytes of every tensor an object holds (module parameters and buffers, or a KV cache's
    per-layer storage): what a format really costs, whatever its layout."""
    if isinstance(obj, torch.nn.Module):
        tensors = [*obj.parameters(), *obj.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)
    return sum(layer.nbytes for layer in obj.layers)  # each cache layer reports its own storage
