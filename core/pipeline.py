"""Streaming generation of latents, chunk by chunk (the official LongLive 2.0 inference loop).

Stages: validate and plan the chunks -> allocate the KV caches -> for each chunk: prepare its
prompt, denoise it with a fresh few-step sampler, rewrite its cache slots from the clean result
(the t = 0 recache pass), pin it as a shot sink at a scene cut -> hand it to the consumer.

`stream_latents` yields each finished chunk (a decoder consumes them while later chunks are
still denoising); `generate_latents` collects them. Latents are `[B, F, C, H, W]` here, in the
normalized latent space; the DiT itself takes `[B, C, F, H, W]`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from core.config import StreamConfig, check_whole_blocks
from core.dit import CausalWanDiT, TextConditioning
from core.kv_cache import CacheLayout, KVCache, StorageFactory
from core.sampler import FlowUniPCSampler


class BranchPlacement(Protocol):
    """Where the guidance branches of a run (0: the prompt, 1: the negative prompt) are evaluated.

    `held(count)`: the branches whose caches and forwards live in this process. `flows(local)`:
    every branch's flow, in branch order, from this process's own (`{branch: flow}`). One process
    holds them all (`AllBranchesHere`); `sp/cfg.py` puts each branch on its own group of ranks."""

    def held(self, count: int) -> tuple[int, ...]: ...

    def flows(self, local: Mapping[int, Tensor]) -> list[Tensor]: ...


class AllBranchesHere:
    """The one-process placement: every branch here, evaluated in turn."""

    def held(self, count: int) -> tuple[int, ...]:
        return tuple(range(count))

    def flows(self, local: Mapping[int, Tensor]) -> list[Tensor]:
        return [local[i] for i in sorted(local)]


ALL_BRANCHES_HERE = AllBranchesHere()


@dataclass
class BuiltDiT:
    """A ready DiT and the KV-cache storage that goes with it (made by `longlive_cli/build.py`)."""

    model: CausalWanDiT
    kv_storage: StorageFactory | None = None  # None: dense caches in the model's dtype
    label: str = ""  # the storage, for summaries ("" for plain bf16)
    parameters: int = 0  # logical parameter count, whatever the storage
    compiled: bool = False  # blocks compiled (core.optimize.compile_blocks)
    branches: BranchPlacement | None = None  # None: every guidance branch in this process


@dataclass(frozen=True)
class ChunkPlan:
    index: int
    start_frame: int
    num_frames: int
    context: Tensor  # [B, <=T, text_dim]
    rope_offset: float  # shot_index * shot_rope_offset
    scene_cut: bool  # first chunk of a new shot (never chunk 0)
    pin_shot_sink: bool  # scene cut with a multi-shot sink: pin this chunk after its recache


@dataclass(frozen=True)
class LatentChunk:
    index: int
    start_frame: int
    latents: Tensor  # [B, f, C, H, W]


# -- stage 1: validate and plan ---------------------------------------------------------------


def plan_chunks(model: CausalWanDiT, noise: Tensor, chunk_contexts: Sequence[Tensor],
                stream: StreamConfig, scene_cuts: Sequence[bool] | None = None,
                image_latent: Tensor | None = None,
                negative_context: Tensor | None = None) -> list[ChunkPlan]:
    """Validate the inputs of a streaming run (one line per problem, ValueError) and cut it into
    chunks: each chunk's frames, prompt, RoPE shot offset, and whether it starts a new shot and
    is pinned as a shot sink."""
    cfg = model.config
    if noise.dim() != 5 or noise.shape[2] != cfg.in_channels:
        raise ValueError(f"noise must be [B, F, {cfg.in_channels}, H, W] (got {tuple(noise.shape)})")
    batch, frames = noise.shape[:2]
    fpb = stream.frames_per_block
    num_chunks = check_whole_blocks(frames, fpb, "noise")
    if noise.dtype != model.dtype:
        raise ValueError(f"noise dtype {noise.dtype} differs from the model dtype {model.dtype}")
    if len(chunk_contexts) != num_chunks:
        raise ValueError(f"got {len(chunk_contexts)} chunk contexts for {num_chunks} chunks "
                         f"({frames} frames / {fpb} per block): give one per chunk")
    for i, context in enumerate(chunk_contexts):
        if context.dim() != 3 or context.shape[0] != batch or context.shape[-1] != cfg.text_dim \
                or context.shape[1] > cfg.text_len:
            raise ValueError(f"chunk context {i} must be [{batch}, <={cfg.text_len}, "
                             f"{cfg.text_dim}] (got {tuple(context.shape)})")
    if scene_cuts is None:
        scene_cuts = [False] * num_chunks
    if len(scene_cuts) != num_chunks:
        raise ValueError(f"got {len(scene_cuts)} scene-cut flags for {num_chunks} chunks")
    if image_latent is not None and tuple(image_latent.shape) != (batch, 1, *noise.shape[2:]):
        raise ValueError(f"image latent must be [{batch}, 1, {', '.join(map(str, noise.shape[2:]))}] "
                         f"(got {tuple(image_latent.shape)})")
    if stream.uses_guidance and negative_context is None:
        raise ValueError(f"guidance_scale={stream.guidance_scale} needs a negative prompt "
                         f"context (or set guidance_scale to 1.0 to disable guidance)")

    plans = []
    shot_index = 0
    for i, context in enumerate(chunk_contexts):
        cut = bool(scene_cuts[i]) and i > 0  # a cut before the first chunk means nothing
        if cut and stream.shot_rope_offset != 0:
            shot_index += 1
        plans.append(ChunkPlan(index=i, start_frame=i * fpb, num_frames=fpb, context=context,
                               rope_offset=shot_index * stream.shot_rope_offset, scene_cut=cut,
                               pin_shot_sink=cut and stream.pins_shot_sink))
    return plans


# -- stage 2: caches --------------------------------------------------------------------------


def allocate_cache(model: CausalWanDiT, stream: StreamConfig, batch: int, tokens_per_frame: int,
                   device: torch.device | str, storage: StorageFactory | None = None) -> KVCache:
    """A KV cache for `model` under `stream`; `storage` (default dense) builds each layer."""
    cfg = model.config
    layout = CacheLayout.from_stream(stream, tokens_per_frame)
    return KVCache(layout, cfg.num_layers, batch, cfg.num_heads, cfg.head_dim, model.dtype, device,
                   **({} if storage is None else {"storage": storage}))


def tokens_per_frame(model: CausalWanDiT, height: int, width: int) -> int:
    _, ph, pw = model.config.patch_size
    return (height // ph) * (width // pw)


@dataclass
class Branch:
    """One guidance branch: its cache and its text (positive prompt or negative prompt)."""

    cache: KVCache
    text: TextConditioning | None = None


# -- stage 3: one chunk -----------------------------------------------------------------------


def _model_call(model: CausalWanDiT, latents_BfCHW: Tensor, t_Bf: Tensor, branch: Branch,
                plan: ChunkPlan, keep_kv: bool = True) -> Tensor:
    flow = model.forward_chunk(latents_BfCHW.permute(0, 2, 1, 3, 4), t_Bf, branch.text,
                               cache=branch.cache, start_frame=plan.start_frame,
                               rope_offset=plan.rope_offset, keep_kv=keep_kv)
    return flow.permute(0, 2, 1, 3, 4)


def _condition_image(latents: Tensor, image_latent: Tensor | None) -> Tensor:
    """I2V: the conditioning latent replaces frame 0 (not an extra frame)."""
    if image_latent is None:
        return latents
    latents = latents.clone()
    latents[:, :1] = image_latent.to(latents.dtype)
    return latents


def denoise_chunk(model: CausalWanDiT, noise_BfCHW: Tensor, plan: ChunkPlan,
                  stream: StreamConfig, branches: Mapping[int, Branch],
                  image_latent: Tensor | None = None, placement: BranchPlacement = ALL_BRANCHES_HERE) -> Tensor:
    """Run the sampler over one chunk. `branches`: this process's branches by index (0 positive,
    1 negative); `placement` collects every branch's flow (all here by default)."""
    batch = noise_BfCHW.shape[0]
    sampler = FlowUniPCSampler(stream.sampling_steps, stream.timestep_shift,
                               stream.num_train_timesteps)
    latents = noise_BfCHW
    for t in sampler.timesteps:
        timestep = torch.full((batch, plan.num_frames), float(t), device=latents.device,
                              dtype=torch.float32)
        latents = _condition_image(latents, image_latent)
        if image_latent is not None:
            timestep[:, 0] = 0  # the conditioning frame is clean
        # The recache pass rewrites this chunk's keys/values, so a step's need not be stored.
        flows = placement.flows({i: _model_call(model, latents, timestep, branch, plan, keep_kv=False)
                                 for i, branch in branches.items()})
        flow = flows[0]
        if len(flows) == 2:
            flow_uncond = flows[1]
            flow = flow_uncond + stream.guidance_scale * (flow - flow_uncond)
        latents = _condition_image(sampler.step(flow, latents), image_latent)
    return latents


