"""Start-up checks of a training run: everything that can fail cheaply fails here, one line each
(UserError, exit 2), before any process group, model or GPU work exists."""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import UserError
from core.train.config import TrainRecipe


def check_logdir(logdir: Path) -> None:
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        probe = logdir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"log dir {logdir} is not writable ({err.strerror or err}): "
                        f"pass a writable --logdir") from None


def check_model_files(recipe: TrainRecipe) -> None:
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


def check_data(recipe: TrainRecipe) -> None:
    if recipe.data.synthetic:
        return
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


def check_resume(recipe: TrainRecipe, logdir: Path, world_size: int) -> None:
    from core.train.state import CheckpointManager

    manager = CheckpointManager(logdir, keep=recipe.train.keep_checkpoints)
    manager.check_compatible({"preset": recipe.preset, **recipe.model.__dict__})
    latest = manager.latest()
    if latest is not None:
        written_by = manager.info(latest).get("world_size")
        if written_by not in (None, world_size):
            raise UserError(f"checkpoint {latest} was written by {written_by} ranks, this run has "
                            f"{world_size}: launch {written_by} or use --no-resume")


def check_run(recipe: TrainRecipe, logdir: Path, resume: bool, world_size: int) -> None:
    """Log dir, model files, data and resume state."""
    check_logdir(logdir)
    check_model_files(recipe)
    check_data(recipe)
    if resume:
        check_resume(recipe, logdir, world_size)
