"""`generate`, `multishot` and `bench` on several processes: `dp x cfg x sp` ranks (torchrun).

The parent checks the layout (one line, exit 2, before any work) and re-executes the same command
under torchrun (`sp.launcher.relaunch`, the arguments written back from the parsed command). In
each worker: its device, the process group, the mesh (`sp.mesh.InferenceMesh`), its models
(`longlive_cli/build.py: build_rank_models`). Every rank of a replica then runs the one-process
generation code (`core.generate.generate_video`): the replica root encodes the prompts and writes
the video; the other ranks receive the text, compute their frames / heads / branch, and write
nothing (an empty file in a temporary folder). Global rank 0 alone prints.

Replicas (`dp = world / (cfg x sp)`) make one video each: replica g uses seed `seed + g` and
writes `<output stem>-seed<seed + g>.mp4` (bench: every replica runs the benchmark; the summed
throughput is reported).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import typer
from rich.console import Console

from core.config import Recipe, chunk_video_frames, overlay
from core.decode import DecodeMode
from core.errors import UserError
from sp.launcher import Launch, local_device, process_group, relaunch, under_torchrun, world_size
from sp.mesh import InferenceMesh, check_inference_layout


@dataclass(frozen=True)
class InferenceLayout:
    """The processes of an inference command: torchrun's launch, the SP size, the CFG split."""

    launch: Launch = field(default_factory=Launch)
    sp: int = 1
    cfg_parallel: bool = False
    argv: tuple[str, ...] = ()  # the command as CLI arguments, for the torchrun re-execution

    @property
    def cfg(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def requested(self) -> bool:
        """More than one process, or a parallel plan (checked by `check_layout`)."""
        return self.launch.world_size > 1 or self.sp > 1 or self.cfg_parallel


def check_layout(layout: InferenceLayout, recipe: Recipe, decode: DecodeMode | None,
                 interactive: bool = False) -> None:
    """Every check of a parallel inference run, one line each (UserError), before any work."""
    world = world_size(layout.launch)
    if world % (layout.sp * layout.cfg) and layout.launch.world_size == 1:
        raise UserError(f"--sp {layout.sp}{' --cfg-parallel' if layout.cfg_parallel else ''} needs "
                        f"{layout.sp * layout.cfg} processes: add --nproc-per-node {layout.sp * layout.cfg}")
    check_inference_layout(world, layout.sp, layout.cfg, recipe.model.num_heads, recipe.stream.frames_per_block)
    if layout.cfg_parallel and not recipe.stream.uses_guidance:
        raise UserError("--cfg-parallel splits the two guidance branches, but guidance is off: set "
                        "--set stream.guidance_scale=G (G != 1), or drop --cfg-parallel")
    replicas = world // (layout.sp * layout.cfg)
    if interactive and replicas > 1:
        raise UserError(f"--interactive drives one video, but {world} processes make {replicas} replicas of "
                        f"--sp {layout.sp}: launch {layout.sp * layout.cfg} processes")
    if decode is not None and decode.kind == "device" and decode.gpu < layout.launch.nproc_per_node:
        raise UserError(f"--decode {decode}: GPU {decode.gpu} runs DiT rank {decode.gpu}; give the VAE a GPU no "
                        f"rank uses (device:{layout.launch.nproc_per_node} or above), or use --decode split")


def command_line(ctx: typer.Context) -> tuple[str, ...]:
    """The invoked command as CLI arguments: every parsed parameter written back (what the torchrun
    workers re-execute)."""
    args = [ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None:
            continue
        if param.param_type_name == "argument":
            args.append(str(value))
        elif param.is_flag:
            if value or param.secondary_opts:
                args.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            for item in value if param.multiple else [value]:
                args += [param.opts[0], str(item)]
    return tuple(args)


def _relaunch(layout: InferenceLayout) -> None:
    from longlive_cli.app import interrupted

    with interrupted("nothing half-written was left (videos finished before it are kept)"):
        code = relaunch(layout.launch, layout.argv, log_level="ERROR")
    if code:
        raise typer.Exit(code)


def _replica_request(request, mesh: InferenceMesh):
    """Replica g of several: seed + g, and the seed in the output names."""
    if mesh.replicas == 1:
        return request
    seed = request.recipe.runtime.seed + mesh.replica

    def named(path: Path | None) -> Path | None:
        return None if path is None else path.with_name(f"{path.stem}-seed{seed}{path.suffix}")

    return replace(request, recipe=overlay(request.recipe, {"runtime": {"seed": seed}}),
                   output=named(request.output), latents_out=named(request.latents_out))


# ----------------------------------------------------------------------------------------------
# generate / multishot


def run_generate(request, layout: InferenceLayout, prompt_source: Callable[[], Callable] | None,
                 show: Callable[[object], None]) -> None:
    """Check, then re-execute under torchrun (the parent) or run this rank (a worker); global rank 0
    calls `show(report)` for every replica's video. `prompt_source()` makes the terminal reader of
    an interactive run (called on the root only)."""
    check_layout(layout, request.recipe, request.decode, interactive=prompt_source is not None)
    if not under_torchrun():
        _relaunch(layout)
        return
    device = local_device(request.recipe.runtime.device)
    with process_group(device):
        mesh = InferenceMesh.build(layout.sp, layout.cfg)
        report = _generate_rank(request, device, mesh, prompt_source)
        reports = [None] * mesh.world
        dist.all_gather_object(reports, report)
        main = mesh.rank == 0
    if main:
        for report in reports:
            if report is not None:
                show(report)


def _generate_rank(request, device: torch.device, mesh: InferenceMesh, prompt_source):
    """This rank's part of its replica's video; the report on the replica root, else None."""
    from core.generate import prepare
    from core.interactive import live_prompts
    from longlive_cli.build import build_rank_models, generation_spec
    from sp.replica import BroadcastFeed

    request = _replica_request(request, mesh)
    root = mesh.is_replica_root
    with tempfile.TemporaryDirectory(prefix="longlive-rank-") as scratch:
        if not root:  # checks nothing on the root's output path (it may not exist on this node)
            request = replace(request, output=Path(scratch) / "rank.mp4", latents_out=None)
        placement = prepare(request)
    placement = replace(placement, device=device, vae_device=request.decode.vae_device(device))
    models = build_rank_models(request, placement, generation_spec(request, placement), mesh)
    prompts = None
    if prompt_source is not None:  # typed on the root, encoded there on its own thread, then shared
        local = None
        if root:
            local = live_prompts(prompt_source(), models.text.encoder, device, placement.dtype)
        prompts = BroadcastFeed(local, mesh.replica_group, mesh.replica_root, device)
    if root:
        return _write_video(request, placement, models, prompts, mesh.rank == 0)
    _follow(request, placement, models, prompts)
    return None


def _write_video(request, placement, models, prompts, main: bool):
    """The replica root: the one-process run (`core.generate.generate_video`) with its writer."""
    from core.generate import generate_video

    def log(text: str) -> None:
        if main:
            Console(stderr=True).print(text, highlight=False)

    with _progress(main, request.recipe, "generate", request.schedule.num_chunks) as on_chunk:
        return generate_video(request, placement, models, on_chunk, prompts, log=log)


def _follow(request, placement, models, prompts) -> None:
    """A rank that writes nothing: the same engine stages; with `--decode split` its band of every
    chunk goes to the root."""
    from core.decode import make_decoder
    from core.generate import stream_schedule
    from core.interactive import open_feed

    decoder = make_decoder(request.decode, models.vae, lambda frames: None) \
        if request.decode.kind == "split" else None
    with open_feed(prompts, None, placement.device, placement.dtype) as feed:
        for chunk in stream_schedule(request, placement, models, feed, log=lambda text: None):
            if decoder is not None:
                decoder.submit(chunk.latents)


@contextlib.contextmanager
def _progress(show: bool, recipe: Recipe, name: str, total: int | None):
    """`on_chunk(done, total)` updating a progress bar where `show`, else doing nothing."""
    if not show:
        yield lambda done, total: None
        return
    from longlive_cli.progress import TaskProgress, count_of, per_second

    rate = per_second("frames/s", chunk_video_frames(recipe.stream.frames_per_block))
    with TaskProgress(name, count_of("chunks"), console=Console(stderr=True), total=total, rate=rate) as progress:
        progress.start()
        yield progress.update


# ----------------------------------------------------------------------------------------------
# bench


def run_bench(recipe: Recipe, spec, frames: int | None, decode: DecodeMode | None, layout: InferenceLayout,
              show: Callable[[object], None]) -> None:
    """`longlive bench` on every replica at once; global rank 0 shows replica 0's result with the
    layout and the summed throughput of all replicas."""
    check_layout(layout, recipe, decode)
    if decode is not None and decode.kind == "split":
        raise UserError("bench --decode split is not measured here: compare end-to-end fps with `longlive "
                        "generate --decode split` (or use sync, stream, device:N)")
    if not under_torchrun():
        _relaunch(layout)
        return
    device = local_device(recipe.runtime.device)
    with process_group(device):
        mesh = InferenceMesh.build(layout.sp, layout.cfg)
        result = _bench_rank(recipe, replace(spec, device=device), frames, decode, mesh)
        results = [None] * mesh.world
        dist.all_gather_object(results, result)
        main = mesh.rank == 0
    if main:
        replicas = [r for r in results if r is not None]
        show(replace(replicas[0], sp=layout.sp, cfg_parallel=layout.cfg_parallel, replicas=len(replicas),
                     total_fps=sum(r.fps for r in replicas)))


def _bench_rank(recipe: Recipe, spec, frames: int | None, decode: DecodeMode | None, mesh: InferenceMesh):
    from core.benchmark import run_benchmark
    from longlive_cli.build import build_dit
    from sp.inference import apply_inference_sp

    dit = apply_inference_sp(build_dit(spec), mesh.sp_group, mesh.cfg_group)
    with _progress(mesh.rank == 0, recipe, f"bench {recipe.preset}", None) as on_chunk:
        result = run_benchmark(recipe, dit, frames, on_chunk, decode=decode if mesh.is_replica_root else None)
    return result if mesh.is_replica_root else None
