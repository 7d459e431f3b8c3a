"""Sequence-parallel streaming inference (Ulysses), applied to a built DiT from outside.

Each rank of an SP group computes `frames / sp` whole latent frames of every streamed chunk
(`FrameShard`, the model's `chunk_frames` seam): patch embedding, adaLN, cross-attention, FFN and
the head stay on those frames, and the head output is gathered once per forward. Self-attention
reaches the other frames through the KV cache: `HeadShardedStorage` trades the frame split for a
head split (one all-to-all of the stacked q, k, v: this rank's frames with every head -> every
frame with this rank's heads), hands them to an inner storage built for `heads / sp` heads (dense
`LayerKV` or NVFP4: any `core.kv_cache.StorageFactory`), and trades the output back. The cache
bookkeeping (`core.kv_cache.plan_write`) never changes: it plans the whole chunk (global frame
numbers, global RoPE positions), so the sink, shot sink, eviction, recache and window re-encode
are those of one process.

Legend: B batch, f frames of the chunk, S tokens per frame, P outputs per token, L tokens,
N heads, d head size, W group size (sp).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor

from core.dit import CausalWanDiT
from core.eager import eager_method
from core.kv_cache import LayerKV, LayerSpec, LayerStorage, StorageFactory, WritePlan
from core.pipeline import BuiltDiT
from sp.cfg import SplitBranches
from sp.ulysses import all_to_all


class FrameShard:
    """The `chunk_frames` of rank r in an SP group of W ranks: frames `[r f/W, (r+1) f/W)` of each
    chunk; the head outputs of the group concatenate, in rank order, to the whole chunk's."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def local(self, num_frames: int) -> slice:
        if num_frames % self.size:
            raise ValueError(f"a chunk of {num_frames} latent frames cannot be split over {self.size} "
                             f"sequence-parallel ranks (use an SP size dividing the frames per block)")
        count = num_frames // self.size
        return slice(self.rank * count, (self.rank + 1) * count)

    def gather(self, y_BfSP: Tensor) -> Tensor:
        if self.size == 1:
            return y_BfSP
        parts = [torch.empty_like(y_BfSP) for _ in range(self.size)]
        dist.all_gather(parts, y_BfSP.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)


class HeadShardedStorage:
    """One layer's cache under SP (the `core.kv_cache.LayerStorage` protocol): this rank's heads of
    every cached token, in `inner`. Receives this rank's frames with every head, returns them."""

    def __init__(self, inner: LayerStorage, group: dist.ProcessGroup | None):
        self.inner = inner
        self.group = group
        self.size = dist.get_world_size(group)

    @property
    def plan(self) -> WritePlan | None:
        return self.inner.plan

    @plan.setter
    def plan(self, plan: WritePlan | None) -> None:
        self.inner.plan = plan  # the whole chunk's plan: every rank writes its heads of all its tokens

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    def reset(self) -> None:  # per-stream state of the inner format (FP8 running scales)
        if hasattr(self.inner, "reset"):
            self.inner.reset()

    @eager_method
    def update_and_attend(self, q_BlND: Tensor, k_BlND: Tensor, v_BlND: Tensor) -> Tensor:
        if self.size == 1:
            return self.inner.update_and_attend(q_BlND, k_BlND, v_BlND)
        # [3, B, l, N, d] (own frames, all heads) -> [3, B, W*l, N/W, d] (all frames, own heads).
        q, k, v = all_to_all(torch.stack((q_BlND, k_BlND, v_BlND)), 3, 2, self.group).unbind(0)
        out_BLnd = self.inner.update_and_attend(q, k, v)
        return all_to_all(out_BLnd, 1, 2, self.group)


def _group_max(group: dist.ProcessGroup | None):
    def all_heads_max(x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
        return x

    return all_heads_max


def head_sharded_storage(inner: StorageFactory | None, group: dist.ProcessGroup | None) -> StorageFactory:
    """A storage factory whose layers hold `heads / sp` heads in `inner`'s format (None: dense)."""
    size = dist.get_world_size(group)
    make_inner = inner if inner is not None else LayerKV
    all_heads_max = _group_max(group) if size > 1 else None

    def make(spec: LayerSpec, device) -> HeadShardedStorage:
        if spec.heads % size:
            raise ValueError(f"{spec.heads} heads cannot be split over {size} sequence-parallel ranks")
        shard = replace(spec, heads=spec.heads // size, all_heads_max=all_heads_max)
        return HeadShardedStorage(make_inner(shard, device), group)

    return make


def apply_inference_sp(built: BuiltDiT, sp_group: dist.ProcessGroup | None,
                       cfg_group: dist.ProcessGroup | None = None) -> BuiltDiT:
    """The SP plan of streaming inference: `built.model` computes this rank's frames of each chunk
    (changed in place), its caches hold this rank's heads (the returned storage wraps
    `built.kv_storage`), and with `cfg_group` (two ranks, one per guidance branch) each rank
    evaluates one guidance branch."""
    model: CausalWanDiT = built.model
    size = dist.get_world_size(sp_group)
    if model.config.num_heads % size:
        raise ValueError(f"{model.config.num_heads} heads cannot be split over {size} sequence-parallel ranks")
    model.chunk_frames = FrameShard(sp_group)
    branches = SplitBranches(cfg_group) if cfg_group is not None else built.branches
    return replace(built, kv_storage=head_sharded_storage(built.kv_storage, sp_group), branches=branches)


def remove_inference_sp(model: CausalWanDiT) -> CausalWanDiT:
    """Back to computing every frame of a chunk (caches must be rebuilt with the plain storage)."""
    model.__dict__.pop("chunk_frames", None)
    return model