def recache_chunk(model: CausalWanDiT, latents_BfCHW: Tensor, plan: ChunkPlan,
                  stream: StreamConfig, branches: Sequence[Branch]) -> None:
    """Rewrite the chunk's K/V from its clean latents (t = 0) in this process's `branches`; pin
    it at a scene cut."""
    if plan.pin_shot_sink and stream.shot_clean_recache:
        for branch in branches:
            branch.cache.drop_history(plan.start_frame)
    zeros = torch.zeros(latents_BfCHW.shape[:2], device=latents_BfCHW.device, dtype=torch.float32)
    for branch in branches:
        _model_call(model, latents_BfCHW, zeros, branch, plan)
    if plan.pin_shot_sink:
        for branch in branches:
            branch.cache.pin_last_chunk(plan.num_frames)


def recache_window(model: CausalWanDiT, clean_BFCHW: Tensor, frame_offsets: Tensor,
                   branch: Branch) -> None:
    """Re-encode everything the cache holds with `branch.text` (an interactive prompt switch,
    as LongLive 1.0 does): clean latents at t = 0, each held range at its own buffer position and
    RoPE position, attending to the ranges before it, in buffer order."""
    cache = branch.cache
    for held in cache.held_frames():
        frames = slice(held.first_frame, held.first_frame + held.num_frames)
        latents = clean_BFCHW[:, frames]
        zeros = torch.zeros(latents.shape[:2], device=latents.device, dtype=torch.float32)
        model.forward_chunk(latents.permute(0, 2, 1, 3, 4), zeros, branch.text, cache=cache,
                            start_frame=held.first_frame, rope_offset=frame_offsets[frames],
                            rewrite_at=held.buffer_frame)


