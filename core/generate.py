"""Prompt schedule to mp4: the end-to-end generation behind `longlive generate` / `multishot`.

Stages: resolve devices and check the options (before any heavy work) -> load the DiT, VAE and
text encoder -> encode the prompts (each distinct prompt once) -> draw the noise -> stream the
latent chunks through the engine while a decoder turns each finished chunk into frames for the
writer -> close the video (renamed into place only if everything succeeded) -> report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from core.config import VIDEO_FPS, Recipe
from core.decode import VideoWriter, check_decode_mode, make_decoder
from core.dit import CausalWanDiT
from core.errors import UserError
from core.hooks import ModelHooks
from core.hub import ModelFiles, resolve_model_dir
from core.optimize import (
    DIT_BREAK_EVEN_CHUNKS,
    VAE_BREAK_EVEN_CHUNKS,
    compile_blocks,
    compile_vae_decoder,
    wants_compile,
)
from core.pipeline import stream_latents
from core.runtime import SpanTimer, resolve_device, resolve_dtype
from core.shots import PromptSchedule

# Wan's standard negative prompt (used when guidance is on).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走")


@dataclass
class GenerateRequest:
    recipe: Recipe
    schedule: PromptSchedule
    output: Path
    model_dir: Path | None = None
    checkpoint: Path | None = None  # default: <model-dir>/LongLive-2.0-5B/model_bf16.pt
    lora: Path | None = None
    image: Path | None = None  # image-to-video conditioning of the first frame
    decode: str = "sync"  # sync | stream | device:N
    crf: int = 18
    latents_out: Path | None = None
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    hooks: ModelHooks = field(default_factory=ModelHooks)  # quantized storage, wired in by the CLI


@dataclass
class GenerateReport:
    output: Path
    video_frames: int
    latent_frames: int
    chunks: int
    height: int
    width: int
    steps: int
    precision: str
    device: str
    decode: str
    denoise_seconds: float
    end_to_end_seconds: float
    peak_gpu_memory_gib: float | None
    switches: list[tuple[int, int, str]] = field(default_factory=list)  # (chunk, frame, prompt)

    @property
    def denoise_fps(self) -> float:
        return self.video_frames / self.denoise_seconds

    @property
    def end_to_end_fps(self) -> float:
        return self.video_frames / self.end_to_end_seconds


@dataclass
class Models:
    dit: CausalWanDiT
    vae: torch.nn.Module
    text: object  # core.text.TextEncoder


# -- stage: models --------------------------------------------------------------------------------


def load_models(request: GenerateRequest, device: torch.device, dtype: torch.dtype,
                vae_device: torch.device) -> Models:
    """The tiny preset runs on seeded random weights (offline); the 5B loads the model folder."""
    from core.text import TextEncoder
    from core.vae import load_vae, random_vae

    recipe = request.recipe
    seed = recipe.runtime.seed
    load_dit = request.hooks.load_dit or _load_bf16
    if recipe.preset == "tiny":
        dit = load_dit(recipe.model, request.checkpoint, request.lora, device, dtype, seed)
        vae = random_vae(recipe.vae, seed, device=vae_device, dtype=dtype)
        text = TextEncoder.tiny(seed=seed, device=device)
        return Models(dit, vae, text)
    files = ModelFiles(resolve_model_dir(request.model_dir))
    checkpoint = request.checkpoint or files.generator
    text = TextEncoder.from_model_dir(files.text_encoder_dir, device=device)
    dit = load_dit(recipe.model, checkpoint, request.lora, device, dtype, seed)
    vae = load_vae(files.vae, recipe.vae, device=vae_device, dtype=dtype)
    return Models(dit, vae, text)


def _load_bf16(config, checkpoint, lora, device, dtype, seed) -> CausalWanDiT:
    from core.checkpoint import build_generator

    return build_generator(config, checkpoint, lora, device=device, dtype=dtype, seed=seed)


# -- stage: inputs --------------------------------------------------------------------------------


def encode_schedule(text, schedule: PromptSchedule, negative_prompt: str | None,
                    dtype: torch.dtype, device: torch.device) -> tuple[list[Tensor], Tensor | None]:
    """One context per chunk (each distinct prompt encoded once), plus the negative prompt."""
    prompts = schedule.chunk_prompts
    distinct = list(dict.fromkeys(prompts + ([negative_prompt] if negative_prompt else [])))
    encoded = text.encode(distinct)
    by_prompt = {p: encoded[i:i + 1].to(device=device, dtype=dtype) for i, p in enumerate(distinct)}
    contexts = [by_prompt[p] for p in prompts]
    return contexts, (by_prompt[negative_prompt] if negative_prompt else None)


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

    from core.checkpoint import atomic_write

    atomic_write(path, lambda temp: save_file({"latents": latents.contiguous().cpu()}, temp, metadata))


# -- the run --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    vae_device: torch.device
    image: Tensor | None  # the decoded conditioning image, [1, 3, 1, H, W]


def check_request(request: GenerateRequest) -> Placement:
    """Every cheap check, before any heavy work or output: devices, decode mode, output path,
    model files, the conditioning image."""
    recipe, schedule, stream = request.recipe, request.schedule, request.recipe.stream
    device = resolve_device(recipe.runtime.device)
    dtype = resolve_dtype(recipe.runtime.dtype, device)
    vae_device = check_decode_mode(request.decode, device)
    if schedule.frames_per_block != stream.frames_per_block:
        raise UserError(f"the shot schedule uses {schedule.frames_per_block} frames per block but the "
                        f"recipe {stream.frames_per_block}: build the schedule from the recipe")
    if request.output.suffix.lower() != ".mp4":
        raise UserError(f"-o {request.output}: the output must be an .mp4 file")
    if not request.output.parent.is_dir():
        raise UserError(f"-o {request.output}: folder {request.output.parent} does not exist")
    if recipe.preset != "tiny":
        files = ModelFiles(resolve_model_dir(request.model_dir))
        files.require(files.vae, *([] if request.checkpoint else [files.generator]))
    if request.latents_out is not None and not request.latents_out.parent.is_dir():
        raise UserError(f"--latents-out {request.latents_out}: folder {request.latents_out.parent} "
                        f"does not exist")
    for path, what in ((request.checkpoint, "--checkpoint"), (request.lora, "--lora")):
        if path is not None and not path.exists():
            raise UserError(f"{what} {path} not found: check the path")
    image = None
    if request.image is not None:
        image = read_image(request.image, recipe.video.height, recipe.video.width)
    return Placement(device, dtype, vae_device, image)


def generate_video(request: GenerateRequest, on_chunk: Callable[[int, int], None] | None = None,
                   prompt_source: Callable[[], str | None] | None = None,
                   log: Callable[[str], None] = print) -> GenerateReport:
    recipe, schedule = request.recipe, request.schedule
    stream, video = recipe.stream, recipe.video
    placement = check_request(request)
    device, dtype, vae_device = placement.device, placement.dtype, placement.vae_device
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)

    models = load_models(request, device, dtype, vae_device)
    if wants_compile(recipe.runtime.compile, device, schedule.num_chunks, DIT_BREAK_EVEN_CHUNKS):
        compile_blocks(models.dit)
    if wants_compile(recipe.runtime.compile, vae_device, schedule.num_chunks, VAE_BREAK_EVEN_CHUNKS):
        compile_vae_decoder(models.vae)
    negative = request.negative_prompt if stream.uses_guidance else None
    contexts, negative_context = encode_schedule(models.text, schedule, negative, dtype, device)
    first_image = None
    if placement.image is not None:
        first_image = image_latent(models.vae, placement.image, device, dtype)
    noise = draw_noise(recipe, schedule.num_latent_frames, device, dtype, recipe.model.in_channels)

    switches: list[tuple[int, int, str]] = []

    def prompt_switch(chunk: int) -> Tensor | None:
        text = prompt_source() if prompt_source is not None else None
        if not text:
            return None
        frame = schedule.chunk_start_frames[chunk]
        switches.append((chunk, frame, text))
        log(f"switch at chunk {chunk} (frame {frame}, {frame / VIDEO_FPS:.2f} s): {text!r}")
        return models.text.encode([text]).to(device=device, dtype=dtype)

    metadata = {"title": schedule.shots[0].prompt[:200], "comment": json.dumps({
        "generator": "longlive", "preset": recipe.preset, "seed": recipe.runtime.seed,
        "steps": stream.sampling_steps, "shot_start_frames": schedule.shot_start_frames,
        "shot_prompts": [shot.prompt for shot in schedule.shots]})}
    timer = SpanTimer(device)
    latents_kept = [] if request.latents_out is not None else None
    started = time.perf_counter()
    with VideoWriter(request.output, video.width, video.height, crf=request.crf,
                     metadata=metadata) as writer:
        decoder = make_decoder(request.decode, models.vae, writer.write)
        try:
            timer.start()
            for chunk in stream_latents(models.dit, noise, contexts, stream, schedule.scene_cuts,
                                        image_latent=first_image, negative_context=negative_context,
                                        prompt_switch=prompt_switch if prompt_source else None,
                                        cache_transform=request.hooks.cache_transform):
                timer.stop()
                decoder.submit(chunk.latents)
                if latents_kept is not None:
                    latents_kept.append(chunk.latents)
                if on_chunk is not None:
                    on_chunk(chunk.index + 1, schedule.num_chunks)
                timer.start()
            decoder.finish()
        except BaseException:
            if hasattr(decoder, "close"):
                decoder.close()
            raise
    end_to_end = time.perf_counter() - started
    if latents_kept is not None:
        save_latents(torch.cat(latents_kept, dim=1), request.latents_out,
                     {"shot_start_frames": json.dumps(schedule.shot_start_frames)})
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return GenerateReport(
        output=request.output, video_frames=writer.frames_written,
        latent_frames=schedule.num_latent_frames, chunks=schedule.num_chunks, height=video.height,
        width=video.width, steps=stream.sampling_steps,
        precision=", ".join(filter(None, (str(dtype).split(".")[-1], request.hooks.label))),
        device=str(device), decode=request.decode, denoise_seconds=sum(timer.durations()),
        end_to_end_seconds=end_to_end, peak_gpu_memory_gib=peak, switches=switches)

