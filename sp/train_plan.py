"""The sequence-parallel training plan: how one AR step is spread over an SP group (and DP
replicas). The model it trains is parallelized from outside (`longlive_cli/parallelize.py`).

Balanced SP (reference-systems.md §4.2): rank r of an SP group holds the clean and noisy copies of
frames [r F/sp, (r+1) F/sp), encodes only its raw window (VAE halo), attends through Ulysses;
FSDP2, when on, shards parameters over the whole world (bf16 compute, fp32 reduction).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from core.config import raw_frames
from core.train.ar import TrainPlan
from core.train.config import TrainRecipe
from sp.balanced import BalancedLayout
from sp.mesh import ParallelMesh
from sp.plan import all_reduce_gradients, balanced_teacher_forcing
from sp.vae_halo import encode_rank_window, halo_windows, raw_window


class SequenceParallelPlan(TrainPlan):
    """This rank's share of a step on the `(dp, sp)` mesh."""

    def __init__(self, recipe: TrainRecipe, device: torch.device, mesh: ParallelMesh):
        super().__init__(device)
        self.mesh = mesh
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.sp_size, self.sp_rank = mesh.sp_size, mesh.sp_rank
        self.dp_rank, self.dp_size = mesh.dp_rank, mesh.dp_size
        self.uses_fsdp = recipe.parallel.fsdp
        frames = recipe.data.latent_frames
        self.layout = BalancedLayout(self.sp_size, self.sp_rank, frames, recipe.train.frames_per_block)
        windows = halo_windows(frames, raw_frames(frames), self.sp_size, recipe.parallel.vae_halo_latents)
        self.window = windows[self.sp_rank]

    def local_frames(self, num_frames: int) -> range:
        return self.layout.frame_range

    def encode(self, vae: nn.Module, video_BCTHW: Tensor) -> Tensor:
        # Every rank of the group read the same sample; each encodes only its raw window.
        return encode_rank_window(vae, raw_window(video_BCTHW, self.window), self.window)

    def local_context(self, context: Tensor, prompt_chunks: int) -> Tensor:
        return self.layout.prompts(context, prompt_chunks)

    def forward(self, model: nn.Module, noisy: Tensor, t: Tensor, context: Tensor, clean: Tensor,
                frames_per_block: int) -> Tensor:
        if self.sp_size == 1:
            return model(noisy, t, context, frames_per_block=frames_per_block, clean_x=clean)
        return balanced_teacher_forcing(model, self.layout, noisy, t, context, clean, frames_per_block)

    def sp_sum(self, x: Tensor) -> Tensor:
        x = x.detach().float().clone()
        dist.all_reduce(x, group=self.mesh.sp_group)
        return x

    def world_mean(self, x: Tensor) -> Tensor:
        x = x.detach().float().clone()
        dist.all_reduce(x)
        return x / self.world_size

    @property
    def loss_scale(self) -> float:
        # FSDP averages gradients over all sp*dp ranks; the SP shares must be summed (sp/plan.py).
        return float(self.sp_size) if self.uses_fsdp else 1.0

    def sync_gradients(self, model: nn.Module) -> None:
        if not self.uses_fsdp:
            all_reduce_gradients(model, self.mesh)

    def gather_errors(self):
        def gather(x: Tensor) -> list[Tensor]:
            out = [torch.empty_like(x) for _ in range(self.world_size)]
            dist.all_gather(out, x)
            return out

        return gather

    def barrier(self) -> None:
        dist.barrier()


class DataParallelPlan(TrainPlan):
    """Plain data parallelism over the world (DMD distillation): each rank rolls out its own
    samples; FSDP2, when on, shards the networks over all ranks and averages the gradients,
    otherwise `sync_gradients` averages them."""

    def __init__(self, device: torch.device, fsdp: bool):
        super().__init__(device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.dp_rank, self.dp_size = self.rank, self.world_size
        self.uses_fsdp = fsdp

    def world_mean(self, x: Tensor) -> Tensor:
        x = x.detach().float().clone()
        dist.all_reduce(x)
        return x / self.world_size

    def sync_gradients(self, model: nn.Module) -> None:
        if self.uses_fsdp:
            return
        for param in model.parameters():
            if param.requires_grad:
                if param.grad is None:  # every rank issues the same collectives
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad)
                param.grad.div_(self.world_size)

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_int(self, value: int) -> int:
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())
