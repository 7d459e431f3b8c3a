"""Shared option handling: recipe + typed flags -> a validated Recipe, errors as UserError."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated

import torch
import typer

from core.config import KVPrecision, Precision, QuantMode, Recipe, load_recipe, overlay
from core.errors import UserError

# Flags by recipe section: {"video": {"height": 480, "width": None}, ...}; None = not given.
Flags = Mapping[str, Mapping[str, object]]


def resolve_recipe(preset: str | None, recipe: str | None, sets: Sequence[str], flags: Flags,
                   lora: str | os.PathLike | None = None) -> Recipe:
    """Preset < a distilled `lora`'s own sampling < recipe file < --set < explicit flags. Flags are
    applied to the typed recipe as they are (validated once by the configs), never turned back
    into text."""
    given = {section: {key: value for key, value in values.items() if value is not None}
             for section, values in flags.items()}
    try:
        result = load_recipe(recipe, sets, preset=preset)
        _check_flags_agree_with_sets(result, sets, given)
        result = overlay(result, {section: values for section, values in given.items() if values})
        result = _lora_sampling(result, lora, recipe, sets, given)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    check_device(result.runtime.device)
    return result


def _lora_sampling(result: Recipe, lora: str | os.PathLike | None, recipe: str | None, sets: Sequence[str],
                   given: Flags) -> Recipe:
    """A LoRA from `distill --export-lora` samples as it was distilled (its recorded steps and
    timestep shift, no guidance) where no flag, --set or recipe file sets that value: the preset's
    sampling is for the model without it (the shapes preset's 16 steps with guidance 3 are its AR
    model's). Official LoRA files record nothing; an unreadable one is left to the model checks."""
    from core.checkpoint import read_lora_sampling
    from core.config import read_recipe_data

    if lora is None or not Path(lora).is_file():
        return result
    try:
        recorded = read_lora_sampling(lora)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError):
        return result  # unreadable: the LoRA checks before any model say so in one line
    if "sampling_steps" not in recorded:
        return result
    written = read_recipe_data(recipe, sets)[0].get("stream") or {}  # the file and the --set values
    named = {f"stream.{key}" for key in written} | {
        f"{section}.{key}" for section, values in given.items() for key in values}
    updates = {key: value for key, value in {**recorded, "guidance_scale": 1.0}.items()
               if f"stream.{key}" not in named}
    return overlay(result, {"stream": updates}) if updates else result


def _check_flags_agree_with_sets(loaded: Recipe, sets: Sequence[str], given: Flags) -> None:
    """A flag and a --set that name the same value must agree (the flag would win silently, e.g.
    `--steps 4 --set stream.sampling_steps=32` sampling 4 steps)."""
    named = {item.split("=", 1)[0].strip() for item in sets}
    for section, values in given.items():
        for key, value in values.items():
            if f"{section}.{key}" in named:
                from_set = getattr(getattr(loaded, section), key)
                if from_set != value:
                    raise ValueError(f"--set {section}.{key}={from_set} disagrees with the option that sets it to "
                                     f"{value} (e.g. --steps, --seconds, --device): give one of them")


def resolve_generation_recipe(preset: str | None, recipe: str | None, sets: Sequence[str], flags: Flags, *,
                              random_weights: bool = False, checkpoint: str | None = None,
                              lora: str | None = None) -> Recipe:
    """`resolve_recipe` for generation, where `tiny` means the trained shapes-world models when
    they are shipped (`core/assets/shapes`): the README's first command shows a model that obeys.
    Random tiny weights stay: `random_weights` (tests, or no shipped files), a `--checkpoint` of
    tiny widths, or a recipe that edits the tiny model."""
    from core.assets import ShapesFiles
    from core.config import ModelConfig

    result = resolve_recipe(preset, recipe, sets, flags, lora)
    if random_weights:
        if result.preset != "tiny":
            raise UserError(f"--random-weights is for the tiny preset (got {result.preset}): add --preset tiny")
        return result
    if (result.preset == "tiny" and checkpoint is None and result.model == ModelConfig.preset("tiny")
            and ShapesFiles.shipped().complete):
        return resolve_recipe("shapes", recipe, sets, flags, lora)
    return result


