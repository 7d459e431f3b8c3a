"""`longlive generate PROMPT` and `longlive multishot SHOTS_FILE`: prompt(s) to an mp4."""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from core.config import VIDEO_FPS, chunk_video_frames
from core.decode import DecodeMode
from core.errors import UserError
from longlive_cli.app import app, interrupted
from longlive_cli.interactive import PromptReader
from longlive_cli.options import (
    DEFAULTS,
    TINY,
    AttentionOpt,
    CfgParallelOpt,
    DeviceOpt,
    HeightOpt,
    KvPrecisionOpt,
    NnodesOpt,
    NodeRankOpt,
    NprocOpt,
    PrecisionOpt,
    PresetOpt,
    QuantModeOpt,
    RandomWeightsOpt,
    RdzvOpt,
    RecipeOpt,
    SeedOpt,
    SetOpt,
    SpOpt,
    WidthOpt,
    default_note,
    quant_flags,
)
from longlive_cli.progress import TaskProgress, count_of, per_second


def _length(recipe) -> str:
    video = recipe.video
    return (f"{video.latent_frames} latent frames = {video.pixel_frames} video frames, "
            f"{video.pixel_frames / VIDEO_FPS:.1f} s")


ModelDirOpt = Annotated[str | None, typer.Option(
    help="Model folder from `longlive download` (default ~/.cache/longlive/models); with --preset shapes, "
         "the folder of dit.safetensors and vae.safetensors (default: the shipped ones).")]
CheckpointOpt = Annotated[str | None, typer.Option(
    help="Generator weights (default: <model-dir>/LongLive-2.0-5B/model_bf16.pt).")]
LoraOpt = Annotated[str | None, typer.Option(help="LoRA file to merge (official generator_lora layout).")]
_CHUNK_SECONDS = chunk_video_frames(DEFAULTS.stream.frames_per_block) / VIDEO_FPS
SecondsOpt = Annotated[float | None, typer.Option(help=(
    f"Video length in seconds, rounded to whole chunks of {_CHUNK_SECONDS:.2f} s. Give --seconds or --frames, "
    f"not both (both is an error)." + default_note(f"the recipe's length: {_length(DEFAULTS)}; tiny {_length(TINY)}")))]
FramesOpt = Annotated[int | None, typer.Option(help=(
    f"Video length in latent frames, a multiple of {DEFAULTS.stream.frames_per_block}: N latent frames are 4N-3 "
    f"video frames at {VIDEO_FPS} fps. Give --frames or --seconds, not both."
    + default_note(f"the recipe's: {DEFAULTS.video.latent_frames}; tiny {TINY.video.latent_frames}")))]
StepsOpt = Annotated[int | None, typer.Option(
    help="Sampling steps: 4 or 2." + default_note(DEFAULTS.stream.sampling_steps))]
ImageOpt = Annotated[str | None, typer.Option(help="Image-to-video: condition the first frame on this image.")]
DecodeOpt = Annotated[DecodeMode, typer.Option(
    parser=DecodeMode.parse, metavar="sync|stream|device:N|split",
    help="sync, stream (side CUDA stream), device:N (VAE on GPU N) or split (bands over the ranks).")]
OutputOpt = Annotated[str, typer.Option("-o", "--output", help="Output .mp4 (written atomically).")]
LatentsOpt = Annotated[str | None, typer.Option(help="Also save the latents here (.safetensors).")]
CrfOpt = Annotated[int, typer.Option(help="H.264 quality: 0 (lossless) .. 51; 18 looks lossless.")]


def _recipe(preset, recipe, sets, height, width, steps, seed, device, quant, random_weights=False, checkpoint=None,
            attention=None, lora=None):
    from longlive_cli.options import resolve_generation_recipe

    if steps is not None and steps not in (2, 4):
        raise UserError(f"--steps {steps}: the LongLive sampler runs 4 or 2 steps "
                        f"(other counts: --set stream.sampling_steps=N)")
    return resolve_generation_recipe(preset, recipe, sets or [], {
        "video": {"height": height, "width": width}, "stream": {"sampling_steps": steps},
        "runtime": {"seed": seed, "device": device, "attention": attention}, "quant": quant},
        random_weights=random_weights, checkpoint=checkpoint, lora=lora)


def _chunks(recipe, seconds: float | None, frames: int | None) -> int | None:
    """Length options -> whole chunks (None: not given)."""
    from core.shots import durations_to_chunks

    fpb = recipe.stream.frames_per_block
    if seconds is not None and frames is not None:
        raise UserError("give --seconds or --frames, not both")
    if frames is not None:
        if frames <= 0 or frames % fpb:
            raise UserError(f"--frames {frames}: the video is made of blocks of {fpb} latent frames; "
                            f"use a multiple of {fpb}, e.g. {max(fpb, frames - frames % fpb + fpb)}")
        return frames // fpb
    if seconds is not None:
        if not math.isfinite(seconds) or seconds <= 0:
            raise UserError(f"--seconds {seconds}: give a positive length, e.g. --seconds 10")
        return durations_to_chunks([round(seconds * VIDEO_FPS)], fpb)[0]
    return None


