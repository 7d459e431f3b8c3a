"""`longlive train-ar`: start-up checks, torchrun re-execution, and the training plans.

Started plainly with more than one process, the command re-executes itself under
`torch.distributed.run` (elastic; `parallel.max_restarts`); started under torchrun (or with one
process) it trains. Every cheap check (recipe, SP divisibility, data, log dir, resume
compatibility) runs first, in the parent, before any process group or GPU work exists.

The plans put the pieces together in the fixed order of design.md §2:
quantize -> SP plan -> activation checkpointing (done by the trainer) -> FSDP.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from core.config import VAE_TEMPORAL_STRIDE
from core.dit import CausalWanDiT
from core.errors import UserError
from core.runtime import resolve_device
from core.train.ar import RunOptions, Trainer, TrainPlan, TrainResult
from core.train.config import TrainRecipe, load_train_recipe
from sp.balanced import BalancedLayout
from sp.fsdp import shard_model
from sp.mesh import ParallelMesh, check_sp_config
from sp.plan import all_reduce_gradients, apply_sequence_parallel, balanced_teacher_forcing
from sp.vae_halo import encode_rank_window, halo_windows, raw_window


@dataclass
class LaunchOptions:
    recipe: str
    overrides: list[str]
    logdir: Path
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    max_steps: int | None = None
    resume: bool = True
    export: Path | None = None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


# -- checks before any GPU work -------------------------------------------------------------------


def load_checked_recipe(options: LaunchOptions, world_size: int) -> TrainRecipe:
    try:
        recipe = load_train_recipe(options.recipe, options.overrides)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    d, loop = recipe.data, recipe.train
    check_sp_config(world_size, recipe.parallel.sp, d.latent_frames, loop.frames_per_block,
                    recipe.model.num_heads, prompt_chunks=d.latent_frames // loop.frames_per_block)
    if recipe.runtime.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"runtime.device={recipe.runtime.device} but no CUDA GPU is visible: "
                        f"set runtime.device=cpu (tiny recipes) or run on a GPU host")
    return recipe


def check_run(recipe: TrainRecipe, options: LaunchOptions) -> None:
    """Data, log dir and resume state, one line each (exit 2) before anything starts."""
    logdir = options.logdir
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        probe = logdir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"log dir {logdir} is not writable ({err.strerror or err}): "
                        f"pass a writable --logdir") from None
    if recipe.preset != "tiny" and not recipe.train.init:
        raise UserError(f"train.init is empty: the {recipe.preset} preset starts from the Wan2.2 or an AR "
                        f"generator file (--set train.init=PATH)")
    needed = ([] if recipe.data.vae != "wan2.2" else ["vae"]) + \
        ([] if recipe.data.text_encoder != "umt5" else ["text_encoder_dir"])
    if needed:
        from core.hub import ModelFiles, resolve_model_dir

        try:
            files = ModelFiles(resolve_model_dir(Path(recipe.data.model_dir) if recipe.data.model_dir else None))
            files.require(*(getattr(files, name) for name in needed))
        except UserError as err:  # the shared message names generate's flag; train-ar sets the recipe key
            raise UserError(str(err).replace("pass --model-dir", "--set data.model_dir=DIR")) from None
    if not recipe.data.synthetic:
        from core.train.data import VideoClipDataset

        if not recipe.data.path:
            raise UserError("data.path is empty: give a dataset folder (video/ + caption/) or a JSONL manifest "
                            "(--set data.path=PATH), or --set data.synthetic=true")
        path = Path(recipe.data.path)
        if not path.exists():
            raise UserError(f"data.path {path} does not exist: give a dataset folder (video/ + caption/) "
                            f"or a JSONL manifest")
        VideoClipDataset(path, recipe.data.latent_frames, recipe.data.height, recipe.data.width,
                         frames_per_block=recipe.train.frames_per_block)  # raises if nothing is usable
    if options.resume:
        from core.train.state import CheckpointManager

        manager = CheckpointManager(logdir, keep=recipe.train.keep_checkpoints)
        manager.check_compatible({"preset": recipe.preset, **recipe.model.__dict__})
        latest = manager.latest()
        if latest is not None:
            written_by = manager.info(latest).get("world_size")
            if written_by not in (None, options.world_size):
                raise UserError(f"checkpoint {latest} was written by {written_by} ranks, this run has "
                                f"{options.world_size}: launch {written_by} or use --no-resume")


# -- torchrun -------------------------------------------------------------------------------------


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(options: LaunchOptions, max_restarts: int) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={options.nproc_per_node}",
           f"--nnodes={options.nnodes}", f"--max-restarts={max_restarts}"]
    if options.nnodes > 1:
        if not options.rdzv_endpoint:
            raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        cmd += [f"--node-rank={options.node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={options.rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    cmd += ["-m", "longlive_cli", "train-ar", options.recipe, "--logdir", str(options.logdir),
            "--resume" if options.resume else "--no-resume"]
    if options.max_steps is not None:
        cmd += ["--max-steps", str(options.max_steps)]
    if options.export is not None:
        cmd += ["--export", str(options.export)]
    for item in options.overrides:
        cmd += ["--set", item]
    return cmd


def launch(options: LaunchOptions, on_step=None) -> TrainResult | int:
    """Check, then train here (one process, or this is a torchrun worker) or re-execute under
    torchrun. Returns the result (rank 0 / one process), or the torchrun exit code."""
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun() else options.world_size
    recipe = load_checked_recipe(options, world)
    if not under_torchrun() or int(os.environ.get("RANK", "0")) == 0:
        check_run(recipe, options)
    if not under_torchrun() and options.world_size > 1:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return subprocess.call(torchrun_command(options, recipe.parallel.max_restarts), env=env)
    run = RunOptions(options.logdir, options.max_steps, options.resume, options.export)
    if not under_torchrun():
        device = _device(recipe, local_rank=0)
        return Trainer(recipe, run, LocalPlan(recipe, device), on_step).run()
    return _train_distributed(recipe, run, on_step)


def _device(recipe: TrainRecipe, local_rank: int) -> torch.device:
    """The recipe's device; a torchrun worker takes the GPU of its local rank."""
    device = resolve_device(recipe.runtime.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank) if under_torchrun() else device
        torch.cuda.set_device(device)
    return device


