"""`longlive train-ar RECIPE`: AR teacher-forcing training, 1..N GPUs with Balanced SP (torchrun).

The assembly: load and check the recipe (and the run: data, log dir, resume) -> re-execute under
torchrun when more than one process is asked for -> in each process: device, process group, plan
-> the model from the builder, parallelized -> `core.train.ar.Trainer`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console

from core.config import Precision, overlay
from core.errors import UserError
from core.train.metrics import RunEvents
from longlive_cli.app import app
from longlive_cli.options import MaxSecondsOpt, NnodesOpt, NodeRankOpt, NprocOpt, RdzvOpt
from longlive_cli.training import TrainJob, check_max_seconds, main_process_events, run_job
from sp.launcher import Launch, is_main_process, world_size


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


def run_train_ar(job: TrainJob, events: RunEvents | None = None):
    """Check, then train here (one process, or this is a torchrun worker) or re-execute under
    torchrun. Returns the `TrainResult` (rank 0 / one process), or torchrun's exit code."""
    from core.train.ar import TrainPlan
    from core.train.checks import check_run

    world = world_size(job.launch)
    recipe = load_job_recipe(job, world)

    def distributed_plan(device):
        from sp.mesh import ParallelMesh
        from sp.train_plan import SequenceParallelPlan

        return SequenceParallelPlan(recipe, device, ParallelMesh.build(recipe.parallel.sp, device.type))

    def check() -> None:
        from core.checkpoint import check_writable

        check_run(recipe, job.logdir, job.resume, world)
        for flag, path in job.outputs:  # the temp file each will use: one line now, not after the run
            check_writable(path, flag, create_folders=True)

    return run_job(job, check=check,
                   max_restarts=recipe.parallel.max_restarts, device_name=recipe.runtime.device,
                   single_plan=TrainPlan, distributed_plan=distributed_plan,
                   train=lambda plan: _train(recipe, job, plan, events if plan.is_main else None))


def _train(recipe, job: TrainJob, plan, events):
    from core.train.ar import RunOptions, Trainer
    from longlive_cli.build import DiTSpec, build_dit, check_dit_spec
    from longlive_cli.parallelize import parallelize

    # fp32 master weights: FSDP computes in bf16 (MixedPrecisionPolicy), one GPU via autocast.
    spec = DiTSpec(recipe.model, plan.device, torch.float32,
                   checkpoint=Path(recipe.train.init) if recipe.train.init else None, seed=recipe.runtime.seed)
    check_dit_spec(spec)

    def build_model():
        return parallelize(build_dit(spec).model, recipe, plan)

    options = RunOptions(job.logdir, job.max_steps, job.resume, job.output("--export"), recipe_name=job.recipe,
                         max_seconds=job.max_seconds)
    return Trainer(recipe, options, plan, build_model, events).run()


@app.command("train-ar")
def train_ar(
    recipe: Annotated[str, typer.Argument(
        help="Training recipe: a YAML path or a bundled name (train_ar, train_ar_tiny).")],
    nproc_per_node: NprocOpt = 1, nnodes: NnodesOpt = 1, node_rank: NodeRankOpt = 0, rdzv_endpoint: RdzvOpt = None,
    logdir: Annotated[str, typer.Option(
        help="Checkpoints, TensorBoard logs, metrics.jsonl, loss.png.")] = "runs/train-ar",
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps (default: the recipe's).")] = None,
    max_seconds: MaxSecondsOpt = None,
    resume: Annotated[bool, typer.Option(
        "--resume/--no-resume", help="Continue from the newest complete checkpoint.")] = True,
    export: Annotated[str | None, typer.Option(help="Write a generator file (.safetensors or .pt) at the end.")] = None,
    precision: Annotated[Precision | None, typer.Option(
        help="NVFP4 numerics for the 300 block linears (the official AR rules), or bf16.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Recipe override key=value (repeatable).")] = None,
) -> None:
    """Train the causal DiT with teacher forcing (flow matching, error recycling, EMA, checkpoints)."""
    from core.train.ar import PROGRESS_FIELDS

    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps {max_steps}: use 1 or more")
    check_max_seconds(max_seconds)
    outputs = (("--export", Path(export)),) if export else ()
    job = TrainJob("train-ar", recipe=recipe, sets=tuple(set_ or ()), precision=precision, logdir=Path(logdir),
                   launch=Launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint), max_steps=max_steps,
                   resume=resume, outputs=outputs, max_seconds=max_seconds)
    events = main_process_events("train-ar", PROGRESS_FIELDS)
    with events if events is not None else contextlib.nullcontext():
        result = run_train_ar(job, events)
    if isinstance(result, int):
        if result != 0:
            raise typer.Exit(result)
        return
    if is_main_process() and result.history:
        first, last = result.history[0], result.history[-1]
        Console().print(f"trained steps {first.step}-{last.step}: loss {first.loss:.4f} -> {last.loss:.4f}, "
                        f"{last.tokens_per_second:.0f} tokens/s; logs in {logdir}"
                        + (f"; exported {result.export}" if result.export else ""), highlight=False)
