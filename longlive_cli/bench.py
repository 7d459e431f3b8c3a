"""`longlive bench`: steady-state seconds per block, video fps and peak GPU memory of the
streaming engine on random weights (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from core.benchmark import bench_length
from core.config import chunk_video_frames
from core.decode import DecodeMode
from core.errors import UserError
from core.optimize import wants_compile
from longlive_cli.app import app, interrupted
from longlive_cli.options import (
    DEFAULTS,
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
    RdzvOpt,
    RecipeOpt,
    SetOpt,
    SpOpt,
    WidthOpt,
    default_note,
    quant_flags,
    resolve_recipe,
)
from longlive_cli.progress import TaskProgress, count_of, per_second

_FRAMES_NOTE = default_note(f"the window fill + 6 chunks ({bench_length(DEFAULTS.stream, None)[0]} for the 5B)")


@app.command()
def bench(
    ctx: typer.Context,
    preset: PresetOpt = None, recipe: RecipeOpt = None, height: HeightOpt = None, width: WidthOpt = None,
    steps: Annotated[int | None, typer.Option(
        help="Sampling steps per chunk." + default_note(DEFAULTS.stream.sampling_steps))] = None,
    window: Annotated[int | None, typer.Option(
        help="Local attention window, latent frames." + default_note(DEFAULTS.stream.local_window_frames))] = None,
    sink: Annotated[int | None, typer.Option(help="Sink frames." + default_note(DEFAULTS.stream.sink_frames))] = None,
    frames_per_block: Annotated[int | None, typer.Option(
        help="Latent frames per chunk." + default_note(DEFAULTS.stream.frames_per_block))] = None,
    frames: Annotated[int | None, typer.Option(
        help="Latent frames to generate, a multiple of the frames per chunk." + _FRAMES_NOTE)] = None,
    checkpoint: Annotated[str | None, typer.Option(help="Generator weights to load (default: random).")] = None,
    lora: Annotated[str | None, typer.Option(help="LoRA file to merge (official layout).")] = None,
    device: DeviceOpt = None,
    dtype: Annotated[str | None, typer.Option(help="auto, bfloat16, float16 or float32.")] = None,
    attention: AttentionOpt = None,
    compile: Annotated[bool | None, typer.Option(
        "--compile/--no-compile", help="torch.compile the blocks (default: on a GPU).")] = None,
    seed: Annotated[int | None, typer.Option(
        help="Seed of the random weights and noise." + default_note(DEFAULTS.runtime.seed))] = None,
    decode: Annotated[DecodeMode | None, typer.Option(
        parser=DecodeMode.parse, metavar="sync|stream|device:N",
        help="Also decode and write every chunk (end-to-end fps).")] = None,
    precision: PrecisionOpt = None, quant_mode: QuantModeOpt = None, kv_precision: KvPrecisionOpt = None,
    vae: Annotated[bool, typer.Option("--vae", help="Time the VAE's streaming decode alone.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON only.")] = False,
    gpu_busy: Annotated[bool, typer.Option(
        "--gpu-busy", help="Profile the last chunk (CUDA): the share of its span with a kernel running, "
        "the idle ms and the kernel count (what CUDA graphs could recover at most).")] = False,
    set_: SetOpt = None,
    nproc_per_node: NprocOpt = 1, nnodes: NnodesOpt = 1, node_rank: NodeRankOpt = 0, rdzv_endpoint: RdzvOpt = None,
    sp: SpOpt = 1, cfg_parallel: CfgParallelOpt = False,
) -> None:
    """Measure the engine: s/block, fps and peak memory at a resolution, steps and window."""
    chosen = resolve_recipe(preset, recipe, set_ or [], {
        "video": {"height": height, "width": width},
        "stream": {"sampling_steps": steps, "local_window_frames": window, "sink_frames": sink,
                   "frames_per_block": frames_per_block},
        "runtime": {"device": device, "dtype": dtype, "attention": attention, "seed": seed,
                    "compile": None if compile is None else ("always" if compile else "never")},
        "quant": quant_flags(precision, quant_mode, kv_precision),
    }, lora)
    from longlive_cli.parallel_inference import InferenceLayout, command_line
    from sp.launcher import Launch

    layout = InferenceLayout(Launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint), sp, cfg_parallel,
                             command_line(ctx))
    _run(chosen, frames, checkpoint, lora, decode, vae, json_output, layout, gpu_busy)


def _run(chosen, frames, checkpoint, lora, decode, vae: bool, json_output: bool, layout,
         gpu_busy: bool = False) -> None:
    from core.benchmark import run_benchmark, run_vae_benchmark
    from core.runtime import resolve_device, resolve_dtype
    from longlive_cli.build import DiTSpec, build_dit, check_dit_spec, show_lora_sampling_note

    target = resolve_device(chosen.runtime.device)
    if chosen.preset != "tiny" and target.type != "cuda":
        raise UserError(f"bench of the {chosen.preset} preset needs a CUDA GPU (5B weights); "
                        f"use --preset tiny on a CPU")
    if gpu_busy and (target.type != "cuda" or vae or layout.requested):
        raise UserError("--gpu-busy profiles the DiT's chunks on one CUDA GPU: use it on a GPU, without --vae "
                        "and without --nproc-per-node")
    if vae:
        with interrupted("nothing was written"):
            _print_vae(run_vae_benchmark(chosen), json_output)
        return
    if decode is not None:
        decode.vae_device(target)
    try:
        _, chunks, _ = bench_length(chosen.stream, frames)  # before building anything
    except ValueError as err:
        raise UserError(str(err)) from None
    spec = DiTSpec.from_recipe(chosen, target, resolve_dtype(chosen.runtime.dtype, target),
                               checkpoint=Path(checkpoint) if checkpoint else None,
                               lora=Path(lora) if lora else None,
                               compile=wants_compile(chosen.runtime.compile, target))
    check_dit_spec(spec)
    show_lora_sampling_note(spec.lora, chosen.stream)  # else: a timing of a setting nobody runs
    if layout.requested:  # several processes (longlive_cli/parallel_inference.py)
        from longlive_cli.parallel_inference import run_bench

        return run_bench(chosen, spec, frames, decode, layout, lambda result: _show(result, json_output))
    console = Console(stderr=True)
    with interrupted("nothing was written"), TaskProgress(
            f"bench {chosen.preset}", count_of("chunks"), console=console, total=chunks,
            rate=per_second("frames/s", chunk_video_frames(chosen.stream.frames_per_block))) as progress:

        def on_chunk(done: int, total: int) -> None:
            progress.update(done, total)

        if target.type == "cuda":
            torch.cuda.set_device(target)
        dit = build_dit(spec)
        progress.start()
        try:
            result = run_benchmark(chosen, dit, frames, on_chunk, decode=decode, gpu_busy=gpu_busy)
        except ValueError as err:
            raise UserError(str(err)) from None
    _show(result, json_output)


def _show(result, json_output: bool) -> None:
    if json_output:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        Console().print(result_table(result))


def _print_vae(result, json_output: bool) -> None:
    if json_output:
        print(json.dumps(result.to_dict(), indent=2))
        return
    Console().print(f"VAE streaming decode {result.height}x{result.width} ({result.dtype}, "
                    f"{result.device_name}): {result.seconds_per_chunk:.3f} s per "
                    f"{result.latents_per_chunk}-latent chunk of {result.frames_per_chunk} frames "
                    f"(first chunk {result.first_chunk_seconds:.3f} s)", highlight=False)


def _gib(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value:.2f} GiB"


def _writer_note(r) -> str:
    """The H.264 writer's time per block, and a note when encoding, not the GPU, sets the
    end-to-end rate (random weights decode to noise, x264's worst case)."""
    if r.writer_seconds_per_block is None:
        return ""
    note = f"; H.264 writer {r.writer_seconds_per_block:.3f} s / block"
    if r.writer_seconds_per_block >= 0.9 * r.e2e_seconds_per_block:
        note += " (the writer bounds this run: noise from random weights is x264's worst case)"
    return note


def result_table(r) -> Table:
    table = Table(title="longlive bench", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("model", f"{r.preset} ({r.parameters / 1e9:.3f} B params, {r.dtype}"
                  f"{'' if r.storage == 'bf16' else ', ' + r.storage})"),
        ("device", f"{r.device} ({r.device_name})"),
        ("resolution", f"{r.height}x{r.width} px, latent {r.latent_height}x{r.latent_width}, "
                       f"{r.tokens_per_frame} tokens/frame"),
        ("stream", f"{r.frames_per_block} frames/block, window {r.local_window_frames}, "
                   f"sink {r.sink_frames}, {r.sampling_steps} steps"),
        ("attention", f"{r.attention}{', compiled blocks' if r.compiled else ''}"),
        ("chunks", f"{r.chunks} ({r.steady_chunks} at steady state)"),
        ("s / block", f"{r.seconds_per_block:.3f} (median; mean {r.seconds_per_block_mean:.3f}, "
                      f"min {r.seconds_per_block_min:.3f}, max {r.seconds_per_block_max:.3f})"),
        ("video fps", f"{r.fps:.1f}"),
        ("first chunk", f"{r.first_chunk_seconds:.3f} s"),
        ("peak GPU memory", _gib(r.peak_memory_gib)),
        *([("end-to-end", f"{r.e2e_seconds_per_block:.3f} s / block, {r.e2e_fps:.1f} fps with --decode "
                          f"{r.decode} ({r.e2e_over_dit:.2f} x the DiT alone){_writer_note(r)}")]
          if r.decode else []),
        ("weights / KV cache", f"{r.weights_gib:.2f} GiB / {r.kv_cache_gib:.2f} GiB"),
        *([("GPU busy (last chunk)", f"{100 * r.gpu_busy_fraction:.1f} % of its span, {r.gpu_idle_ms_per_block:.1f} ms "
                                     f"idle, {r.gpu_kernels_per_block} kernels")]
          if r.gpu_busy_fraction is not None else []),
        *[(f"  kernel {i + 1}", f"{k['ms']:.2f} ms, {k['calls']} calls, {100 * k['share']:.1f} %: {k['name'][:70]}")
          for i, k in enumerate((r.gpu_top_kernels or [])[:8])],
        *([("parallel", f"sp {r.sp}{' x 2 CFG branch groups' if r.cfg_parallel else ''} x {r.replicas} "
                        f"replica(s): {r.total_fps:.1f} fps in all (per-rank cache above)")]
          if r.total_fps is not None else []),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table
