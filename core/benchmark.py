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
from core.config import Recipe, StreamConfig, check_whole_blocks, chunk_video_frames
from core.decode import DecodeMode
from core.dit import module_bytes
from core.optimize import compile_vae_decoder, wants_compile, warm_up_vae_decoder
from core.pipeline import BuiltDiT, allocate_cache, stream_latents, tokens_per_frame
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
    # the H.264 writer's encode time per chunk (median over the same chunks): when it is as long as
    # e2e_seconds_per_block, the writer bounds the run, not the GPU. Random weights decode to
    # noise, x264's worst case (~6.7x the time of smooth content: docs/BENCHMARKS.md)
    writer_seconds_per_block: float | None = None
    # with --gpu-busy: the last chunk under the CUDA profiler (not in the steady statistics): the share
    # of its span (first kernel start to last kernel end) in which a kernel ran, i.e. at most what
    # CUDA graphs could recover is 1 - gpu_busy_fraction; kernels launched in that chunk
    gpu_busy_fraction: float | None = None
    gpu_idle_ms_per_block: float | None = None
    gpu_kernels_per_block: int | None = None
    # the same chunk's kernels grouped by name, longest total first (the first GPU_TOP_KERNELS):
    # {"name", "ms", "calls", "share"}; where the block's time goes, for the next optimisation
    gpu_top_kernels: list[dict] | None = None
    storage: str = "bf16"  # e.g. "nvfp4 w4a16 (mse), kv nvfp4 (mse)"
    # parallel runs (longlive_cli/parallel_inference.py): the layout, and fps summed over replicas
    sp: int = 1
    cfg_parallel: bool = False
    replicas: int = 1
    total_fps: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def bench_length(stream: StreamConfig, frames: int | None) -> tuple[int, int, int]:
    """(latent frames, chunks, chunks that fill the window) of a benchmark run; `frames` None:
    the window fill + 6 chunks. ValueError unless the run reaches steady state (no model needed)."""
    fpb = stream.frames_per_block
    window_chunks = -(-stream.local_window_frames // fpb)
    frames = (window_chunks + 6) * fpb if frames is None else frames
    chunks = check_whole_blocks(frames, fpb, "frames")
    if chunks <= window_chunks:
        raise ValueError(f"frames must exceed the {window_chunks * fpb} frames that fill the "
                         f"window, to reach steady state (got {frames})")
    return frames, chunks, window_chunks


def run_benchmark(recipe: Recipe, dit: BuiltDiT, frames: int | None = None,
                  on_chunk: Callable[[int, int], None] | None = None,
                  decode: DecodeMode | None = None, gpu_busy: bool = False) -> BenchResult:
    """Stream `frames` latent frames (default: the window fill + 6 chunks) through `dit` (built
    by `longlive_cli/build.py`, random weights unless a checkpoint was given) and report the
    steady-state timings. With `decode` every chunk is also decoded by a random-weight VAE and
    written to a throwaway mp4, and the delivery rate of finished frames is reported as
    end-to-end fps. Weight and cache sizes are those of the storage actually used. With
    `gpu_busy` (CUDA) the last chunk runs under the profiler and reports how busy the GPU was."""
    stream, video, runtime = recipe.stream, recipe.video, recipe.runtime
    model = dit.model
    device, dtype = next(model.parameters()).device, model.dtype
    frames, chunks, window_chunks = bench_length(stream, frames)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = model.config
    generator = torch.Generator(device=device).manual_seed(runtime.seed)
    noise = torch.randn(1, frames, cfg.in_channels, video.latent_height, video.latent_width,
                        generator=generator, device=device, dtype=dtype)
    context = torch.zeros(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype)
    context[:, :64] = torch.randn(1, 64, cfg.text_dim, generator=generator, device=device,
                                  dtype=dtype)
    negative = torch.randn_like(context) if stream.uses_guidance else None

    if gpu_busy and device.type != "cuda":
        raise ValueError("--gpu-busy profiles CUDA kernels: it needs a CUDA GPU")
    if gpu_busy and chunks - window_chunks < 2:
        raise ValueError("--gpu-busy profiles the last chunk and needs two steady chunks: give more --frames")
    timer = SpanTimer(device)
    deliveries: list[float] = []
    encodes: list[float] = []  # the writer's own list (filled by its thread)
    profiler = None
    with contextlib.ExitStack() as scope:
        decoder = None
        if decode is not None:
            decoder, encodes = _decode_to_throwaway_video(scope, recipe, decode, device, dtype, deliveries)
        timer.start()
        with sdpa_backend(runtime.attention):
            for chunk in stream_latents(model, noise, [context] * chunks, stream, negative_context=negative,
                                        kv_storage=dit.kv_storage, branch_placement=dit.branches):
                timer.stop()  # the chunk is denoised
                if profiler is not None:
                    torch.cuda.synchronize(device)
                    profiler.stop()
                if decoder is not None:
                    decoder.submit(chunk.latents)
                if gpu_busy and chunk.index == chunks - 2:  # profile the last chunk's denoising alone
                    torch.cuda.synchronize(device)
                    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                    profiler.start()
                timer.start()  # handed to the decoder (in sync mode: decoded)
                if on_chunk is not None:
                    on_chunk(chunk.index + 1, chunks)
        if decoder is not None:
            decoder.finish()
    seconds = timer.durations()
    steady = seconds[window_chunks:-1] if gpu_busy else seconds[window_chunks:]  # the profiled chunk is apart
    e2e = statistics.median([b - a for a, b in zip(deliveries[window_chunks:-1], deliveries[window_chunks + 1:],
                                                   strict=True)]) if decode is not None else None
    result = _result(recipe, dit, chunks, seconds, steady, e2e, decode)
    if encodes:
        result.writer_seconds_per_block = statistics.median(encodes[window_chunks:] or encodes)
    if profiler is not None:
        events = cuda_kernel_events(profiler)
        kernels = [(start, end) for _, start, end in events]
        busy_us, span_us = busy_time(kernels)
        result.gpu_top_kernels = kernel_table(events, GPU_TOP_KERNELS)
        result.gpu_busy_fraction = busy_us / span_us if span_us else None
        result.gpu_idle_ms_per_block = (span_us - busy_us) / 1e3
        result.gpu_kernels_per_block = len(kernels)
    return result


GPU_TOP_KERNELS = 25


def cuda_kernel_events(profiler: torch.profiler.profile) -> list[tuple[str, float, float]]:
    """`(name, start_us, end_us)` of every GPU kernel (and memcpy / memset) a finished profile saw."""
    return [(e.name, e.time_range.start, e.time_range.end) for e in profiler.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def kernel_table(events: list[tuple[str, float, float]], top: int) -> list[dict]:
    """Kernels `(name, start_us, end_us)` grouped by name: the `top` longest in total, each with its
    total milliseconds, number of calls and share of all kernel time (overlaps counted twice)."""
    totals: dict[str, list[float]] = {}
    for name, start, end in events:
        entry = totals.setdefault(name, [0.0, 0])
        entry[0] += end - start
        entry[1] += 1
    whole = sum(us for us, _ in totals.values())
    ranked = sorted(totals.items(), key=lambda item: (-item[1][0], item[0]))[:top]
    return [{"name": name, "ms": us / 1e3, "calls": int(calls), "share": us / whole if whole else 0.0}
            for name, (us, calls) in ranked]


def busy_time(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(length of the union of `[start, end)` intervals, span from the first start to the last end)."""
    if not intervals:
        return 0.0, 0.0
    ordered = sorted(intervals)
    busy, (run_start, run_end) = 0.0, ordered[0]
    for start, end in ordered[1:]:
        if start > run_end:  # a gap: close the run
            busy += run_end - run_start
            run_start, run_end = start, end
        else:
            run_end = max(run_end, end)
    busy += run_end - run_start
    return busy, max(end for _, end in ordered) - ordered[0][0]


def _result(recipe: Recipe, dit: BuiltDiT, chunks: int, seconds: list[float], steady: list[float],
            e2e: float | None, decode: DecodeMode | None) -> BenchResult:
    stream, video, runtime = recipe.stream, recipe.video, recipe.runtime
    model = dit.model
    device = next(model.parameters()).device
    chunk_frames = chunk_video_frames(stream.frames_per_block)
    median = statistics.median(steady)
    tokens = tokens_per_frame(model, video.latent_height, video.latent_width)
    branches = 2 if stream.uses_guidance else 1
    if dit.branches is not None:  # the caches this process holds (sized on meta: no memory)
        branches = len(dit.branches.held(branches))
    kv_bytes = branches * allocate_cache(model, stream, 1, tokens, "meta", dit.kv_storage).nbytes
    cuda = device.type == "cuda"
    vae_peak = None
    if decode is not None and decode.kind == "device":
        vae_peak = torch.cuda.max_memory_allocated(decode.gpu) / 2**30
    return BenchResult(
        decode=None if decode is None else str(decode), e2e_seconds_per_block=e2e,
        e2e_fps=None if e2e is None else chunk_frames / e2e,
        e2e_over_dit=None if e2e is None else median / e2e,
        vae_peak_memory_gib=vae_peak,
        preset=recipe.preset, device=str(device), device_name=torch.cuda.get_device_name(device) if cuda else "cpu",
        dtype=str(model.dtype).split(".")[-1], attention=runtime.attention, compiled=dit.compiled,
        height=video.height, width=video.width, latent_height=video.latent_height,
        latent_width=video.latent_width, tokens_per_frame=tokens, frames_per_block=stream.frames_per_block,
        local_window_frames=stream.local_window_frames, sink_frames=stream.sink_frames,
        sampling_steps=stream.sampling_steps, chunks=chunks, steady_chunks=len(steady),
        seconds_per_block=median, seconds_per_block_mean=statistics.fmean(steady),
        seconds_per_block_min=min(steady), seconds_per_block_max=max(steady),
        first_chunk_seconds=seconds[0], fps=chunk_frames / median,
        parameters=dit.parameters, storage=dit.label or "bf16",
        weights_gib=module_bytes(model) / 2**30, kv_cache_gib=kv_bytes / 2**30,
        peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
        torch_version=torch.__version__, cudnn_version=torch.backends.cudnn.version() if cuda else None)


def _decode_to_throwaway_video(scope: contextlib.ExitStack, recipe: Recipe, decode: DecodeMode,
                               device: torch.device, dtype: torch.dtype, deliveries: list[float]):
    """A random-weight VAE decoder feeding an mp4 in a temp folder; records delivery times. Returns
    the decoder and the writer's per-chunk encode times (filled as it works)."""
    from core.decode import VideoWriter, make_decoder
    from core.vae import random_vae

    vae_device = decode.vae_device(device)
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
    return decoder, writer.encode_seconds


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