# -- the loop ---------------------------------------------------------------------------------

PromptSwitch = Callable[[int], Tensor | None]


@torch.no_grad()
def stream_latents(model: CausalWanDiT, noise: Tensor, chunk_contexts: Sequence[Tensor],
                   stream: StreamConfig, scene_cuts: Sequence[bool] | None = None, *,
                   image_latent: Tensor | None = None, negative_context: Tensor | None = None,
                   prompt_switch: PromptSwitch | None = None,
                   kv_storage: StorageFactory | None = None,
                   branch_placement: BranchPlacement | None = None) -> Iterator[LatentChunk]:
    """Yield every finished latent chunk in order (see `generate_latents`).

    `kv_storage` builds every cache layer's storage (default dense, in the model's dtype): how
    another format (e.g. `quant.kv.nvfp4_storage`) plugs in without the pipeline knowing it.
    `branch_placement`: which guidance branches this process evaluates (default: all of them).

    `prompt_switch(chunk_index)` is asked before every chunk after the first; a returned context
    replaces the prompt from that chunk on (until the schedule's next scene cut) and the cached
    window is re-encoded with it first."""
    plans = plan_chunks(model, noise, chunk_contexts, stream, scene_cuts, image_latent,
                        negative_context)
    batch, _, _, height, width = noise.shape
    tokens = tokens_per_frame(model, height, width)

    def new_cache() -> KVCache:
        return allocate_cache(model, stream, batch, tokens, noise.device, kv_storage)

    placement = branch_placement if branch_placement is not None else ALL_BRANCHES_HERE
    branches = {i: Branch(new_cache()) for i in placement.held(2 if stream.uses_guidance else 1)}
    if 1 in branches:
        branches[1].text = model.prepare_text(negative_context)
    positive = branches.get(0)  # None where another process holds the prompt's branch
    # What a window recache needs: the clean latents and RoPE shot offset of every frame so far.
    clean = torch.empty_like(noise) if prompt_switch is not None else None
    frame_offsets = torch.zeros(noise.shape[1], dtype=torch.float64) if prompt_switch is not None else None
    override: Tensor | None = None
    text_source: Tensor | None = None  # the context branches[0].text was prepared from
    for plan in plans:
        if plan.scene_cut:
            override = None  # the schedule's next shot takes over again
        switched = prompt_switch(plan.index) if prompt_switch is not None and plan.index else None
        if switched is not None:
            override = switched
        source = override if override is not None else plan.context
        if positive is not None and source is not text_source:
            positive.text, text_source = model.prepare_text(source), source
        if positive is not None and switched is not None:
            recache_window(model, clean, frame_offsets, positive)
        frames = slice(plan.start_frame, plan.start_frame + plan.num_frames)
        first_image = image_latent if plan.index == 0 else None
        latents = denoise_chunk(model, noise[:, frames], plan, stream, branches, first_image, placement)
        recache_chunk(model, latents, plan, stream, list(branches.values()))
        if clean is not None:
            clean[:, frames] = latents
            frame_offsets[frames] = plan.rope_offset
        yield LatentChunk(plan.index, plan.start_frame, latents)


def generate_latents(model: CausalWanDiT, noise: Tensor, chunk_contexts: Sequence[Tensor],
                     stream: StreamConfig, scene_cuts: Sequence[bool] | None = None, *,
                     image_latent: Tensor | None = None,
                     negative_context: Tensor | None = None,
                     kv_storage: StorageFactory | None = None,
                     branch_placement: BranchPlacement | None = None) -> Tensor:
    """Denoise `noise [B, F, C, H, W]` chunk by chunk; returns the final latents (same shape).

    `chunk_contexts`: one text-encoder output `[B, <=text_len, text_dim]` per chunk of
    `stream.frames_per_block` frames. `scene_cuts`: per chunk, True where a new shot starts
    (RoPE shot offset, and a pinned shot sink when `stream.multi_shot_sink`). `image_latent`
    `[B, 1, C, H, W]`: image-to-video conditioning of frame 0. `negative_context`: the
    negative prompt, required when `stream.guidance_scale != 1`. `kv_storage`: the KV cache
    format, `branch_placement`: where the guidance branches run (see `stream_latents`).
    """
    output = torch.empty_like(noise)
    for chunk in stream_latents(model, noise, chunk_contexts, stream, scene_cuts,
                                image_latent=image_latent, negative_context=negative_context,
                                kv_storage=kv_storage, branch_placement=branch_placement):
        output[:, chunk.start_frame:chunk.start_frame + chunk.latents.shape[1]] = chunk.latents
    return output
