"""`longlive train-ar RECIPE`: AR teacher-forcing training, 1..N GPUs with Balanced SP (torchrun).

The assembly: load and check the recipe (and the run: data, log dir, resume) -> re-execute under
torchrun when more than one process is asked for -> in each process: device, process group, plan
-> the model from the builder, parallelized -> `core.train.ar.Trainer`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console

from core.config import Precision, overlay
from core.errors import UserError
from longlive_cli.app import app, interrupted
from longlive_cli.options import NnodesOpt, NodeRankOpt, NprocOpt, RdzvOpt
from sp.launcher import Launch, is_main_process, local_device, process_group, relaunch, under_torchrun, world_size


@dataclass(frozen=True)
class TrainJob:
    """One `train-ar` invocation, as typed values."""

    recipe: str
    sets: tuple[str, ...]
    precision: Precision | None
    logdir: Path
    launch: Launch
    max_steps: int | None = None
    resume: bool = True
    export: Path | None = None

    def command(self) -> list[str]:
        """The same job as CLI arguments, for the torchrun re-execution."""
        args = ["train-ar", self.recipe, "--logdir", str(self.logdir), "--resume" if self.resume else "--no-resume"]
        if self.precision is not None:
            args += ["--precision", str(self.precision)]
        if self.max_steps is not None:
            args += ["--max-steps", str(self.max_steps)]
        if self.export is not None:
            args += ["--export", str(self.export)]
        for item in self.sets:
            args += ["--set", item]
        return args


def load_job_recipe(job: TrainJob, world: int):
    """The validated recipe (typed flags applied) and the SP checks, before any work."""
    from core.train.config import load_train_recipe
    from sp.mesh import check_sp_config

    try:
        recipe = load_train_recipe(job.recipe, job.sets)
        if job.precision is not None:
            recipe = overlay(recipe, {"quant": {"precision": job.precision}})
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    if recipe.quant.precision == Precision.fp8:
        raise UserError("--precision fp8 is an inference format (FP8Linear has no backward): train with bf16 or "
                        "nvfp4, then generate with --precision fp8")
    d, loop = recipe.data, recipe.train
    check_sp_config(world, recipe.parallel.sp, d.latent_frames, loop.frames_per_block,
                    recipe.model.num_heads, prompt_chunks=d.latent_frames // loop.frames_per_block)
    if recipe.runtime.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"runtime.device={recipe.runtime.device} but no CUDA GPU is visible: "
                        f"set runtime.device=cpu (tiny recipes) or run on a GPU host")
    return recipe


def run_train_ar(job: TrainJob, on_step=None):
    """Check, then train here (one process, or this is a torchrun worker) or re-execute under
    torchrun. Returns the `TrainResult` (rank 0 / one process), or torchrun's exit code."""
    from core.checkpoint import check_writable
    from core.train.checks import check_run

    world = world_size(job.launch)
    recipe = load_job_recipe(job, world)
    if is_main_process():
        check_run(recipe, job.logdir, job.resume, world)
        if job.export is not None:
            check_writable(job.export, "--export", create_folders=True)
    if not under_torchrun() and job.launch.world_size > 1:
        return relaunch(Launch(**{**job.launch.__dict__, "max_restarts": recipe.parallel.max_restarts}),
                        job.command())
    device = local_device(recipe.runtime.device)
    if not under_torchrun():
        from core.train.ar import TrainPlan

        return _train(recipe, job, TrainPlan(device), on_step)
    with process_group(device):
        import torch.distributed as dist

        from sp.mesh import ParallelMesh
        from sp.train_plan import SequenceParallelPlan

        plan = SequenceParallelPlan(recipe, device, ParallelMesh.build(recipe.parallel.sp, device.type))
        return _train(recipe, job, plan, on_step if dist.get_rank() == 0 else None)


def _train(recipe, job: TrainJob, plan, on_step):
    from core.train.ar import RunOptions, Trainer
    from longlive_cli.build import DiTSpec, build_dit, check_dit_spec
    from longlive_cli.parallelize import parallelize

    # fp32 master weights: FSDP computes in bf16 (MixedPrecisionPolicy), one GPU via autocast.
    spec = DiTSpec(recipe.model, plan.device, torch.float32,
                   checkpoint=Path(recipe.train.init) if recipe.train.init else None, seed=recipe.runtime.seed)
    check_dit_spec(spec)

    def build_model():
        return parallelize(build_dit(spec).model, recipe, plan)

    options = RunOptions(job.logdir, job.max_steps, job.resume, job.export)
    return Trainer(recipe, options, plan, build_model, on_step).run()


@contextlib.contextmanager
def _refused_log_writes(logdir: Path):
    """A log written along the way (metrics, TensorBoard) that the disk refused mid-run: one line
    naming the file, as for the checkpoints and outputs (which report their own)."""
    from core.errors import SPACE_ERRNOS, write_failed

    try:
        yield
    except OSError as err:
        if err.errno not in SPACE_ERRNOS:
            raise
        raise write_failed(err.filename or logdir, err) from None


@app.command("train-ar")
def train_ar(
    recipe: Annotated[str, typer.Argument(
        help="Training recipe: a YAML path or a bundled name (train_ar, train_ar_tiny).")],
    nproc_per_node: NprocOpt = 1, nnodes: NnodesOpt = 1, node_rank: NodeRankOpt = 0, rdzv_endpoint: RdzvOpt = None,
    logdir: Annotated[str, typer.Option(
        help="Checkpoints, TensorBoard logs, metrics.jsonl, loss.png.")] = "runs/train-ar",
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps (default: the recipe's).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume/--no-resume", help="Continue from the newest complete checkpoint.")] = True,
    export: Annotated[str | None, typer.Option(help="Write a generator file (.safetensors or .pt) at the end.")] = None,
    precision: Annotated[Precision | None, typer.Option(
        help="NVFP4 numerics for the 300 block linears (the official AR rules), or bf16.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Recipe override key=value (repeatable).")] = None,
) -> None:
    """Train the causal DiT with teacher forcing (flow matching, error recycling, EMA, checkpoints)."""
    from longlive_cli.progress import step_progress

    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps {max_steps}: use 1 or more")
    job = TrainJob(recipe=recipe, sets=tuple(set_ or ()), precision=precision, logdir=Path(logdir),
                   launch=Launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint), max_steps=max_steps, resume=resume,
                   export=Path(export) if export else None)
    console = Console(stderr=True)
    progress = step_progress(console) if is_main_process() else None
    task = None

    def on_step(stats, total: int) -> None:
        nonlocal task
        if progress is None:
            return
        if task is None:
            task = progress.add_task("train-ar", total=total, completed=stats.step - 1, loss=stats.loss,
                                     grad_norm=stats.grad_norm, step_time=stats.seconds)
        progress.update(task, completed=stats.step, loss=stats.loss, grad_norm=stats.grad_norm,
                        step_time=stats.seconds)

    kept = f"the checkpoints written so far are kept in {job.logdir}: run the same command to resume"
    with interrupted(kept), _refused_log_writes(job.logdir), \
            progress if progress is not None else contextlib.nullcontext():
        result = run_train_ar(job, on_step)
    if isinstance(result, int):
        if result != 0:
            raise typer.Exit(result)
        return
    if is_main_process() and result.history:
        first, last = result.history[0], result.history[-1]
        Console().print(f"trained steps {first.step}-{last.step}: loss {first.loss:.4f} -> {last.loss:.4f}, "
                        f"{last.tokens_per_second:.0f} tokens/s; logs in {logdir}"
                        + (f"; exported {result.export}" if result.export else ""), highlight=False)
