"""Classifier-free guidance on two groups of ranks: each group holds and evaluates one branch.

Rank 0 of a CFG group (two ranks, the same SP position in the two branch groups) holds the
prompt's branch, rank 1 the negative prompt's: one KV cache each instead of two, one forward per
step each instead of two. Every step the two flows are exchanged (an all-gather of one chunk's
flow) and both ranks combine them with the same arithmetic, so both keep the same latents and the
result is the one-process result.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor


class SplitBranches:
    """The `core.pipeline.BranchPlacement` of CFG-parallel inference: branch i on CFG rank i."""

    def __init__(self, group: dist.ProcessGroup | None):
        size = dist.get_world_size(group)
        if size != 2:
            raise ValueError(f"CFG-parallel runs two guidance branches on two rank groups (got a group of {size})")
        self.group = group
        self.branch = dist.get_rank(group)

    def held(self, count: int) -> tuple[int, ...]:
        if count != 2:
            raise ValueError("CFG-parallel needs guidance (stream.guidance_scale != 1): with one branch "
                             "the second rank group would idle")
        return (self.branch,)

    def flows(self, local: Mapping[int, Tensor]) -> list[Tensor]:
        (flow,) = local.values()
        flows = [torch.empty_like(flow) for _ in range(2)]
        dist.all_gather(flows, flow.contiguous(), group=self.group)
        return flows
