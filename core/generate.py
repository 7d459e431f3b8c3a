"""Prompt schedule to mp4: the end-to-end generation behind `longlive generate` / `multishot`.

Stages: `prepare` (devices, options, output paths, files, the image: before any heavy work) ->
the caller builds the models (`longlive_cli/build.py`) -> `generate_video`: encode the prompts
(each distinct prompt once) -> draw the noise -> stream the latent chunks through the engine
while a decoder turns each finished chunk into frames for the writer -> close the video (renamed
into place only if everything succeeded) -> report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from core.assets import ShapesFiles
from core.attention import sdpa_backend
from core.checkpoint import atomic_write, check_writable
from core.config import OFFLINE_PRESETS, VIDEO_FPS, Recipe
from core.decode import DecodeMode, VideoWriter, check_crf, make_decoder
from core.errors import UserError, discard_partial
from core.hub import ModelFiles, resolve_model_dir
from core.interactive import PromptFeed, Switch, open_feed
from core.pipeline import BuiltDiT, LatentChunk, stream_latents
from core.runtime import SpanTimer, resolve_device, resolve_dtype
from core.shots import PromptSchedule


@dataclass
class GenerateRequest:
    """What a `generate` / `multishot` run is asked for. `prepare` checks it once, before any
    model is built; the models come from outside (`longlive_cli/build.py`)."""

    recipe: Recipe
    schedule: PromptSchedule
    output: Path
    model_dir: Path | None = None
    checkpoint: Path | None = None  # default: <model-dir>/LongLive-2.0-5B/model_bf16.pt
    lora: Path | None = None
    image: Path | None = None  # image-to-video conditioning of the first frame
    decode: DecodeMode = field(default_factory=DecodeMode)
    crf: int = 18
    latents_out: Path | None = None


@dataclass
class GenerateReport:
    """What a finished run did: sizes, settings, and the denoise / end-to-end rates."""

    output: Path
    video_frames: int
    latent_frames: int
    chunks: int
    height: int
    width: int
    steps: int
    precision: str
    device: str
    decode: DecodeMode
    denoise_seconds: float
    end_to_end_seconds: float
    peak_gpu_memory_gib: float | None
    switches: list[tuple[int, int, str]] = field(default_factory=list)  # (chunk, frame, prompt)
    prompt_timings: list[Switch] = field(default_factory=list)  # every typed prompt, applied or not

    @property
    def denoise_fps(self) -> float:
        return self.video_frames / self.denoise_seconds

    @property
    def end_to_end_fps(self) -> float:
        return self.video_frames / self.end_to_end_seconds


@dataclass
class Models:
    """What a run generates with (built by `longlive_cli/build.py`)."""

    dit: BuiltDiT
    vae: torch.nn.Module
    text: object  # core.text.TextEncoder


# -- stage: inputs --------------------------------------------------------------------------------


def encode_schedule(text, schedule: PromptSchedule, negative_prompt: str | None,
                    dtype: torch.dtype, device: torch.device) -> tuple[list[Tensor], Tensor | None]:
    """One context per chunk (each distinct prompt encoded once), plus the negative prompt."""
    prompts = schedule.chunk_prompts
    distinct = list(dict.fromkeys(prompts + ([negative_prompt] if negative_prompt is not None else [])))
    encoded = text.encode(distinct)
    by_prompt = {p: encoded[i:i + 1].to(device=device, dtype=dtype) for i, p in enumerate(distinct)}
    contexts = [by_prompt[p] for p in prompts]
    return contexts, (by_prompt[negative_prompt] if negative_prompt is not None else None)


def read_image(path: Path, height: int, width: int) -> Tensor:
    """An image file -> `[1, 3, 1, H, W]` in [-1, 1], resized with antialiasing (PyAV decodes
    PNG, JPEG, WebP, BMP, ...)."""
    import av
    import numpy as np

    if not path.exists():
        raise UserError(f"image {path} not found: check the --image path")
    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
            rgb = frame.to_ndarray(format="rgb24")
    except (av.error.FFmpegError, StopIteration, OSError, ValueError) as err:
        raise UserError(f"cannot read image {path} ({type(err).__name__}): give a PNG, JPEG or "
                        f"WebP file") from None
    pixels = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255
    if pixels.shape[-2:] != (height, width):
        pixels = torch.nn.functional.interpolate(pixels, size=(height, width), mode="bicubic",
                                                 antialias=True, align_corners=False).clamp(0, 1)
    return (pixels * 2 - 1)[:, :, None]


def image_latent(vae, pixels: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The conditioning latent `[1, 1, 48, h, w]` of a first frame `[1, 3, 1, H, W]`."""
    vae_param = next(vae.parameters())
    with torch.no_grad():
        latent = vae.encode(pixels.to(vae_param.device, vae_param.dtype))
    return latent.permute(0, 2, 1, 3, 4).to(device=device, dtype=dtype)


