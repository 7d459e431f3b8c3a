"""`longlive distill RECIPE`: DMD few-step distillation into a standalone LoRA, 1..N GPUs (torchrun).

The assembly (shared with `train-ar`, `longlive_cli/training.py`): load and check the recipe and the
run (log dir, weight files, prompts, resume state) -> re-execute under torchrun when more than one
process is asked for -> in each process: device, process group, plan -> the three networks from the
builder, each prepared by `parallelize_network` -> `core.train.distill.DistillTrainer` -> the LoRA
export (`--export-lora`) and the merged generator (`--merge-into`) on rank 0.
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


def load_distill_job_recipe(job: TrainJob):
    """The validated recipe with the typed flags applied (one-line UserError)."""
    from core.train.distill_config import load_distill_recipe

    try:
        recipe = load_distill_recipe(job.recipe, job.sets)
        if job.precision is not None:
            recipe = overlay(recipe, {"quant": {"precision": job.precision}})
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    if recipe.runtime.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"runtime.device={recipe.runtime.device} but no CUDA GPU is visible: "
                        f"set runtime.device=cpu (tiny recipes) or run on a GPU host")
    return recipe


def network_specs(recipe, device: torch.device) -> dict:
    """The `DiTSpec` of each network: frozen weights in the compute dtype, a critic trained in
    full in fp32 (master weights); all bf16 builds (the NVFP4 swaps are `parallelize_network`'s)."""
    from core.runtime import resolve_dtype
    from longlive_cli.build import DiTSpec
    from longlive_cli.parallelize import Role

    frozen = resolve_dtype(recipe.runtime.dtype, device)
    specs = {}
    for role in Role:
        full_critic = role == Role.fake_score and not recipe.adapter.apply_to_critic
        specs[role] = DiTSpec(recipe.model, device, torch.float32 if full_critic else frozen,
                              checkpoint=recipe.checkpoints.path(role.value), seed=recipe.runtime.seed)
    return specs


def check_networks(recipe, device: torch.device) -> None:
    """Each network's weight file: exists, and its names and shapes are the preset's (one line
    naming the recipe key), read from headers, before any model is built."""
    from longlive_cli.build import check_dit_spec

    for role, spec in network_specs(recipe, device).items():
        try:
            check_dit_spec(spec)
        except UserError as err:  # the shared message names generate's flag; here the fix is the recipe's file
            fix = f"give a {recipe.preset} generator file (or change the recipe's preset)"
            raise UserError(f"checkpoints.{role.value}: {str(err).replace('check --preset / the file', fix)}") from None


def check_job(recipe, job: TrainJob, world: int) -> None:
    from core.checkpoint import check_writable
    from core.train.checks import check_distill_run

    check_distill_run(recipe, job.logdir, job.resume, world)
    for flag, path in job.outputs:
        check_writable(path, flag)
    check_networks(recipe, torch.device("cpu"))


def run_distill(job: TrainJob, events: RunEvents | None = None):
    """Check, then distill here (one process, or a torchrun worker) or re-execute under torchrun.
    Returns the `DistillResult` (rank 0 / one process), or torchrun's exit code."""
    from core.train.ar import TrainPlan

    world = world_size(job.launch)
    recipe = load_distill_job_recipe(job)

    def distributed_plan(device):
        from sp.train_plan import DataParallelPlan

        return DataParallelPlan(device, recipe.parallel.fsdp)

    return run_job(job, check=lambda: check_job(recipe, job, world), max_restarts=recipe.parallel.max_restarts,
                   device_name=recipe.runtime.device, single_plan=TrainPlan, distributed_plan=distributed_plan,
                   train=lambda plan: _distill(recipe, job, plan, events if plan.is_main else None))


def _distill(recipe, job: TrainJob, plan, events):
    from core.train.distill import DistillOptions, DistillTrainer, Networks
    from longlive_cli.build import build_dit
    from longlive_cli.parallelize import parallelize_network

    specs = network_specs(recipe, plan.device)

    def build_networks() -> Networks:
        # eval mode throughout, as the official (no dropout in the DiT; LoRA dropout stays off)
        built = {role.value: parallelize_network(build_dit(spec).model.eval(), role, recipe, plan)
                 for role, spec in specs.items()}
        return Networks(**built)

    options = DistillOptions(job.logdir, job.max_steps, job.resume, recipe_name=job.recipe,
                             max_seconds=job.max_seconds)
    result = DistillTrainer(recipe, options, plan, build_networks, events).run()
    if plan.is_main:
        write_outputs(recipe, job, result)
    plan.barrier()
    return result


def write_outputs(recipe, job: TrainJob, result) -> None:
    """`--export-lora`: the generator LoRA (alpha / rank folded into B, so readers assume scale 1);
    `--merge-into`: the generator's initial weights with that LoRA merged in fp32, saved in bf16."""
    from core.train.lora import save_lora_file, scaled_for_merge

    lora = scaled_for_merge(result.generator_lora, recipe.adapter.scale)
    export = job.output("--export-lora")
    if export is not None:
        save_lora_file(lora, export, step=result.final_step,
                       metadata={"source": "longlive distill", "rank": recipe.adapter.rank,
                                 "preset": recipe.preset, "sampling_steps": recipe.stream.sampling_steps,
                                 "timestep_shift": recipe.stream.timestep_shift})
    merge_into = job.output("--merge-into")
    if merge_into is not None:
        from core.checkpoint import merge_lora, save_generator
        from longlive_cli.build import DiTSpec, build_dit

        base = recipe.checkpoints.path("generator")
        spec = DiTSpec(recipe.model, torch.device("cpu"), torch.float32, checkpoint=base, seed=recipe.runtime.seed)
        merged = merge_lora(build_dit(spec).model, lora, source="the distilled LoRA")
        tensors = {name: value.detach().to(torch.bfloat16) for name, value in merged.state_dict().items()}
        save_generator(tensors, merge_into, metadata={"source": "longlive distill", "merged_lora": "True",
                                                     "step": str(result.final_step), "preset": recipe.preset})


@app.command("distill")
def distill(
    recipe: Annotated[str, typer.Argument(
        help="Distillation recipe: a YAML path or a bundled name (distill, distill_nvfp4, distill_tiny).")],
    nproc_per_node: NprocOpt = 1, nnodes: NnodesOpt = 1, node_rank: NodeRankOpt = 0, rdzv_endpoint: RdzvOpt = None,
    logdir: Annotated[str, typer.Option(
        help="Checkpoints (each with the official LoRA model.pt), TensorBoard, metrics.jsonl, loss.png.",
    )] = "runs/distill",
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps (default: the recipe's).")] = None,
    max_seconds: MaxSecondsOpt = None,
    resume: Annotated[bool, typer.Option(
        "--resume/--no-resume", help="Continue from the newest complete checkpoint.")] = True,
    export_lora: Annotated[str | None, typer.Option(
        help="Write the generator LoRA at the end (.safetensors or the official .pt), for generate --lora.")] = None,
    merge_into: Annotated[str | None, typer.Option(
        help="Write the generator with the LoRA merged (.safetensors or .pt), for generate --checkpoint.")] = None,
    precision: Annotated[Precision | None, typer.Option(
        help="nvfp4: the official NVFP4 DMD numerics (student base and teacher), or bf16.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Recipe override key=value (repeatable).")] = None,
) -> None:
    """Distill the AR generator into a few-step LoRA with DMD (teacher, critic, self-forcing rollouts)."""
    from core.train.distill import PROGRESS_FIELDS

    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps {max_steps}: use 1 or more")
    check_max_seconds(max_seconds)
    outputs = tuple((flag, Path(value)) for flag, value in (("--export-lora", export_lora),
                                                             ("--merge-into", merge_into)) if value)
    job = TrainJob("distill", recipe=recipe, sets=tuple(set_ or ()), precision=precision, logdir=Path(logdir),
                   launch=Launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint), max_steps=max_steps,
                   resume=resume, outputs=outputs, max_seconds=max_seconds)
    events = main_process_events("distill", PROGRESS_FIELDS)
    with events if events is not None else contextlib.nullcontext():
        result = run_distill(job, events)
    if isinstance(result, int):
        if result != 0:
            raise typer.Exit(result)
        return
    if is_main_process() and result.history:
        Console().print(_summary(result, logdir, outputs), highlight=False)


def _summary(result, logdir: str, outputs) -> str:
    first, last = result.history[0], result.history[-1]
    text = (f"distilled steps {first['step']}-{last['step']}: critic loss {first['critic_loss']:.4f} -> "
            f"{last['critic_loss']:.4f}")
    generator = [r["generator_loss"] for r in result.history if "generator_loss" in r]
    if generator:
        text += f", DMD loss {generator[0]:.4f} -> {generator[-1]:.4f}"
    written = "".join(f"; {flag[2:]} {path}" for flag, path in outputs)
    return text + f"; logs in {logdir}" + written
