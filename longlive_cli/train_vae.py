"""`longlive train-vae RECIPE`: train a small Wan2.2-structure VAE on the shapes world (one process)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from longlive_cli.app import app


@app.command("train-vae")
def train_vae(
    recipe: Annotated[str, typer.Argument(help="Training recipe: a YAML path or a bundled name (train_vae_shapes).")],
    logdir: Annotated[str, typer.Option(
        help="Checkpoints, metrics.jsonl, loss.png, eval_psnr.png.")] = "runs/train-vae",
    max_steps: Annotated[int | None, typer.Option(
        help="Stop after this many steps (the LR schedule still follows the recipe's train.max_steps).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume/--no-resume", help="Continue from the newest complete checkpoint.")] = True,
    export: Annotated[str | None, typer.Option(help="Write the VAE (.safetensors) at the end.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Recipe override key=value (repeatable).")] = None,
) -> None:
    """Train the VAE as an autoencoder on rendered shapes-world clips; report the held-out PSNR."""
    from core.errors import UserError
    from core.train.autoencoder import VAERunOptions, VAETrainer, load_vae_recipe
    from longlive_cli.progress import step_progress

    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps {max_steps}: use 1 or more")
    try:
        loaded = load_vae_recipe(recipe, list(set_ or []))
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    options = VAERunOptions(logdir=Path(logdir), max_steps=max_steps, resume=resume,
                            export=Path(export) if export else None)
    progress = step_progress(Console(stderr=True))
    task = None

    def on_step(stats, total: int) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task("train-vae", total=total, completed=stats.step - 1, loss=stats.loss,
                                     grad_norm=stats.grad_norm, step_time=stats.seconds)
        progress.update(task, completed=stats.step, loss=stats.loss, grad_norm=stats.grad_norm,
                        step_time=stats.seconds)

    with progress:
        result = VAETrainer(loaded, options, on_step).run()
    summary = f"trained steps {result.final_step - result.steps_run + 1}-{result.final_step}"
    if result.history:
        summary += f": loss {result.history[0].loss:.5f} -> {result.history[-1].loss:.5f}"
    if result.evals:
        summary += f", held-out PSNR {result.evals[-1]['eval_psnr']:.2f} dB"
    if result.export is not None:
        summary += f"; exported {result.export} (held-out PSNR {result.export_psnr:.2f} dB)"
    Console().print(summary + f"; logs in {logdir}", highlight=False)
