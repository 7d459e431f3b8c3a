"""Start-up checks of a training run: everything that can fail cheaply fails here, one line each
(UserError, exit 2), before any process group, model or GPU work exists."""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import UserError
from core.train.config import TrainRecipe
from core.train.distill_config import DistillRecipe


def check_logdir(logdir: Path) -> None:
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        probe = logdir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"log dir {logdir} is not writable ({err.strerror or err}): "
                        f"pass a writable --logdir") from None


def check_support_files(model_dir: str, *, vae: bool, text_encoder: bool) -> None:
    """The `longlive download` files a run reads (the Wan2.2 VAE, the umt5 encoder), if any."""
    needed = (["vae"] if vae else []) + (["text_encoder_dir"] if text_encoder else [])
    if needed:
        from core.hub import ModelFiles, resolve_model_dir

        try:
            files = ModelFiles(resolve_model_dir(Path(model_dir) if model_dir else None))
            files.require(*(getattr(files, name) for name in needed))
        except UserError as err:  # the shared message names generate's flag; training sets the recipe key
            raise UserError(str(err).replace("pass --model-dir", "--set data.model_dir=DIR")) from None


def check_model_files(recipe: TrainRecipe) -> None:
    if recipe.preset != "tiny" and not recipe.train.init:
        raise UserError(f"train.init is empty: the {recipe.preset} preset starts from the Wan2.2 or an AR "
                        f"generator file (--set train.init=PATH)")
    check_support_files(recipe.data.model_dir, vae=recipe.data.vae == "wan2.2",
                        text_encoder=recipe.data.text_encoder == "umt5")


def check_video_data(data, frames_per_block: int) -> None:
    """`data.path` (a dataset folder or a JSONL manifest) holds usable videos, unless synthetic."""
    if data.synthetic:
        return
    from core.train.data import VideoClipDataset

    if not data.path:
        raise UserError("data.path is empty: give a dataset folder (video/ + caption/) or a JSONL manifest "
                        "(--set data.path=PATH), or --set data.synthetic=true")
    path = Path(data.path)
    if not path.exists():
        raise UserError(f"data.path {path} does not exist: give a dataset folder (video/ + caption/) "
                        f"or a JSONL manifest")
    VideoClipDataset(path, data.latent_frames, data.height, data.width,
                     frames_per_block=frames_per_block)  # raises if nothing is usable


def check_data(recipe: TrainRecipe) -> None:
    if not recipe.data.synthetic_stream:  # rendered on the device: no path to read
        check_video_data(recipe.data, recipe.train.frames_per_block)


def check_resume(recipe: TrainRecipe, logdir: Path, world_size: int) -> None:
    check_resume_state(logdir, {"preset": recipe.preset, **recipe.model.__dict__}, world_size)


def check_resume_state(logdir: Path, model_config: dict, world_size: int) -> None:
    """The newest complete checkpoint, if any, was written for this model and this many ranks."""
    from core.train.state import CheckpointManager

    manager = CheckpointManager(logdir)
    manager.check_compatible(model_config)
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


def check_distill_run(recipe: DistillRecipe, logdir: Path, resume: bool, world_size: int) -> None:
    """Log dir, initial weights, support files, prompts (or videos for I2V) and resume state of a
    distillation run (the weight files themselves are checked by the builder's spec check)."""
    check_logdir(logdir)
    c = recipe.checkpoints
    missing = [role for role in ("generator", "real_score", "fake_score") if c.path(role) is None]
    if missing and recipe.preset != "tiny" and not c.random_init:
        raise UserError(f"checkpoints.base is empty and {', '.join(missing)} has no file: the {recipe.preset} preset "
                        f"starts from the Wan2.2-TI2V-5B or an AR generator (--set checkpoints.base=PATH), or "
                        f"--set checkpoints.random_init=true for a throughput run")
    d = recipe.data
    check_support_files(d.model_dir, vae=d.i2v and d.vae == "wan2.2", text_encoder=d.text_encoder == "umt5")
    if d.i2v:
        check_video_data(d, recipe.stream.frames_per_block)
    elif not d.synthetic:
        from core.train.prompts import PromptDataset

        if not d.path:
            raise UserError("data.path is empty: give a .txt of prompts or a caption folder (--set data.path=PATH), "
                            "or --set data.synthetic=true")
        PromptDataset(d.path, recipe.num_chunks, chunks_per_shot=d.chunks_per_shot,
                      scene_cut_prefix=d.scene_cut_prefix)  # raises if nothing is usable
    if resume:
        check_resume_state(logdir, recipe.model_config(), world_size)
