"""FSDP2 (`fully_shard`) of the causal DiT: where the parameter shards are gathered.

Units: each block (its text keys/values are computed by `DiTBlock.text_kv` before the blocks run,
so that method is registered as a forward of the block's unit too), and every top-level module
with parameters. The model code stays unaware; stages called directly
(as the naive SP layout does) still gather their parameters through their own unit's hooks."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from core.dit import CausalWanDiT

TOP_LEVEL = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "head")


def shard_model(model: CausalWanDiT, mesh: DeviceMesh, compute_dtype: torch.dtype) -> CausalWanDiT:
    """Shard in place: compute in `compute_dtype`, reduce gradients in fp32 (reference §4.1)."""
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
        register_fsdp_forward_method(block, "text_kv")
    for name in TOP_LEVEL:
        fully_shard(getattr(model, name), mesh=mesh, mp_policy=policy)
    return model