def _run(recipe, schedule, output, model_dir, checkpoint, lora, image, decode, latents_out, crf, *,
         command: str, interactive: bool = False, layout=None) -> None:
    from core.generate import GenerateRequest, generate_video, prepare
    from longlive_cli.build import build_models, check_dit_spec, generation_spec, show_lora_sampling_note

    console = Console(stderr=True)
    request = GenerateRequest(
        recipe=recipe, schedule=schedule, output=Path(output),
        model_dir=Path(model_dir) if model_dir else None,
        checkpoint=Path(checkpoint) if checkpoint else None, lora=Path(lora) if lora else None,
        image=Path(image) if image else None, decode=decode, crf=crf,
        latents_out=Path(latents_out) if latents_out else None)
    placement = prepare(request)  # every cheap check, once, before any model or output
    spec = generation_spec(request, placement)
    check_dit_spec(spec)
    show_lora_sampling_note(request.lora, recipe.stream)
    if layout is not None and layout.requested:  # several processes (longlive_cli/parallel_inference.py)
        from longlive_cli.parallel_inference import run_generate

        return run_generate(request, layout, (lambda: _typed_lines(console)) if interactive else None,
                            lambda report: _show(report, command))
    if command == "multishot":
        for span in schedule.spans:
            console.print(shot_line(span), highlight=False, markup=False)
    with interrupted("nothing was written"), contextlib.ExitStack() as scope:
        reader = scope.enter_context(_prompt_reader(console)) if interactive else None
        progress = scope.enter_context(TaskProgress(
            command, count_of("chunks"), console=console, total=schedule.num_chunks,
            rate=per_second("frames/s", chunk_video_frames(recipe.stream.frames_per_block)),
            footer=reader.footer if reader is not None and reader.keys else None))

        def on_chunk(done: int, total: int) -> None:
            if done == 0:
                progress.start()
            else:
                progress.update(done, total)

        try:
            models = build_models(request, placement, spec)
            report = generate_video(request, placement, models, on_chunk,
                                    reader.next_prompt if reader is not None else None, log=progress.log)
        except ValueError as err:  # config / shape validation from the engine
            raise UserError(str(err)) from None
    _show(report, command)


def _show(report, command: str) -> None:
    out = Console()
    out.print(_summary(report, command))
    out.print(f"wrote {report.output}", soft_wrap=True, highlight=False)


def _layout(ctx, nproc_per_node, nnodes, node_rank, rdzv_endpoint, sp, cfg_parallel):
    from longlive_cli.parallel_inference import InferenceLayout, command_line
    from sp.launcher import Launch

    return InferenceLayout(Launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint), sp, cfg_parallel,
                           command_line(ctx))


def shot_line(span) -> str:
    """One line per shot of a multishot run: where it lies and how it starts."""
    chunks = (f"chunk {span.start_chunk}" if span.num_chunks == 1
              else f"chunks {span.start_chunk}-{span.start_chunk + span.num_chunks - 1}")
    start = "opening shot" if span.index == 0 else ("cut" if span.scene_cut else "same scene")
    return (f"shot {span.index + 1}: {chunks}, frame {span.start_frame} ({span.start_seconds:.2f} s), "
            f"{start}: {span.prompt[:70]!r}")


def _prompt_reader(console: Console) -> PromptReader:
    """Typed prompts: key by key under a live bar (no echo into it), else line by line."""
    keys = console.is_terminal and sys.stdin.isatty()
    _announce_interactive(console)
    return PromptReader(sys.stdin, keys=keys)


def _typed_lines(console: Console):
    """A parallel run's typed prompts (on the root rank), line by line: `next_prompt`."""
    _announce_interactive(console)
    return PromptReader(sys.stdin, keys=False).__enter__().next_prompt  # line mode: nothing to restore


def _announce_interactive(console: Console) -> None:
    console.print("[bold]interactive:[/] type a prompt and press Enter: it is encoded beside the video "
                  "and switches at the next chunk start after that")


