"""Worker side of tests/test_sp.py: picklable entry points for `torch.multiprocessing.spawn`, and the
shared inputs and single-process references the workers' results are compared with.

Each worker joins a gloo group, runs every scenario for its world size, and saves its results to
`<out_dir>/rank<r>.pt`; the test process compares them with the single-process values.

Legend: B batch, C latent channels, F frames, H/W latent size, K prompt chunks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sp.balanced import BalancedLayout, NaiveLayout, NaturalTeacherForcingMask
from sp.mesh import ParallelMesh
from sp.plan import (
    all_reduce_gradients,
    apply_sequence_parallel,
    balanced_teacher_forcing,
    naive_teacher_forcing,
    remove_sequence_parallel,
)
from sp.ulysses import PaddedMask, ulysses_attention
from sp.vae_halo import halo_windows, scatter_raw_windows
from tests.conftest import text_context, tiny_model

CHANNELS = 48  # tiny model latent channels


@dataclass(frozen=True)
class Case:
    """One teacher-forcing training step of the tiny model."""

    frames: int = 16
    frames_per_block: int = 2
    prompt_chunks: int = 1
    batch: int = 1
    size: int = 4  # latent height = width (2x2 patches -> size^2 / 4 tokens per frame)
    num_valid_frames: int | None = None  # frames from this index on carry no loss
    seed: int = 0


@dataclass(frozen=True)
class Inputs:
    noisy: torch.Tensor  # [B, C, F, H, W]
    clean: torch.Tensor
    t: torch.Tensor  # [B, F], constant per block
    context: torch.Tensor  # [B*K, T, text_dim], sample-major
    target: torch.Tensor
    weight: torch.Tensor  # [B, F]
    mask: torch.Tensor  # [B, F]


def make_inputs(case: Case) -> Inputs:
    g = torch.Generator().manual_seed(case.seed)
    shape = (case.batch, CHANNELS, case.frames, case.size, case.size)
    blocks = case.frames // case.frames_per_block
    t = torch.randint(0, 1000, (case.batch, blocks), generator=g).float()
    t = t.repeat_interleave(case.frames_per_block, dim=1)
    context = text_context(case.batch * case.prompt_chunks, seed=case.seed + 1, length=8)
    frames = torch.arange(case.frames)[None, :].expand(case.batch, -1)
    mask = torch.ones(case.batch, case.frames)
    if case.num_valid_frames is not None:
        mask = (frames < case.num_valid_frames).float()
    return Inputs(noisy=torch.randn(shape, generator=g), clean=torch.randn(shape, generator=g), t=t,
                  context=context, target=torch.randn(shape, generator=g),
                  weight=torch.rand(case.batch, case.frames, generator=g) + 0.5, mask=mask)


def weighted_loss(velocity, target, weight, mask, denominator):
    frame_mse = (velocity.float() - target.float()).square().mean(dim=(1, 3, 4))
    return (frame_mse * weight * mask).sum() / denominator


def group_valid_count(mask: torch.Tensor, group) -> torch.Tensor:
    """The loss denominator under SP: the mask summed over the group (reference-systems.md §4.6)."""
    count = mask.sum()
    dist.all_reduce(count, group=group)
    return count


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def single_process_step(case: Case) -> dict:
    """The reference: the model's own teacher-forcing forward and loss on one process."""
    model = tiny_model()
    x = make_inputs(case)
    velocity = model(x.noisy, x.t, x.context, frames_per_block=case.frames_per_block, clean_x=x.clean)
    loss = weighted_loss(velocity, x.target, x.weight, x.mask, x.mask.sum())
    loss.backward()
    return {"velocity": velocity.detach(), "loss": loss.detach(), "grads": gradients(model)}


# ----------------------------------------------------------------------------------------------
# Scenarios run on every rank.

BALANCED_CASES = {
    "fpb2": Case(frames=16, frames_per_block=2),
    "fpb4_batch2_prompts4_masked": Case(frames=16, frames_per_block=4, prompt_chunks=4, batch=2,
                                        num_valid_frames=11, seed=1),
}
NAIVE_CASES = {
    "fpb2_prompts2": Case(frames=16, frames_per_block=2, prompt_chunks=2, seed=2),
    "fpb4_masked": Case(frames=16, frames_per_block=4, num_valid_frames=13, seed=3),
}
PLAIN_CASE = Case(frames=16, frames_per_block=4, prompt_chunks=4, seed=4)
MESH_CASE = Case(frames=16, frames_per_block=2, prompt_chunks=2, seed=5)
VAE_LATENTS, VAE_HALO, VAE_SIZE = 4, 1, 16