def _train_distributed(recipe: TrainRecipe, run: RunOptions, on_step) -> TrainResult:
    local_rank = int(os.environ["LOCAL_RANK"])
    device = _device(recipe, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                            device_id=device if device.type == "cuda" else None)
    try:
        mesh = ParallelMesh.build(recipe.parallel.sp, device.type)
        plan = SequenceParallelPlan(recipe, device, mesh)
        return Trainer(recipe, run, plan, on_step if dist.get_rank() == 0 else None).run()
    finally:
        dist.destroy_process_group()


# -- plans ----------------------------------------------------------------------------------------


def quantize_for_training(model: CausalWanDiT, recipe: TrainRecipe) -> CausalWanDiT:
    """`train.precision: nvfp4`: the 300 block linears run fprop, dgrad and wgrad with NVFP4
    numerics (master weights kept; official AR rules: weights static_6 with 2-D tiles,
    activations mse, gradients mse with stochastic rounding and RHT on wgrad)."""
    if recipe.train.precision != "nvfp4":
        return model
    from quant.linear import ar_training_config, quantize_model

    return quantize_model(model, ar_training_config())


class LocalPlan(TrainPlan):
    """One process (CPU or one GPU), with the recipe's precision applied."""

    def __init__(self, recipe: TrainRecipe, device: torch.device):
        super().__init__(device)
        self.recipe = recipe

    def prepare_model(self, model: CausalWanDiT) -> nn.Module:
        return quantize_for_training(model, self.recipe)


class SequenceParallelPlan(LocalPlan):
    """Balanced SP (§4.2): rank r of an SP group holds the clean and noisy copies of frames
    [r F/sp, (r+1) F/sp), encodes only its raw window (VAE halo), attends through Ulysses; FSDP2
    shards parameters over the whole world (bf16 compute, fp32 reduction)."""

    def __init__(self, recipe: TrainRecipe, device: torch.device, mesh: ParallelMesh):
        super().__init__(recipe, device)
        self.mesh = mesh
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.sp_size, self.sp_rank = mesh.sp_size, mesh.sp_rank
        self.dp_rank, self.dp_size = mesh.dp_rank, mesh.dp_size
        self.uses_fsdp = recipe.parallel.fsdp
        frames = recipe.data.latent_frames
        self.layout = BalancedLayout(self.sp_size, self.sp_rank, frames, recipe.train.frames_per_block)
        raw = 1 + VAE_TEMPORAL_STRIDE * (frames - 1)
        self.window = halo_windows(frames, raw, self.sp_size, recipe.parallel.vae_halo_latents)[self.sp_rank]

    def local_frames(self, num_frames: int) -> range:
        return self.layout.frame_range

    def prepare_model(self, model: CausalWanDiT) -> nn.Module:
        model = super().prepare_model(model)
        if self.sp_size > 1:
            apply_sequence_parallel(model, self.mesh, self.layout)
        if self.uses_fsdp:
            from torch.distributed.device_mesh import init_device_mesh

            compute = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            shard_model(model, init_device_mesh(self.device.type, (self.world_size,)), compute)
        return model

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
