"""`longlive train-ar RECIPE`: AR teacher-forcing training, 1..N GPUs with Balanced SP (torchrun)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from longlive_cli.app import app


@app.command("train-ar")
def train_ar(
    recipe: Annotated[str, typer.Argument(
        help="Training recipe: a YAML path or a bundled name (train_ar, train_ar_tiny).")],
    nproc_per_node: Annotated[int, typer.Option(help="Processes (GPUs) per node; >1 re-executes under torchrun.")] = 1,
    nnodes: Annotated[int, typer.Option(help="Number of nodes.")] = 1,
    node_rank: Annotated[int, typer.Option(help="This node's rank (multi-node).")] = 0,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="HOST:PORT of the rendezvous (multi-node).")] = None,
    logdir: Annotated[str, typer.Option(
        help="Checkpoints, TensorBoard logs, metrics.jsonl, loss.png.")] = "runs/train-ar",
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps (default: the recipe's).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume/--no-resume", help="Continue from the newest complete checkpoint.")] = True,
    export: Annotated[str | None, typer.Option(help="Write a generator file (.safetensors or .pt) at the end.")] = None,
    precision: Annotated[str | None, typer.Option(
        help="bf16 or nvfp4 (NVFP4 numerics for the 300 block linears).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Recipe override key=value (repeatable).")] = None,
) -> None:
    """Train the causal DiT with teacher forcing (flow matching, error recycling, EMA, checkpoints)."""
    from core.errors import UserError
    from longlive_cli.progress import step_progress
    from sp.launcher import LaunchOptions, launch, under_torchrun

    for name, value in (("--nproc-per-node", nproc_per_node), ("--nnodes", nnodes), ("--max-steps", max_steps)):
        if value is not None and value < 1:
            raise UserError(f"{name} {value}: use 1 or more")
    overrides = list(set_ or []) + ([f"train.precision={precision}"] if precision else [])
    options = LaunchOptions(recipe=recipe, overrides=overrides, logdir=Path(logdir), nproc_per_node=nproc_per_node,
                            nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, max_steps=max_steps,
                            resume=resume, export=Path(export) if export else None)
    console = Console(stderr=True)
    is_main = not under_torchrun() or os.environ.get("RANK", "0") == "0"
    progress = step_progress(console) if is_main else None
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

    with progress if progress is not None else contextlib.nullcontext():
        result = launch(options, on_step)
    if isinstance(result, int):
        if result != 0:
            raise typer.Exit(result)
        return
    if is_main and result.history:
        first, last = result.history[0], result.history[-1]
        Console().print(f"trained steps {first.step}-{last.step}: loss {first.loss:.4f} -> {last.loss:.4f}, "
                        f"{last.tokens_per_second:.0f} tokens/s; logs in {logdir}"
                        + (f"; exported {result.export}" if result.export else ""), highlight=False)
