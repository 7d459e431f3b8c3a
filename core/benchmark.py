"""Steady-state speed and memory of the streaming engine, on random weights (no downloads).

Builds the preset's DiT with random weights directly in the target dtype on the target device,
streams `chunks` chunks of random noise with a random text context through the real pipeline,
and times every chunk: CUDA events recorded at chunk boundaries on a GPU (no host sync until the
end), wall clock on a CPU. "Steady state" is every chunk generated with a full cache, i.e. after
`local_window_frames / frames_per_block` chunks, when each new chunk rolls the cache. A chunk's
time runs from the previous chunk's hand-off to the decoder to its own end of denoising, so it
is the DiT alone even when decoding runs in line.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.attention import sdpa_backend
from core.config import VAE_TEMPORAL_STRIDE, Recipe
from core.dit import CausalWanDiT, count_parameters, random_init_
from core.hooks import ModelHooks, storage_bytes
from core.optimize import compile_blocks, compile_vae_decoder, wants_compile, warm_up_vae_decoder
from core.pipeline import allocate_cache, stream_latents, tokens_per_frame
from core.runtime import SpanTimer, resolve_device, resolve_dtype


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
    weights_gib: float  # bytes of the DiT's parameters and buffers as stored
    kv_cache_gib: float  # bytes of every KV cache allocated (all guidance branches)
    peak_memory_gib: float | None  # max allocated on the GPU over the whole run
    peak_reserved_gib: float | None
    torch_version: str
    cudnn_version: int | None
    # with --decode: frames decoded and written to an mp4 while denoising
    decode: str | None = None
    e2e_seconds_per_block: float | None = None  # median interval between delivered chunks
    e2e_fps: float | None = None
    e2e_over_dit: float | None = None  # e2e fps / DiT fps (1.0: decoding fully hidden)
    vae_peak_memory_gib: float | None = None
    storage: str = "bf16"  # e.g. "nvfp4 w4a16 (mse), kv nvfp4 (mse)"

    def to_dict(self) -> dict:
        return asdict(self)


def logical_parameters(recipe: Recipe) -> int:
    """The model's parameter count whatever its storage (packed layers hold buffers instead)."""
    with torch.device("meta"):
        return count_parameters(CausalWanDiT(recipe.model))


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
                  checkpoint: str | None = None, lora: str | None = None,
                  decode: str | None = None, hooks: ModelHooks | None = None) -> BenchResult:
    """Stream `frames` latent frames (default: the window fill + 6 chunks) and report the
    steady-state timings. Random weights unless a checkpoint (and LoRA) is given. With `decode`
    (sync | stream | device:N) every chunk is also decoded by a random-weight VAE and written to
    a throwaway mp4, and the delivery rate of finished frames is reported as end-to-end fps.
    `hooks` swap in another storage (NVFP4 weights / KV cache); the weight and cache sizes
    reported are those of the tensors actually allocated."""
    hooks = hooks or ModelHooks()
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

    if hooks.load_dit is not None:
        model = hooks.load_dit(recipe.model, checkpoint and Path(checkpoint), lora and Path(lora),
                               device, dtype, runtime.seed).eval()
    else:
        model = build_model(recipe, device, dtype, checkpoint, lora)
    caches: list = []  # the caches another storage built, to report their real size

    def cache_transform(cache, device):
        caches.append(hooks.cache_transform(cache, device))
        return caches[-1]
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

    timer = SpanTimer(device)
    deliveries: list[float] = []
    with contextlib.ExitStack() as scope:
        decoder = None
        if decode is not None:
            decoder = _decode_to_throwaway_video(scope, recipe, decode, device, dtype, deliveries)
        timer.start()
        with sdpa_backend(runtime.attention):
            for chunk in stream_latents(model, noise, [context] * chunks, stream,
                                        negative_context=negative,
                                        cache_transform=cache_transform if hooks.cache_transform else None):
                timer.stop()  # the chunk is denoised
                if decoder is not None:
                    decoder.submit(chunk.latents)
                timer.start()  # handed to the decoder (in sync mode: decoded)
                if on_chunk is not None:
                    on_chunk(chunk.index + 1, chunks)
        if decoder is not None:
            decoder.finish()
    seconds = timer.durations()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        reserved = torch.cuda.max_memory_reserved(device) / 2**30
        name = torch.cuda.get_device_name(device)
    else:
        peak = reserved = None
        name = "cpu"
    steady = seconds[window_chunks:]
    median = statistics.median(steady)
    tokens = tokens_per_frame(model, video.latent_height, video.latent_width)
    if not caches:  # the plain caches, as the pipeline allocates them (sized on meta: no memory)
        branches = 2 if stream.uses_guidance else 1
        caches = [allocate_cache(model, stream, 1, tokens, "meta")] * branches
    kv_bytes = sum(storage_bytes(cache) for cache in caches)
    e2e = statistics.median([b - a for a, b in zip(deliveries[window_chunks:-1], deliveries[window_chunks + 1:],
                                                   strict=True)]) if decode is not None else None
    dit_fps = VAE_TEMPORAL_STRIDE * fpb / median
    vae_peak = None
    if decode is not None and decode.startswith("device:"):
        vae_peak = torch.cuda.max_memory_allocated(int(decode.split(":")[1])) / 2**30
    return BenchResult(
        decode=decode, e2e_seconds_per_block=e2e,
        e2e_fps=None if e2e is None else VAE_TEMPORAL_STRIDE * fpb / e2e,
        e2e_over_dit=None if e2e is None else (VAE_TEMPORAL_STRIDE * fpb / e2e) / dit_fps,
        vae_peak_memory_gib=vae_peak,
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
        parameters=logical_parameters(recipe), storage=hooks.label or "bf16",
        weights_gib=storage_bytes(model) / 2**30,
        kv_cache_gib=kv_bytes / 2**30, peak_memory_gib=peak, peak_reserved_gib=reserved,
        torch_version=torch.__version__,
        cudnn_version=torch.backends.cudnn.version() if device.type == "cuda" else None)


