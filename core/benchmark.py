"""Steady-state speed and memory of the streaming engine, on random weights (no downloads).

Builds the preset's DiT with random weights directly in the target dtype on the target device,
streams `chunks` chunks of random noise with a random text context through the real pipeline,
and times every chunk: CUDA events recorded at chunk boundaries on a GPU (no host sync until the
end), wall clock on a CPU. "Steady state" is every chunk generated with a full cache, i.e. after
`local_window_frames / frames_per_block` chunks, when each new chunk rolls the cache.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from core.attention import sdpa_backend
from core.config import VAE_TEMPORAL_STRIDE, Recipe
from core.dit import CausalWanDiT, count_parameters, random_init_
from core.optimize import compile_blocks, wants_compile
from core.pipeline import stream_latents, tokens_per_frame


@dataclass
class BenchResult:
    preset: str
    device: str
    device_name: str
    dtype: str
    attention: str
    compiled: bool
    height: int
    width: int
    latent_height: int
    latent_width: int
    tokens_per_frame: int
    frames_per_block: int
    local_window_frames: int
    sink_frames: int
    sampling_steps: int
    chunks: int
    steady_chunks: int
    seconds_per_block: float  # median over steady-state chunks
    seconds_per_block_mean: float
    seconds_per_block_min: float
    seconds_per_block_max: float
    first_chunk_seconds: float
    fps: float  # pixel frames per second at the median
    parameters: int
    weights_gib: float
    kv_cache_gib: float
    peak_memory_gib: float | None  # max allocated on the GPU over the whole run
    peak_reserved_gib: float | None
    torch_version: str
    cudnn_version: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    """`auto` -> the current CUDA device or the CPU; `cuda` gets its index."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def build_random_model(recipe: Recipe, device: torch.device, dtype: torch.dtype) -> CausalWanDiT:
    """The DiT with random weights, allocated once in its final dtype and device."""
    with torch.device("meta"):
        model = CausalWanDiT(recipe.model)
    model = model.to(dtype=dtype).to_empty(device=device)
    return random_init_(model, recipe.runtime.seed).eval()


def build_model(recipe: Recipe, device: torch.device, dtype: torch.dtype,
                checkpoint: str | None = None, lora: str | None = None) -> CausalWanDiT:
    if checkpoint is None and lora is None:
        return build_random_model(recipe, device, dtype)
    from core.checkpoint import build_generator

    return build_generator(recipe.model, checkpoint, lora, device=device, dtype=dtype,
                           seed=recipe.runtime.seed)


def run_benchmark(recipe: Recipe, frames: int | None = None,
                  on_chunk: Callable[[int, int], None] | None = None,
                  checkpoint: str | None = None, lora: str | None = None) -> BenchResult:
    """Stream `frames` latent frames (default: the window fill + 6 chunks) and report the
    steady-state timings. Random weights unless a checkpoint (and LoRA) is given."""
    stream, video, runtime = recipe.stream, recipe.video, recipe.runtime
    device = resolve_device(runtime.device)
    dtype = resolve_dtype(runtime.dtype, device)
    window_chunks = -(-stream.local_window_frames // stream.frames_per_block)
    if frames is None:
        frames = (window_chunks + 6) * stream.frames_per_block
    fpb = stream.frames_per_block
    if frames <= 0 or frames % fpb:
        raise ValueError(f"frames={frames} cannot be cut into blocks of frames_per_block={fpb}: "
                         f"use a multiple of {fpb}, e.g. {max(fpb, frames - frames % fpb + fpb)}")
    chunks = frames // fpb
    if chunks <= window_chunks:
        raise ValueError(f"frames must exceed the {window_chunks * fpb} frames that fill the "
                         f"window, to reach steady state (got {frames})")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)

    model = build_model(recipe, device, dtype, checkpoint, lora)
    compiled = wants_compile(runtime.compile, device)
    if compiled:
        compile_blocks(model)
    cfg = model.config
    generator = torch.Generator(device=device).manual_seed(runtime.seed)
    noise = torch.randn(1, frames, cfg.in_channels, video.latent_height, video.latent_width,
                        generator=generator, device=device, dtype=dtype)
    context = torch.zeros(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype)
    context[:, :64] = torch.randn(1, 64, cfg.text_dim, generator=generator, device=device,
                                  dtype=dtype)
    negative = torch.randn_like(context) if stream.uses_guidance else None

    stamps: list = []

    def stamp():
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            stamps.append(event)
        else:
            stamps.append(time.perf_counter())

    stamp()
    with sdpa_backend(runtime.attention):
        for chunk in stream_latents(model, noise, [context] * chunks, stream,
                                    negative_context=negative):
            stamp()
            if on_chunk is not None:
                on_chunk(chunk.index + 1, chunks)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        seconds = [a.elapsed_time(b) / 1000 for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        reserved = torch.cuda.max_memory_reserved(device) / 2**30
        name = torch.cuda.get_device_name(device)
    else:
        seconds = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
        peak = reserved = None
        name = "cpu"
    steady = seconds[window_chunks:]
    median = statistics.median(steady)
    tokens = tokens_per_frame(model, video.latent_height, video.latent_width)
    itemsize = torch.empty((), dtype=dtype).element_size()
    branches = 2 if stream.uses_guidance else 1
    kv_bytes = branches * cfg.num_layers * 2 * stream.local_window_frames * tokens * cfg.dim * itemsize
    return BenchResult(
        preset=recipe.preset, device=str(device), device_name=name, dtype=str(dtype).split(".")[-1],
        attention=runtime.attention, compiled=compiled, height=video.height,
        width=video.width, latent_height=video.latent_height, latent_width=video.latent_width,
        tokens_per_frame=tokens, frames_per_block=stream.frames_per_block,
        local_window_frames=stream.local_window_frames, sink_frames=stream.sink_frames,
        sampling_steps=stream.sampling_steps, chunks=chunks, steady_chunks=len(steady),
        seconds_per_block=median, seconds_per_block_mean=statistics.fmean(steady),
        seconds_per_block_min=min(steady), seconds_per_block_max=max(steady),
        first_chunk_seconds=seconds[0],
        fps=VAE_TEMPORAL_STRIDE * stream.frames_per_block / median,
        parameters=count_parameters(model),
        weights_gib=count_parameters(model) * itemsize / 2**30,
        kv_cache_gib=kv_bytes / 2**30, peak_memory_gib=peak, peak_reserved_gib=reserved,
        torch_version=torch.__version__,
        cudnn_version=torch.backends.cudnn.version() if device.type == "cuda" else None)
