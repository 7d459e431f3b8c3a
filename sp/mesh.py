"""Process groups of sequence-parallel training, and the start-up checks of an SP configuration.

`world = dp x sp` ranks laid out as a `(dp, sp)` grid: an SP group is a row of consecutive ranks
(`[g*sp, ..., g*sp + sp - 1]`, all Ulysses all-to-alls run inside it) and a DP group is a column
of strided ranks (`[k, sp + k, 2*sp + k, ...]`, the replicas of the same sequence shard).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from core.errors import UserError


def check_world_size(world_size: int, sp: int) -> None:
    """Raise `UserError` unless `world_size` ranks split into whole SP groups of `sp`."""
    if sp < 1:
        raise UserError(f"sequence-parallel size {sp} must be >= 1 (use 1 to turn SP off)")
    if world_size % sp:
        raise UserError(f"world size {world_size} is not divisible by the sequence-parallel size {sp} "
                        f"(launch a multiple of {sp} processes, or change the SP size)")


def check_sp_config(world_size: int, sp: int, latent_frames: int, frames_per_block: int, num_heads: int,
                    prompt_chunks: int = 1) -> None:
    """Raise `UserError` (one line: the value and the fix) for an SP setup that cannot run.

    A pure function, callable before any process group exists (the launcher runs it first)."""
    check_world_size(world_size, sp)
    if num_heads % sp:
        raise UserError(f"the model's {num_heads} attention heads are not divisible by the sequence-parallel "
                        f"size {sp} (Ulysses splits heads over ranks: use an SP size dividing {num_heads})")
    if frames_per_block < 1 or latent_frames < 1:
        raise UserError(f"latent frames ({latent_frames}) and frames per block ({frames_per_block}) must be >= 1")
    if latent_frames % (sp * frames_per_block):
        raise UserError(f"{latent_frames} latent frames are not divisible by SP size x frames per block = "
                        f"{sp} x {frames_per_block} (each rank needs whole blocks: use a multiple of "
                        f"{sp * frames_per_block} latent frames)")
    if prompt_chunks < 1 or (prompt_chunks != 1 and prompt_chunks % sp):
        raise UserError(f"{prompt_chunks} prompt chunks per sample must be 1 or divisible by the "
                        f"sequence-parallel size {sp} (each rank takes its own chunks' prompts)")
    if prompt_chunks > 1 and latent_frames % prompt_chunks:
        raise UserError(f"{latent_frames} latent frames cannot be cut into {prompt_chunks} equal prompt chunks "
                        f"(use a number of prompt chunks dividing {latent_frames})")


@dataclass(frozen=True)
class ParallelMesh:
    """The `(dp, sp)` device mesh of this process and its groups."""

    device_mesh: DeviceMesh

    @classmethod
    def build(cls, sp: int, device_type: str = "cpu") -> ParallelMesh:
        """Split the initialised default group into `world // sp` SP groups (collective call)."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelMesh.build needs an initialised default process group "
                               "(torch.distributed.init_process_group)")
        world = dist.get_world_size()
        check_world_size(world, sp)
        mesh = init_device_mesh(device_type, (world // sp, sp), mesh_dim_names=("dp", "sp"))
        return cls(mesh)

    @property
    def sp_group(self) -> dist.ProcessGroup:
        return self.device_mesh.get_group("sp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.device_mesh.get_group("dp")

    @property
    def sp_rank(self) -> int:
        return self.device_mesh.get_local_rank("sp")

    @property
    def sp_size(self) -> int:
        return self.device_mesh.size(1)

    @property
    def dp_rank(self) -> int:
        return self.device_mesh.get_local_rank("dp")

    @property
    def dp_size(self) -> int:
        return self.device_mesh.size(0)

    @property
    def sp_root(self) -> int:
        """Global rank of the first rank of this SP group (the one whose data the group uses)."""
        return dist.get_global_rank(self.sp_group, 0)


# ----------------------------------------------------------------------------------------------
# Inference: (dp, cfg, sp).


def check_inference_layout(world_size: int, sp: int, cfg: int, num_heads: int, frames_per_block: int) -> None:
    """Raise `UserError` (one line: the value and the fix) for an inference layout that cannot run:
    `world = dp x cfg x sp` ranks, sp dividing the heads and the frames of a chunk."""
    if sp < 1:
        raise UserError(f"--sp {sp}: the sequence-parallel size must be >= 1 (1 turns SP off)")
    if world_size % (sp * cfg):
        what = f"--sp {sp} x 2 guidance branches = {sp * cfg}" if cfg > 1 else f"--sp {sp}"
        raise UserError(f"{world_size} processes are not divisible by {what} (launch a multiple of {sp * cfg} "
                        f"processes, or change --sp)")
    if num_heads % sp:
        raise UserError(f"--sp {sp}: the model's {num_heads} attention heads are not divisible by it (Ulysses "
                        f"splits heads over ranks: use an SP size dividing {num_heads})")
    if frames_per_block % sp:
        raise UserError(f"--sp {sp}: the {frames_per_block} latent frames of a chunk are not divisible by it "
                        f"(each rank computes whole frames: use an SP size dividing {frames_per_block})")


def _new_groups(rank_lists: list[list[int]], rank: int) -> dist.ProcessGroup:
    """Create every group of a partition (a collective call: every rank creates all of them, in the
    same order) and return the one holding `rank`."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    assert mine is not None, (rank, rank_lists)
    return mine


@dataclass(frozen=True)
class InferenceMesh:
    """The `(dp, cfg, sp)` grid of an inference run: global rank `(replica * cfg + branch) * sp + s`.

    A replica (`cfg x sp` consecutive ranks) makes one video; inside it an SP group (`sp`
    consecutive ranks) runs the Ulysses all-to-alls of one guidance branch, and a CFG group (the
    ranks with the same SP position in the two branch groups) exchanges the two flows."""

    sp: int
    cfg: int
    rank: int
    world: int
    sp_group: dist.ProcessGroup
    cfg_group: dist.ProcessGroup | None  # None without CFG-parallel
    replica_group: dist.ProcessGroup

    @classmethod
    def build(cls, sp: int, cfg: int = 1) -> InferenceMesh:
        """The groups of this process (collective: every rank of the default group calls it)."""
        if not dist.is_initialized():
            raise RuntimeError("InferenceMesh.build needs an initialised default process group")
        world, rank = dist.get_world_size(), dist.get_rank()
        if cfg not in (1, 2) or sp < 1 or world % (sp * cfg):
            raise ValueError(f"world {world} cannot be laid out as dp x cfg {cfg} x sp {sp}")
        replica_size = sp * cfg
        replicas = [list(range(g * replica_size, (g + 1) * replica_size)) for g in range(world // replica_size)]
        sp_groups = [list(range(g * sp, (g + 1) * sp)) for g in range(world // sp)]
        cfg_groups = [[base + s, base + sp + s] for base in range(0, world, replica_size) for s in range(sp)]
        return cls(sp, cfg, rank, world, sp_group=_new_groups(sp_groups, rank),
                   cfg_group=_new_groups(cfg_groups, rank) if cfg == 2 else None,
                   replica_group=_new_groups(replicas, rank))

    @property
    def replica_size(self) -> int:
        return self.sp * self.cfg

    @property
    def replicas(self) -> int:
        """Videos made at once (the data-parallel size)."""
        return self.world // self.replica_size

    @property
    def replica(self) -> int:
        return self.rank // self.replica_size

    @property
    def replica_root(self) -> int:
        """Global rank of the replica's first rank: it encodes the text, writes the video."""
        return self.replica * self.replica_size

    @property
    def is_replica_root(self) -> bool:
        return self.rank == self.replica_root