def balanced_step(case: Case, group, sp_rank: int, sp_size: int, mesh=None) -> dict:
    layout = BalancedLayout(sp_size, sp_rank, case.frames, case.frames_per_block)
    model = apply_sequence_parallel(tiny_model(), mesh if mesh is not None else group, layout)
    x = make_inputs(case)
    velocity = balanced_teacher_forcing(model, layout, layout.shard(x.noisy, 2), layout.shard(x.t, 1),
                                        layout.prompts(x.context, case.prompt_chunks), layout.shard(x.clean, 2))
    mask = layout.shard(x.mask, 1)
    loss = weighted_loss(velocity, layout.shard(x.target, 2), layout.shard(x.weight, 1), mask,
                         group_valid_count(mask, group))
    loss.backward()
    all_reduce_gradients(model, mesh if mesh is not None else group)
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    return {"velocity": velocity.detach(), "loss": total, "grads": gradients(model)}


def naive_step(case: Case, group, sp_rank: int, sp_size: int) -> dict:
    layout = NaiveLayout(sp_size, sp_rank, case.frames, case.frames_per_block)
    model = tiny_model()
    x = make_inputs(case)
    velocity = naive_teacher_forcing(model, layout, x.noisy, x.t, x.context, x.clean, group, case.prompt_chunks)
    if layout.is_noisy:
        target, weight, mask = layout.shard(x.target, 2), layout.shard(x.weight, 1), layout.shard(x.mask, 1)
    else:  # no loss-bearing frames on this rank
        target, weight, mask = velocity.detach(), x.weight[:, :0], x.mask[:, :0]
    loss = weighted_loss(velocity, target, weight, mask, group_valid_count(mask, group))
    loss.backward()
    all_reduce_gradients(model, group)
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    return {"velocity": velocity.detach(), "loss": total, "grads": gradients(model), "noisy": layout.is_noisy}


@torch.no_grad()
def plain_forward(case: Case, group, sp_rank: int, sp_size: int) -> dict:
    """The block-causal (non teacher-forcing) forward under the plan, then with the plan removed."""
    layout = BalancedLayout(sp_size, sp_rank, case.frames, case.frames_per_block)
    model = apply_sequence_parallel(tiny_model(), group, layout)
    x = make_inputs(case)
    local = dict(frames_per_block=case.frames_per_block, rope_offset=layout.first_frame)
    velocity = model(layout.shard(x.noisy, 2), layout.shard(x.t, 1), layout.prompts(x.context, case.prompt_chunks),
                     **local)
    remove_sequence_parallel(model)
    unplanned = model(layout.shard(x.noisy, 2), layout.shard(x.t, 1),
                      layout.prompts(x.context, case.prompt_chunks), **local)
    return {"velocity": velocity, "unplanned": unplanned}


def padded_attention(group, sp_rank: int, sp_size: int) -> dict:
    """Ulysses attention with masks carrying padding tokens (as flex needs) vs. without, dense path."""
    local_frames, tokens, fpb = 2, 3, 2
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, sp_size, 2 * local_frames * tokens, 4, 8, generator=g)[:, sp_rank] for _ in range(3))
    real = NaturalTeacherForcingMask(sp_size, local_frames, tokens, fpb, 2 * sp_size * local_frames * tokens)
    padded = NaturalTeacherForcingMask(sp_size, local_frames, tokens, fpb, real.length + 37)
    generic = PaddedMask(real, real.length + 5)
    return {name: ulysses_attention(q, k, v, mask, group, use_flex=False)
            for name, mask in (("real", real), ("padded", padded), ("generic", generic))}


def vae_video(seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = 1 + 4 * (VAE_LATENTS - 1)
    return torch.rand(1, 3, raw, VAE_SIZE, VAE_SIZE, generator=g) * 2 - 1


def vae_windows(group, sp_rank: int, sp_size: int) -> torch.Tensor:
    """The raw window this rank receives from the SP root (encoding it is tested in one process)."""
    video = vae_video()
    windows = halo_windows(VAE_LATENTS, video.shape[2], sp_size, halo=VAE_HALO)
    return scatter_raw_windows(video if sp_rank == 0 else None, windows, group)


def mesh_scenario(world: int) -> dict:
    """sp = 2 inside a world of 4: group membership, and a step whose gradient is the average of the
    two DP replicas' single-process gradients."""
    mesh = ParallelMesh.build(sp=2)
    result = {"sp_rank": mesh.sp_rank, "dp_rank": mesh.dp_rank, "sp_size": mesh.sp_size, "dp_size": mesh.dp_size,
              "sp_ranks": dist.get_process_group_ranks(mesh.sp_group), "sp_root": mesh.sp_root,
              "dp_ranks": dist.get_process_group_ranks(mesh.dp_group)}
    case = Case(**{**MESH_CASE.__dict__, "seed": MESH_CASE.seed + mesh.dp_rank})
    result["step"] = balanced_step(case, mesh.sp_group, mesh.sp_rank, mesh.sp_size, mesh=mesh)
    return result


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {
            "balanced": {name: balanced_step(case, None, rank, world) for name, case in BALANCED_CASES.items()},
            "naive": {name: naive_step(case, None, rank, world) for name, case in NAIVE_CASES.items()},
            "plain": plain_forward(PLAIN_CASE, None, rank, world),
            "vae_window": vae_windows(None, rank, world),
            "padded": padded_attention(None, rank, world),
        }
        if world == 4:
            results["mesh"] = mesh_scenario(world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