def draw_noise(recipe: Recipe, latent_frames: int, device: torch.device, dtype: torch.dtype,
               channels: int) -> Tensor:
    """All the video's noise in one call, in the working dtype (as the official run draws it)."""
    generator = torch.Generator(device=device).manual_seed(recipe.runtime.seed)
    shape = (1, latent_frames, channels, recipe.video.latent_height, recipe.video.latent_width)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def save_latents(latents: Tensor, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda temp: save_file({"latents": latents.contiguous().cpu()}, temp, metadata))


# -- the run --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """The checked request: devices, dtype, the model files, the decoded conditioning image."""

    device: torch.device
    dtype: torch.dtype
    vae_device: torch.device
    files: ModelFiles | None  # the 5B's model folder; None: an offline preset
    checkpoint: Path | None  # the generator file to load; None: seeded random weights
    image: Tensor | None  # [1, 3, 1, H, W] in [-1, 1]
    shapes: ShapesFiles | None = None  # the shapes preset's files (VAE, text encoder); None: other presets


def prepare(request: GenerateRequest) -> Placement:
    """Every cheap check, once, before any heavy work or output: devices, decode mode, output
    paths (probed for writing), quality, model files, the conditioning image (decoded here)."""
    recipe, schedule, stream = request.recipe, request.schedule, request.recipe.stream
    device = resolve_device(recipe.runtime.device)
    dtype = resolve_dtype(recipe.runtime.dtype, device)
    vae_device = request.decode.vae_device(device)
    if schedule.frames_per_block != stream.frames_per_block:
        raise UserError(f"the shot schedule uses {schedule.frames_per_block} frames per block but the "
                        f"recipe {stream.frames_per_block}: build the schedule from the recipe")
    if request.output.suffix.lower() != ".mp4":
        raise UserError(f"-o {request.output}: the output must be an .mp4 file")
    check_crf(request.crf)
    check_writable(request.output, "-o")
    if request.latents_out is not None:
        check_writable(request.latents_out, "--latents-out")
    files, checkpoint, shapes = None, request.checkpoint, None
    if recipe.preset == "shapes":
        shapes = shapes_files(request.model_dir, request.checkpoint)
        checkpoint = checkpoint or shapes.dit
    elif recipe.preset not in OFFLINE_PRESETS:
        files = ModelFiles(resolve_model_dir(request.model_dir))
        files.require(files.vae, *([] if request.checkpoint else [files.generator]))
        checkpoint = checkpoint or files.generator
    for path, what in ((request.checkpoint, "--checkpoint"), (request.lora, "--lora")):
        if path is not None and not path.exists():
            raise UserError(f"{what} {path} not found: check the path")
    image = None
    if request.image is not None:
        image = read_image(request.image, recipe.video.height, recipe.video.width)
    return Placement(device, dtype, vae_device, files, checkpoint, image, shapes)


def shapes_files(model_dir: Path | None, checkpoint: Path | None) -> ShapesFiles:
    """The shapes preset's trained files: --model-dir, else the ones shipped in the package (the
    DiT file is not needed with a --checkpoint)."""
    shapes = ShapesFiles.in_folder(Path(model_dir)) if model_dir else ShapesFiles.shipped()
    missing = shapes.missing(need_dit=checkpoint is None)
    if missing:
        names = ", ".join(p.name for p in missing)
        raise UserError(f"the shapes preset needs {names} in {shapes.folder}: train them with "
                        f"docs/benchmarks/train_shapes_gpu.sh and give that folder as --model-dir, "
                        f"or use --preset tiny --random-weights")
    return shapes


