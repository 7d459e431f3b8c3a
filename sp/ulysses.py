"""Ulysses attention: trade the sequence split for a head split around the attention kernel.

Each of the `sp` ranks of a group holds `L` tokens of every head. An all-to-all turns that into
all `sp*L` tokens (rank-major: rank 0's tokens, then rank 1's, ...) of `N/sp` heads, attention runs
over the whole sequence with a global mask, and the inverse all-to-all gives each rank its own
tokens back with every head. The all-to-all is linear, so its backward is the all-to-all with the
scatter and gather dims swapped.

Legend: B batch, L local tokens, N heads, d head size, W group size (sp).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from core.attention import masked_attention

FLEX_BLOCK = 128  # FlexAttention's block size: flex sequences are padded to a multiple of it


def all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup | None) -> Tensor:
    """Cut `x` into W pieces along `scatter_dim`, send piece j to rank j, and concatenate the pieces
    received from ranks 0..W-1 along `gather_dim`."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    assert x.shape[scatter_dim] % world == 0, (x.shape, scatter_dim, world)
    send_W = x.unflatten(scatter_dim, (world, -1)).movedim(scatter_dim, 0).contiguous()
    recv_W = torch.empty_like(send_W)
    dist.all_to_all_single(recv_W, send_W, group=group)
    return recv_W.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scatter_dim: int, gather_dim: int, group) -> Tensor:
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        scatter_dim, gather_dim = ctx.dims
        return all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def seq_to_heads(x_BLND: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """`[B, L, N, d]` (own tokens, all heads) -> `[B, W*L, N/W, d]` (all tokens, own heads)."""
    return _AllToAll.apply(x_BLND, 2, 1, group)


def heads_to_seq(x_BLND: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Inverse of `seq_to_heads`: `[B, W*L, N/W, d]` -> `[B, L, N, d]`."""
    return _AllToAll.apply(x_BLND, 1, 2, group)


def padded_mask_mod(inner_mod, real: int, b, h, q_idx, kv_idx):
    """`inner_mod` over the first `real` tokens; every later (padding) token attends only to itself."""
    both_real = (q_idx < real) & (kv_idx < real)
    # Clamp so the inner predicate only ever sees real indices.
    inner = inner_mod(b, h, torch.clamp(q_idx, max=real - 1), torch.clamp(kv_idx, max=real - 1))
    return (q_idx == kv_idx) | (both_real & inner)


@dataclass(frozen=True)
class PaddedMask:
    """`inner` over its tokens, followed by padding tokens that attend only to themselves."""

    inner: object  # any mask with `length` and `mask_mod`, no padding of its own
    length: int

    @property
    def real_length(self) -> int:
        return self.inner.length

    def mask_mod(self, b, h, q_idx, kv_idx):
        return padded_mask_mod(self.inner.mask_mod, self.inner.length, b, h, q_idx, kv_idx)


def real_length(mask) -> int:
    """Tokens a mask covers before its padding (padded masks say so with `real_length`)."""
    return mask.real_length if hasattr(mask, "real_length") else mask.length


def padded_length(length: int, use_flex: bool) -> int:
    """The attention length for `length` real tokens: a multiple of 128 for flex, else unchanged."""
    return -(-length // FLEX_BLOCK) * FLEX_BLOCK if use_flex else length


def flex_padded(mask, use_flex: bool):
    """`mask`, padded to a multiple of 128 tokens for flex unless it carries padding of its own."""
    length = mask.length
    if use_flex and real_length(mask) == length and padded_length(length, True) != length:
        return PaddedMask(mask, padded_length(length, True))
    return mask


def ulysses_attention(q_BLND: Tensor, k_BLND: Tensor, v_BLND: Tensor, global_mask, group,
                      use_flex: bool | None = None) -> Tensor:
    """Attention of the group's whole sequence (rank-major) under `global_mask`; returns this rank's
    tokens `[B, L, N, d]`. The mask's real length must be `W*L`; it may carry its own padding (padding
    tokens attend only to themselves), else with flex it is padded here to a multiple of 128 (callers
    on the per-layer path pass `flex_padded(mask, use_flex)`, built once)."""
    world = dist.get_world_size(group)
    if q_BLND.shape[2] % world:
        raise ValueError(f"{q_BLND.shape[2]} heads cannot be split over {world} sequence-parallel ranks")
    q, k, v = (seq_to_heads(x, group) for x in (q_BLND, k_BLND, v_BLND))
    length = q.shape[1]
    if use_flex is None:
        use_flex = q.is_cuda
    if real_length(global_mask) != length:
        raise ValueError(f"the global mask covers {real_length(global_mask)} tokens but the sequence-parallel "
                         f"group holds {length} ({world} ranks x {q_BLND.shape[1]}): the layout changed, "
                         f"re-apply the SP plan")
    mask = flex_padded(global_mask, use_flex)
    if mask.length != length:  # zero tokens after the real ones
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, mask.length - length)) for x in (q, k, v))
    out = masked_attention(q, k, v, mask, use_flex=use_flex)
    return heads_to_seq(out[:, :length], group)