def _summary(report, command: str) -> Table:
    table = Table(title=f"longlive {command}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    peak = "n/a (CPU)" if report.peak_gpu_memory_gib is None else f"{report.peak_gpu_memory_gib:.2f} GiB"
    for key, value in (
        ("video", f"{report.video_frames} frames, {report.video_frames / VIDEO_FPS:.2f} s at {VIDEO_FPS} fps, "
                  f"{report.width}x{report.height}"),
        ("steps / precision", f"{report.steps} / {report.precision} on {report.device}, decode {report.decode}"),
        ("denoise fps", f"{report.denoise_fps:.1f} ({report.denoise_seconds:.2f} s)"),
        ("end-to-end fps", f"{report.end_to_end_fps:.1f} ({report.end_to_end_seconds:.2f} s)"),
        ("peak GPU memory", peak),
        ("prompt switches", str(len(report.switches))),
    ):
        table.add_row(key, value)
    return table


@app.command()
def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="What to generate.")],
    preset: PresetOpt = None, recipe: RecipeOpt = None, model_dir: ModelDirOpt = None,
    checkpoint: CheckpointOpt = None, lora: LoraOpt = None, seconds: SecondsOpt = None,
    frames: FramesOpt = None, height: HeightOpt = None, width: WidthOpt = None, steps: StepsOpt = None,
    image: ImageOpt = None, seed: SeedOpt = None, decode: DecodeOpt = "sync", device: DeviceOpt = None,
    output: OutputOpt = "video.mp4", latents_out: LatentsOpt = None, crf: CrfOpt = 18,
    precision: PrecisionOpt = None, quant_mode: QuantModeOpt = None, kv_precision: KvPrecisionOpt = None,
    attention: AttentionOpt = None, set_: SetOpt = None, random_weights: RandomWeightsOpt = False,
    nproc_per_node: NprocOpt = 1, nnodes: NnodesOpt = 1, node_rank: NodeRankOpt = 0, rdzv_endpoint: RdzvOpt = None,
    sp: SpOpt = 1, cfg_parallel: CfgParallelOpt = False,
) -> None:
    """Generate one video from a prompt (text-to-video, or image-to-video with --image)."""
    from core.shots import single_prompt_schedule

    chosen = _recipe(preset, recipe, set_, height, width, steps, seed, device,
                     quant_flags(precision, quant_mode, kv_precision), random_weights, checkpoint, attention, lora)
    chunks = _chunks(chosen, seconds, frames)
    if chunks is None:  # the recipe's length
        chunks = max(1, chosen.video.latent_frames // chosen.stream.frames_per_block)
    schedule = single_prompt_schedule(prompt, chunks, chosen.stream.frames_per_block)
    _run(chosen, schedule, output, model_dir, checkpoint, lora, image, decode, latents_out, crf, command="generate",
         layout=_layout(ctx, nproc_per_node, nnodes, node_rank, rdzv_endpoint, sp, cfg_parallel))


@app.command()
def multishot(
    ctx: typer.Context,
    shots_file: Annotated[str, typer.Argument(help="Shot list: .txt (a prompt per line), .yaml or .json.")],
    preset: PresetOpt = None, recipe: RecipeOpt = None, model_dir: ModelDirOpt = None,
    checkpoint: CheckpointOpt = None, lora: LoraOpt = None, seconds: SecondsOpt = None,
    frames: FramesOpt = None, height: HeightOpt = None, width: WidthOpt = None, steps: StepsOpt = None,
    image: ImageOpt = None, seed: SeedOpt = None, decode: DecodeOpt = "sync", device: DeviceOpt = None,
    output: OutputOpt = "video.mp4", latents_out: LatentsOpt = None, crf: CrfOpt = 18,
    interactive: Annotated[bool, typer.Option(
        "--interactive", help="Read new prompts from the terminal while generating.")] = False,
    precision: PrecisionOpt = None, quant_mode: QuantModeOpt = None, kv_precision: KvPrecisionOpt = None,
    attention: AttentionOpt = None, set_: SetOpt = None, random_weights: RandomWeightsOpt = False,
    nproc_per_node: NprocOpt = 1, nnodes: NnodesOpt = 1, node_rank: NodeRankOpt = 0, rdzv_endpoint: RdzvOpt = None,
    sp: SpOpt = 1, cfg_parallel: CfgParallelOpt = False,
) -> None:
    """Generate one multi-shot video from a shot list (scene cuts between shots).

    A .yaml/.json shot list gives each shot's length (seconds or frames); a .txt list (one prompt
    per line) is split evenly over --seconds / --frames (default: the recipe's length)."""
    from core.shots import load_schedule

    chosen = _recipe(preset, recipe, set_, height, width, steps, seed, device,
                     quant_flags(precision, quant_mode, kv_precision), random_weights, checkpoint, attention, lora)
    chunks = _chunks(chosen, seconds, frames)
    if chunks is None and Path(shots_file).suffix.lower() == ".txt":  # the recipe's length
        chunks = max(1, chosen.video.latent_frames // chosen.stream.frames_per_block)
    schedule = load_schedule(shots_file, chosen.stream.frames_per_block, chunks)
    _run(chosen, schedule, output, model_dir, checkpoint, lora, image, decode, latents_out, crf,
         command="multishot", interactive=interactive,
         layout=_layout(ctx, nproc_per_node, nnodes, node_rank, rdzv_endpoint, sp, cfg_parallel))