def generate_video(request: GenerateRequest, placement: Placement, models: Models,
                   on_chunk: Callable[[int, int], None] | None = None,
                   prompt_source: Callable[[], str | None] | PromptFeed | None = None,
                   log: Callable[[str], None] = print) -> GenerateReport:
    """Stream the request's schedule into its mp4 (stages in the module doc). `on_chunk(done,
    total)` with done = 0 when the first chunk starts, then after each chunk. `prompt_source()` (a
    new prompt, or None) is polled on its own thread, which also encodes what it returns
    (core/interactive.py): a switch lands at the first chunk boundary after its context is ready
    and never stalls the video; a ready `PromptFeed` (e.g. shared by a parallel run's ranks) is
    used as it is. `log` gets one line per switch. The switches are recorded in the mp4's and the
    latents' metadata."""
    recipe, schedule = request.recipe, request.schedule
    stream, video = recipe.stream, recipe.video
    device, dtype = placement.device, placement.dtype
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    switches: list[tuple[int, int, str]] = []
    timer = SpanTimer(device)
    with open_feed(prompt_source, models.text, device, dtype) as feed:
        chunks = stream_schedule(request, placement, models, feed, log, switches)
        started = time.perf_counter()
        frames_written = _stream_into_video(request, models.vae, chunks, timer, on_chunk, switches)
    end_to_end = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return GenerateReport(
        output=request.output, video_frames=frames_written,
        latent_frames=schedule.num_latent_frames, chunks=schedule.num_chunks, height=video.height,
        width=video.width, steps=stream.sampling_steps,
        precision=", ".join(filter(None, (str(dtype).split(".")[-1], models.dit.label))),
        device=str(device), decode=request.decode, denoise_seconds=sum(timer.durations()),
        end_to_end_seconds=end_to_end, peak_gpu_memory_gib=peak, switches=switches,
        prompt_timings=list(feed.switches) if feed is not None else [])


def stream_schedule(request: GenerateRequest, placement: Placement, models: Models,
                    feed: PromptFeed | None = None, log: Callable[[str], None] = print,
                    switches: list[tuple[int, int, str]] | None = None) -> Iterator[LatentChunk]:
    """The engine stages of `generate_video`: encode the prompts and the image, draw the noise, and
    stream the latent chunks (every rank of a parallel run runs these; only the root writes).
    Interactive switches come from the open `feed` and are appended to `switches`."""
    recipe, schedule, stream = request.recipe, request.schedule, request.recipe.stream
    device, dtype = placement.device, placement.dtype
    negative = stream.negative_prompt if stream.uses_guidance else None
    contexts, negative_context = encode_schedule(models.text, schedule, negative, dtype, device)
    first_image = None
    if placement.image is not None:
        first_image = image_latent(models.vae, placement.image, device, dtype)
    noise = draw_noise(recipe, schedule.num_latent_frames, device, dtype, recipe.model.in_channels)
    switcher = None
    if feed is not None:
        switcher = _prompt_switcher(feed, schedule, switches if switches is not None else [], log)
    chunks = stream_latents(models.dit.model, noise, contexts, stream, schedule.scene_cuts,
                            image_latent=first_image, negative_context=negative_context,
                            prompt_switch=switcher, kv_storage=models.dit.kv_storage,
                            branch_placement=models.dit.branches)
    return _under_sdpa_backend(recipe.runtime.attention, chunks)


def _under_sdpa_backend(name: str, chunks: Iterator[LatentChunk]) -> Iterator[LatentChunk]:
    """The chunks denoised with `runtime.attention`'s SDPA kernel family (what `bench` measures;
    "auto" prefers cuDNN on a GPU, PyTorch's own order does not)."""
    with sdpa_backend(name):
        yield from chunks