def _decode_to_throwaway_video(scope: contextlib.ExitStack, recipe: Recipe, decode: str,
                               device: torch.device, dtype: torch.dtype, deliveries: list[float]):
    """A random-weight VAE decoder feeding an mp4 in a temp folder; records delivery times."""
    from core.decode import VideoWriter, check_decode_mode, make_decoder
    from core.vae import random_vae

    vae_device = check_decode_mode(decode, device)
    if vae_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(vae_device)
    vae = random_vae(recipe.vae, recipe.runtime.seed, device=vae_device, dtype=dtype)
    if wants_compile(recipe.runtime.compile, vae_device):
        compile_vae_decoder(vae)  # and compile it now: the steady state must not include that
        warm_up_vae_decoder(vae, recipe.video.latent_height, recipe.video.latent_width,
                            recipe.stream.frames_per_block)
    folder = Path(scope.enter_context(tempfile.TemporaryDirectory(prefix="longlive-bench-")))
    writer = scope.enter_context(VideoWriter(folder / "bench.mp4", recipe.video.width,
                                             recipe.video.height))

    def sink(frames) -> None:
        deliveries.append(time.perf_counter())
        writer.write(frames)

    decoder = make_decoder(decode, vae, sink)
    if hasattr(decoder, "close"):
        scope.callback(decoder.close)
    return decoder


@dataclass
class VaeBenchResult:
    device_name: str
    dtype: str
    height: int
    width: int
    latents_per_chunk: int
    frames_per_chunk: int
    first_chunk_seconds: float  # includes compilation when compiled
    seconds_per_chunk: float  # median over the chunks after the first
    peak_memory_gib: float | None
    compiled: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def run_vae_benchmark(recipe: Recipe, chunks: int = 5) -> VaeBenchResult:
    """Streaming VAE decode of `chunks` chunks of frames_per_block random latents."""
    from core.vae import random_vae

    device = resolve_device(recipe.runtime.device)
    dtype = resolve_dtype(recipe.runtime.dtype, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    vae = random_vae(recipe.vae, recipe.runtime.seed, device=device, dtype=dtype)
    compiled = wants_compile(recipe.runtime.compile, device)
    if compiled:
        compile_vae_decoder(vae)
    video, fpb = recipe.video, recipe.stream.frames_per_block
    generator = torch.Generator(device=device).manual_seed(recipe.runtime.seed)
    latents = torch.randn(1, 48, fpb * chunks, video.latent_height, video.latent_width,
                          generator=generator, device=device, dtype=dtype)
    decoder = vae.streaming_decoder()
    seconds = []
    with torch.no_grad():
        for c in range(chunks):
            started = time.perf_counter()
            start = end = None
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            frames = decoder.decode(latents[:, :, c * fpb:(c + 1) * fpb]).shape[2]
            if device.type == "cuda":
                end.record()
                end.synchronize()
                seconds.append(start.elapsed_time(end) / 1000)
            else:
                seconds.append(time.perf_counter() - started)
    return VaeBenchResult(
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        dtype=str(dtype).split(".")[-1], height=video.height, width=video.width,
        latents_per_chunk=fpb, frames_per_chunk=frames, first_chunk_seconds=seconds[0],
        seconds_per_chunk=statistics.median(seconds[1:]) if chunks > 1 else seconds[0],
        peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        compiled=compiled)
