"""Where a built `CausalWanDiT` is split over a sequence-parallel group, and its SP training step.

The model stays single-device code: the plan only replaces its `sequence_attention` attribute on
the instance with Ulysses attention over the group. Every other stage (patch embedding, timestep
embedding, cross-attention, FFN, head, loss) works on the rank's own frames.

Gradients and the loss. Each rank's loss is `sum over its masked frames / global valid count`
(the mask summed over the SP group), so the losses of an SP group sum to the single-process loss
and the exact gradient is the SUM of the group's gradients (`all_reduce_gradients`). A reducer that AVERAGES
over the SP ranks too (FSDP/DDP over the whole world) gives 1/sp of it: scale the local loss by
`sp_size` there if the exact value matters (Adam is nearly invariant to it, gradient clipping is
not). Every rank must run backward, including ranks whose loss is zero: the all-to-alls of the
backward pass are collective.

Legend: B batch, C latent channels, F frames, H/W latent size, L tokens, D width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from core.dit import CausalWanDiT
from core.rope import frame_positions
from sp.balanced import BalancedLayout, NaiveLayout
from sp.mesh import ParallelMesh
from sp.ulysses import flex_padded, ulysses_attention


class BalancedUlyssesAttention:
    """A `sequence_attention(q, k, v, mask)` replacement that attends over the SP group's whole
    sequence. Its global mask is derived from the mask the model builds for its local frames
    (teacher forcing -> natural mask, block-causal -> global block-causal), so a stale mask cannot be
    reused: a local mask that does not fit the layout is an error."""

    def __init__(self, group: dist.ProcessGroup | None, layout: BalancedLayout, use_flex: bool | None = None):
        self.group = group
        self.layout = layout
        self.use_flex = use_flex
        self._masks: dict = {}  # (local mask, use_flex) -> global mask, padded for flex (once, not per layer)

    def __call__(self, q_BLND: Tensor, k_BLND: Tensor, v_BLND: Tensor, mask=None) -> Tensor:
        use_flex = q_BLND.is_cuda if self.use_flex is None else self.use_flex
        key = (mask, use_flex)
        if key not in self._masks:
            self._masks[key] = flex_padded(self.layout.global_mask(mask, use_flex), use_flex)
        return ulysses_attention(q_BLND, k_BLND, v_BLND, self._masks[key], self.group, use_flex)


def _sp_group(mesh_or_group: ParallelMesh | dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    return mesh_or_group.sp_group if isinstance(mesh_or_group, ParallelMesh) else mesh_or_group


def apply_sequence_parallel(model: CausalWanDiT, mesh_or_group: ParallelMesh | dist.ProcessGroup | None,
                            layout: BalancedLayout, use_flex: bool | None = None) -> CausalWanDiT:
    """Make the model's full-sequence forwards attend over the SP group under the balanced layout
    (`None` as the group means the default group). Returns the model (changed in place)."""
    group = _sp_group(mesh_or_group)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if (size, rank) != (layout.sp_size, layout.sp_rank):
        raise ValueError(f"the layout is for rank {layout.sp_rank} of {layout.sp_size}, the group makes this "
                         f"process rank {rank} of {size}")
    if model.config.num_heads % size:
        raise ValueError(f"{model.config.num_heads} heads cannot be split over {size} sequence-parallel ranks")
    model.sequence_attention = BalancedUlyssesAttention(group, layout, use_flex)
    return model


def remove_sequence_parallel(model: CausalWanDiT) -> CausalWanDiT:
    """Back to the single-device attention (e.g. for evaluation on each rank)."""
    model.__dict__.pop("sequence_attention", None)
    return model


def balanced_teacher_forcing(model: CausalWanDiT, layout: BalancedLayout, noisy_local: Tensor, t_local: Tensor,
                             context_local: Tensor, clean_local: Tensor, frames_per_block: int | None = None,
                             clean_t_local: Tensor | None = None) -> Tensor:
    """This rank's noisy-half velocity `[B, C, F_loc, H, W]`: the model's own teacher-forcing forward
    on the rank's frames (`layout.shard`), its prompts (`layout.prompts`), at global RoPE positions."""
    attention = model.__dict__.get("sequence_attention")
    if not isinstance(attention, BalancedUlyssesAttention) or attention.layout != layout:
        raise ValueError("the model has no sequence-parallel plan for this layout (apply_sequence_parallel first)")
    frames_per_block = layout.frames_per_block if frames_per_block is None else frames_per_block
    if frames_per_block != layout.frames_per_block:
        raise ValueError(f"frames_per_block {frames_per_block} differs from the layout's {layout.frames_per_block}")
    return model(noisy_local, t_local, context_local, frames_per_block=frames_per_block, clean_x=clean_local,
                 clean_t=clean_t_local, rope_offset=layout.first_frame)


def naive_teacher_forcing(model: CausalWanDiT, layout: NaiveLayout, noisy_x: Tensor, t: Tensor, context: Tensor,
                          clean_x: Tensor, group: dist.ProcessGroup | None, prompt_chunks: int = 1,
                          use_flex: bool | None = None) -> Tensor:
    """Teacher forcing with the naive split of `[all clean | all noisy]`, built from the model's stages.

    Takes the whole sample (`[B, C, F, H, W]`, `t [B, F]`, context `[B*K, T, D]`) on every rank and
    returns the velocity of this rank's piece if it is noisy, else an empty `[B, C, 0, H, W]` that is
    still tied to the graph (a clean rank must run backward too: its attention serves the others)."""
    x = layout.shard(noisy_x if layout.is_noisy else clean_x, dim=2)
    tokens_BLD, grid = model.patchify(x)
    t_piece = layout.shard(t, dim=1)
    if not layout.is_noisy:  # clean frames run at timestep 0
        t_piece = torch.zeros_like(t_piece)
    e, e0 = model.time_embed(t_piece)
    positions = frame_positions(layout.piece_frames, layout.first_frame, device=x.device)
    rope = model.rope_table(grid, positions)
    text = model.prepare_text(layout.prompts(context, prompt_chunks))
    use_flex = x.is_cuda if use_flex is None else use_flex
    mask = flex_padded(layout.global_mask(grid[1] * grid[2]), use_flex)  # once for every layer

    def attend(q, k, v):
        return ulysses_attention(q, k, v, mask, group, use_flex)

    out_BLD = model.run_blocks(tokens_BLD, e0, text, rope, [attend] * len(model.blocks))
    # Every rank runs the head (sharded parameters are gathered collectively under FSDP); a clean
    # rank returns an empty velocity tied to the graph, since its attention serves the others.
    velocity = model.unpatchify(model.head(out_BLD, e), grid)
    if layout.is_noisy:
        return velocity
    return velocity[:, :, :0] + velocity.sum() * 0


# ----------------------------------------------------------------------------------------------
# Gradients.


@torch.no_grad()
def all_reduce_gradients(model: nn.Module, mesh_or_group: ParallelMesh | dist.ProcessGroup | None) -> None:
    """Without FSDP/DDP: sum the gradients over the SP group (exact gradient of the summed losses) and,
    given a mesh, average over its DP replicas. Missing gradients count as zeros, so every rank issues
    the same collectives."""
    sp_group = _sp_group(mesh_or_group)
    dp_size = mesh_or_group.dp_size if isinstance(mesh_or_group, ParallelMesh) else 1
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=sp_group)
        if dp_size > 1:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=mesh_or_group.dp_group)
            param.grad.div_(dp_size)