def _prompt_switcher(feed: PromptFeed, schedule: PromptSchedule, switches: list[tuple[int, int, str]],
                     log: Callable[[str], None]) -> Callable[[int], Tensor | None]:
    """The pipeline's `prompt_switch(chunk)`: the newest typed prompt whose context is ready (it
    never waits for the encoder), recorded in `switches`."""

    def prompt_switch(chunk: int) -> Tensor | None:
        taken = feed.take(chunk)
        if taken is None:
            return None
        switch, context = taken
        frame = schedule.chunk_start_frames[chunk]
        switches.append((chunk, frame, switch.prompt))
        encoded = ("" if switch.encode_seconds is None
                   else f" (encoded in {switch.encode_seconds:.2f} s beside the denoising)")
        log(f"switch at chunk {chunk} (frame {frame}, {frame / VIDEO_FPS:.2f} s): {switch.prompt!r}{encoded}")
        return context

    return prompt_switch


def switch_records(switches: list[tuple[int, int, str]]) -> list[dict[str, object]]:
    """Interactive prompt switches as JSON-ready records: chunk, first video frame, prompt."""
    return [{"chunk": chunk, "frame": frame, "prompt": prompt} for chunk, frame, prompt in switches]


def video_metadata(request: GenerateRequest, switches: list[tuple[int, int, str]] = ()) -> dict[str, str]:
    """The mp4's title and `comment` (JSON: generator settings, shot starts and prompts, and the
    interactive prompt switches)."""
    recipe, schedule = request.recipe, request.schedule
    return {"title": schedule.shots[0].prompt[:200], "comment": json.dumps({
        "generator": "longlive", "preset": recipe.preset, "seed": recipe.runtime.seed,
        "steps": recipe.stream.sampling_steps, "shot_start_frames": schedule.shot_start_frames,
        "shot_prompts": [shot.prompt for shot in schedule.shots], "switches": switch_records(list(switches))})}


def latents_metadata(request: GenerateRequest, switches: list[tuple[int, int, str]]) -> dict[str, str]:
    """The `--latents-out` file's metadata: shot starts and the interactive prompt switches."""
    return {"shot_start_frames": json.dumps(request.schedule.shot_start_frames),
            "switches": json.dumps(switch_records(switches))}


def _stream_into_video(request: GenerateRequest, vae, chunks, timer: SpanTimer,
                       on_chunk: Callable[[int, int], None] | None,
                       switches: list[tuple[int, int, str]]) -> int:
    """Decode every chunk as it comes into the request's mp4; `timer` spans the denoising of each
    chunk. The metadata (with the prompt switches, known only now) and the `--latents-out` file
    are written before the video is renamed into place: a failure leaves neither. Returns the
    frames written."""
    video, total = request.recipe.video, request.schedule.num_chunks
    kept: list[Tensor] | None = [] if request.latents_out is not None else None
    latents_written = False
    try:
        with VideoWriter(request.output, video.width, video.height, crf=request.crf,
                         metadata=video_metadata(request)) as writer:
            _decode_chunks(make_decoder(request.decode, vae, writer.write), chunks, timer, on_chunk, total, kept)
            writer.update_metadata(video_metadata(request, switches))
            if kept is not None:
                save_latents(torch.cat(kept, dim=1), request.latents_out, latents_metadata(request, switches))
                latents_written = True
    except BaseException:
        if latents_written:  # the video failed at its close: take the latents back too
            discard_partial(request.latents_out)
        raise
    return writer.frames_written


def _decode_chunks(decoder, chunks, timer: SpanTimer, on_chunk: Callable[[int, int], None] | None,
                   total: int, kept: list[Tensor] | None) -> None:
    """Hand every chunk to the decoder as it is denoised; `on_chunk(0, total)` when the first
    chunk starts, `on_chunk(done, total)` after each."""
    try:
        if on_chunk is not None:
            on_chunk(0, total)
        timer.start()
        for chunk in chunks:
            timer.stop()
            decoder.submit(chunk.latents)
            if kept is not None:
                kept.append(chunk.latents)
            if on_chunk is not None:
                on_chunk(chunk.index + 1, total)
            timer.start()
        decoder.finish()
    except BaseException:
        if hasattr(decoder, "close"):
            decoder.close()
        raise