AttentionOpt = Annotated[str | None, typer.Option(
    help="Attention kernel: auto (on a GPU cuDNN, then flash), cudnn, flash, efficient, math; fp8 = the KV "
         "window through FlashAttention-3's FP8 kernel (Hopper; extra fp8-attention, docs/fp8.md).")]
RandomWeightsOpt = Annotated[bool, typer.Option(
    "--random-weights", help="The tiny preset with seeded random weights, even where the trained shapes-world "
                             "models are shipped (tests).")]


def check_device(device: str) -> None:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible on this machine; "
                            f"use --device cpu (with --preset tiny) or run on a GPU host")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) "
                            f"are visible; pick cuda:0..cuda:{torch.cuda.device_count() - 1}")


# Options shared by generate, multishot and bench.
PrecisionOpt = Annotated[Precision | None, typer.Option(
    help="DiT block linears (a packed --checkpoint from convert-nvfp4 loads as is).")]
QuantModeOpt = Annotated[QuantMode | None, typer.Option(
    help="With --precision nvfp4: w4a16 (packed weights, bf16 GEMM), w4a4 (NVFP4 numerics) or native (Blackwell).")]
KvPrecisionOpt = Annotated[KVPrecision | None, typer.Option(help="KV cache storage.")]


def quant_flags(precision, quant_mode, kv_precision) -> dict[str, object]:
    return {"precision": precision, "mode": quant_mode, "kv_precision": kv_precision}


# The wall-clock budget of the training commands (train-ar, distill).
MaxSecondsOpt = Annotated[float | None, typer.Option(
    help="Stop at the first step that ends past this many seconds of training (start-up not counted), "
         "with a checkpoint and the export as at the end; --resume continues.")]

# The process layout of multi-GPU commands (`sp.launcher.Launch`).
NprocOpt = Annotated[int, typer.Option(help="Processes (GPUs) per node; more than 1 re-executes under torchrun.")]
NnodesOpt = Annotated[int, typer.Option(help="Number of nodes.")]
NodeRankOpt = Annotated[int, typer.Option(help="This node's rank (multi-node).")]
RdzvOpt = Annotated[str | None, typer.Option(help="HOST:PORT of the rendezvous (multi-node).")]
SpOpt = Annotated[int, typer.Option(
    "--sp", help="Sequence-parallel ranks per video (Ulysses); divides the heads and the frames per block.")]
CfgParallelOpt = Annotated[bool, typer.Option(
    "--cfg-parallel", help="With guidance: the prompt and negative branches on two groups of --sp ranks.")]


# Options shared by generate, multishot and bench, with the defaults the help shows (the 5B
# preset's recipe, and the tiny one's where it differs).
DEFAULTS = Recipe()
TINY = Recipe.preset_recipe("tiny")


def default_note(value: object) -> str:
    """" [default: VALUE]" for help texts of options whose real default is "not given" (None: the
    recipe decides), shown like typer's own defaults (the bracket escaped for rich markup)."""
    return f" \\[default: {value}]"


PresetOpt = Annotated[str | None, typer.Option(
    help="Model preset: wan2.2-ti2v-5b, tiny (offline, CPU: the trained shapes-world models when shipped, else "
         "small random weights) or shapes (the trained shapes-world models; --model-dir: their folder)."
         + default_note(DEFAULTS.preset))]
RecipeOpt = Annotated[str | None, typer.Option(help="YAML recipe: a path or a bundled name.")]
HeightOpt = Annotated[int | None, typer.Option(
    help="Height in pixels, a multiple of 32." + default_note(f"{DEFAULTS.video.height}; tiny {TINY.video.height}"))]
WidthOpt = Annotated[int | None, typer.Option(
    help="Width in pixels, a multiple of 32." + default_note(f"{DEFAULTS.video.width}; tiny {TINY.video.width}"))]
SeedOpt = Annotated[int | None, typer.Option(help="Noise seed." + default_note(DEFAULTS.runtime.seed))]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N." + default_note("auto"))]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", help="Recipe override, e.g. stream.local_window_frames=24 (repeatable).")]
