"""DMD distillation: the self-forcing rollout and the distribution-matching losses (LongLive 2.0
`pipeline/self_forcing_training.py`, `model/dmd.py`; reference-systems.md §6, design.md §4 "DMD").

    rollout          per chunk: UniPC steps i < exit (no grad) -> exit step at t_exit (grad)
                     -> x0 = x_t - sigma_grid(t_exit) v -> recache at t = 0 on
                     (1 - s0) x0 + s0 n -> pin at a scene cut
    score_timesteps  raw U{0..999} -> shifted, clamped score timestep
    add_noise        x_t = (1 - s) x + s noise,                       s = sigma_grid(t)
    dmd_gradient     G = (x0_fake - x0_real) / mean_block |x - x0_real|,
                     x0_real = c + g (c - u)   (teacher, conditional / negative prompt)
    generator_loss   0.5 mean((x - sg(x - G))^2)                      (d/dx = G / numel)
    critic_loss      mean((v_fake - (noise - x))^2),    v_fake = (x_t - x0_fake) / s

`sigma_grid(t)` is the sigma of the nearest entry of the 1000-step training grid (not the UniPC
sigma); every x0 <-> velocity conversion runs in float64 and is cast back, as the reference does.
All randomness is the caller's.

The rollout keeps its own KV cache (`RolloutKVCache`): the official training cache never evicts,
windows attention by `local_window_frames` (plus the sink prefix / floating pinned shot sink
before the window), and lets a later chunk's gradient reach the K/V that an earlier chunk wrote
in its exit step, although the values it reads are those of the recache pass:

    k_hist = k_recache + (k_exit - k_exit.detach())        (per layer, keys after RoPE; same for v)

Legend: B batch, F latent frames, f frames of one chunk, C latent channels, H/W latent size,
K chunks (one prompt each), T text slots, D text width, N heads, d head size, S tokens per frame.
Latents are `[B, F, C, H, W]` (as in `core.pipeline`); the DiT takes `[B, C, F, H, W]`.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from core.attention import sdpa
from core.config import StreamConfig
from core.dit import CausalWanDiT, TextConditioning
from core.kv_cache import CacheLayout, CacheState, protected_prefix
from core.pipeline import ChunkPlan, plan_chunks, tokens_per_frame
from core.sampler import FlowUniPCSampler
from core.train.objective import FlowMatchSchedule, x0_estimate

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]
Range = tuple[int, int]  # stream tokens [start, end)


# -- the training grid ------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def training_grid(shift: float = 5.0, num_train_timesteps: int = 1000) -> FlowMatchSchedule:
    """The 1000-step training grid of a shift (built once)."""
    return FlowMatchSchedule(float(shift), num_train_timesteps)


def sigma_grid(t: Tensor, *, shift: float = 5.0, num_train_timesteps: int = 1000) -> Tensor:
    """float32 sigma of the training-grid entry nearest to each timestep (same shape as `t`)."""
    return training_grid(shift, num_train_timesteps).t_to_sigma(t)


def _per_frame(values_BF: Tensor) -> Tensor:
    return values_BF[:, :, None, None, None]  # [B, F] -> broadcastable over [B, F, C, H, W]


def _x0_from_velocity(x_t: Tensor, v_BCFHW: Tensor, sigma_BF: Tensor) -> Tensor:
    """x0 = x_t - sigma v in float64, cast to v's dtype; `x_t` and the result are [B, F, C, H, W]."""
    return x0_estimate(x_t.transpose(1, 2), v_BCFHW, sigma_BF).transpose(1, 2)


def _velocity_from_x0(x_t: Tensor, x0: Tensor, sigma_BF: Tensor) -> Tensor:
    """v = (x_t - x0) / sigma in float64, cast to x0's dtype."""
    sigma = _per_frame(sigma_BF).double()
    return ((x_t.double() - x0.double()) / sigma).to(x0.dtype)


def _noised(x: Tensor, noise: Tensor, sigma_BF: Tensor) -> Tensor:
    """(1 - s) x + s noise with a float32 `s`, in the dtype of `noise` (the reference's add_noise)."""
    s = _per_frame(sigma_BF)
    return ((1 - s) * x + s * noise).to(noise.dtype)


# -- the rollout's KV cache -------------------------------------------------------------------


def attended_ranges(layout: CacheLayout, pin: CacheState, end: int) -> list[Range]:
    """Stream tokens that a forward ending at token `end` attends, in order.

    Nothing is evicted, so a buffer position is a stream position. The window is
    `[max(0, end - W), end)`, `W = layout.capacity` (local_window_frames * S). When it no longer
    starts at 0, the protected prefix `[0, eff_sink)` is prepended, and a floating pinned shot
    sink lying before the window too; the window then shrinks so the total stays W
    (reference-model.md §5.3, with the prefix rules of `core.kv_cache.protected_prefix`)."""
    window = layout.capacity
    window_start = max(0, end - window)
    sink = protected_prefix(layout, pin)
    prepend_sink = sink > 0 and window_start > 0
    prepend_pinned = pin.has_pinned and sink <= pin.pinned_start < window_start
    prefix = [(0, sink)] if prepend_sink else []
    if prepend_pinned:
        prefix.append((pin.pinned_start, pin.pinned_start + pin.pinned_len))
    local_size = window - sum(stop - start for start, stop in prefix)
    local_start = max(sink if prepend_sink else 0, end - local_size)
    return prefix + [(local_start, end)]


def _rewrite(old: Tensor | None, new: Tensor, grad_mode: bool) -> Tensor:
    """A slot's content after a write, as an in-place write into a gradient-tracking buffer: a
    write under grad takes the new tensor (values and gradient route); a no-grad write changes
    the values only, so the route of the last differentiable write survives (the recache pass
    keeps the exit step's K/V as the receiver of later chunks' gradients)."""
    if grad_mode or old is None or not old.requires_grad:
        return new
    with torch.enable_grad():
        return new + (old - old.detach())


@dataclass(frozen=True)
class _Write:
    """One forward over stream tokens [start, end) and the ranges it attends."""

    start: int
    end: int
    ranges: tuple[Range, ...]
    keep_kv: bool


class _LayerHistory:
    """One layer's keys/values `[B, tokens, N, d]` (keys after RoPE): `past_*` the finished
    chunks, `current_*` the chunk being written."""

    def __init__(self) -> None:
        self.past_k: Tensor | None = None
        self.past_v: Tensor | None = None
        self.current_k: Tensor | None = None
        self.current_v: Tensor | None = None
        self._pending: tuple[Tensor, Tensor, bool] | None = None

    def attend(self, write: _Write, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if write.keep_kv:
            self._pending = (k, v, torch.is_grad_enabled())
        keys = _gather(self.past_k, k, write)
        values = _gather(self.past_v, v, write)
        return sdpa(q, keys, values)

    def commit(self) -> None:
        if self._pending is not None:
            k, v, grad_mode = self._pending
            self.current_k = _rewrite(self.current_k, k, grad_mode)
            self.current_v = _rewrite(self.current_v, v, grad_mode)
            self._pending = None

    def finish_chunk(self) -> None:
        assert self.current_k is not None, "a chunk ended without storing its keys/values"
        self.past_k = _append(self.past_k, self.current_k)
        self.past_v = _append(self.past_v, self.current_v)
        self.current_k = self.current_v = None


def _append(past: Tensor | None, chunk: Tensor) -> Tensor:
    return chunk if past is None else torch.cat([past, chunk], dim=1)


def _gather(past: Tensor | None, new: Tensor, write: _Write) -> Tensor:
    """The attended tokens: those before `write.start` from the history, the rest from `new`."""
    pieces = []
    for start, stop in write.ranges:
        if start < write.start:
            pieces.append(past[:, start:min(stop, write.start)])
        if stop > write.start:
            pieces.append(new[:, max(start, write.start) - write.start:stop - write.start])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


class RolloutKVCache:
    """Self-attention cache of a training rollout: it keeps the whole stream (no eviction),
    attends `attended_ranges`, never writes in place (autograd stays valid) and routes gradients
    as `_rewrite` says. Chunks are written in order; every forward of a chunk rewrites it."""

    def __init__(self, layout: CacheLayout, num_layers: int):
        self.layout = layout
        self.layers = [_LayerHistory() for _ in range(num_layers)]
        self.pin = CacheState()  # only pinned_start / pinned_len are used
        self.past_end = 0  # tokens of the finished chunks
        self.current: Range | None = None  # tokens of the chunk being written
        self._write: _Write | None = None

    # -- the DiT's cache protocol (`forward_chunk`): begin -> one attend per layer -> commit --

    def begin(self, start_frame: int, num_frames: int, rewrite_at_frame: int | None = None,
              keep_kv: bool = True) -> list[Attend]:
        assert rewrite_at_frame is None, "a training rollout never re-encodes its window"
        per_frame = self.layout.tokens_per_frame
        return self.open_write(start_frame * per_frame, (start_frame + num_frames) * per_frame, keep_kv)

    def commit(self) -> None:
        self.close_write()

    # -- cache operations ------------------------------------------------------------------------

    def open_write(self, start: int, end: int, keep_kv: bool = True) -> list[Attend]:
        """Start a forward over stream tokens [start, end): the chunk being written, or the next."""
        assert self._write is None, "previous forward was not committed"
        if self.current is not None and start == self.current[1]:
            for layer in self.layers:
                layer.finish_chunk()
            self.past_end, self.current = self.current[1], None
        assert start == self.past_end and end > start, \
            f"the rollout writes chunks in order (tokens {start}..{end}, history ends at {self.past_end})"
        self._write = _Write(start, end, tuple(attended_ranges(self.layout, self.pin, end)), keep_kv)
        return [functools.partial(layer.attend, self._write) for layer in self.layers]

    def close_write(self) -> None:
        assert self._write is not None, "commit without begin"
        for layer in self.layers:
            layer.commit()
        if self._write.keep_kv:
            self.current = (self._write.start, self._write.end)
        self._write = None

    def pin_last_chunk(self, num_frames: int) -> None:
        """Mark the chunk just written as the shot sink (as `core.kv_cache.KVCache` does)."""
        chunk_tokens = num_frames * self.layout.tokens_per_frame
        assert self.current is not None and self.current[1] - self.current[0] == chunk_tokens
        self.pin = CacheState(pinned_start=self.current[0],
                              pinned_len=min(self.layout.sink_tokens, chunk_tokens))


def rollout_cache(generator: CausalWanDiT, stream: StreamConfig, height: int, width: int) -> RolloutKVCache:
    """An empty rollout cache for latents of `height` x `width` under `stream`'s window and sinks."""
    layout = CacheLayout.from_stream(stream, tokens_per_frame(generator, height, width))
    return RolloutKVCache(layout, generator.config.num_layers)


# -- the rollout ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    """What one chunk's forwards share."""

    plan: ChunkPlan
    text: TextConditioning
    cache: RolloutKVCache
    image: Tensor | None = None  # I2V, first chunk: the conditioning latent [B, 1, C, H, W]


def _with_image(latents_BfCHW: Tensor, image: Tensor | None) -> Tensor:
    """I2V: the conditioning latent replaces frame 0 (no gradient reaches that frame)."""
    if image is None:
        return latents_BfCHW
    return torch.cat([image.to(latents_BfCHW.dtype), latents_BfCHW[:, 1:]], dim=1)


def _velocity(generator: CausalWanDiT, latents_BfCHW: Tensor, t: float, chunk: _Chunk,
              keep_kv: bool = True) -> Tensor:
    """One cached forward of the chunk at timestep t (I2V: frame 0 is the image, at t = 0);
    returns the velocity `[B, C, f, H, W]`."""
    t = torch.full(latents_BfCHW.shape[:2], float(t), dtype=torch.float32, device=latents_BfCHW.device)
    if chunk.image is not None:
        latents_BfCHW = _with_image(latents_BfCHW, chunk.image)
        t[:, 0] = 0.0
    return generator.forward_chunk(latents_BfCHW.transpose(1, 2), t, chunk.text, cache=chunk.cache,
                                   start_frame=chunk.plan.start_frame, rope_offset=chunk.plan.rope_offset,
                                   keep_kv=keep_kv)


@torch.no_grad()
def _steps_before_exit(generator: CausalWanDiT, noise_BfCHW: Tensor, chunk: _Chunk, stream: StreamConfig,
                       exit_step: int) -> tuple[Tensor, int]:
    """Steps i < exit of a fresh UniPC sampler, as `generate_latents` runs them; returns the
    exit step's input x_t and its timestep t_exit."""
    sampler = FlowUniPCSampler(stream.sampling_steps, stream.timestep_shift, stream.num_train_timesteps)
    latents = noise_BfCHW
    for t in sampler.timesteps[:exit_step]:
        # The exit and recache forwards rewrite this chunk's keys/values: no need to keep these.
        flow = _velocity(generator, latents, t, chunk, keep_kv=False).transpose(1, 2)
        latents = sampler.step(flow, latents)
    return latents, sampler.timesteps[exit_step]


def _exit_step(generator: CausalWanDiT, x_t: Tensor, t_exit: int, chunk: _Chunk,
               grid: FlowMatchSchedule) -> Tensor:
    """The chunk's output, with grad: x0 = x_t - sigma_grid(t_exit) v (the training-grid sigma)."""
    sigma = grid.t_to_sigma(torch.full(x_t.shape[:2], float(t_exit), dtype=torch.float32, device=x_t.device))
    return _with_image(_x0_from_velocity(x_t, _velocity(generator, x_t, t_exit, chunk), sigma), chunk.image)


@torch.no_grad()
def _recache(generator: CausalWanDiT, x0: Tensor, noise_BfCHW: Tensor, chunk: _Chunk,
             grid: FlowMatchSchedule) -> None:
    """Rewrite the chunk's K/V at t = 0 from its slightly noised output (context noise 0 still
    takes the grid's last sigma s0 = 0.0049800803, not 0), then pin it at a scene cut."""
    s0 = grid.t_to_sigma(torch.zeros(x0.shape[:2], device=x0.device))
    _velocity(generator, _noised(x0, noise_BfCHW, s0), 0.0, chunk)
    if chunk.plan.pin_shot_sink:
        chunk.cache.pin_last_chunk(chunk.plan.num_frames)


def _exit_steps(exit_step: int | Sequence[int], num_chunks: int, steps: int) -> list[int]:
    """One exit step per chunk, each an integer in [0, steps)."""
    per_chunk = isinstance(exit_step, Sequence) or (torch.is_tensor(exit_step) and exit_step.dim() > 0)
    values = list(exit_step) if per_chunk else [exit_step] * num_chunks
    if len(values) != num_chunks:
        raise ValueError(f"got {len(values)} exit steps for {num_chunks} chunks: give one int or one per chunk")
    exits = []
    for value in values:
        try:
            index = None if isinstance(value, bool) else operator.index(value)
        except TypeError:
            index = None
        if index is None or not 0 <= index < steps:
            raise ValueError(f"exit_step must be an integer in [0, {steps}) (sampling_steps={steps}), "
                             f"got {value!r}")
        exits.append(index)
    return exits


def _check_rollout(stream: StreamConfig, noise: Tensor, recache_noise: Tensor | None) -> None:
    if stream.uses_guidance:
        raise ValueError(f"the training rollout runs without guidance: set guidance_scale to 1.0 "
                         f"(got {stream.guidance_scale})")
    if stream.shot_clean_recache:
        raise ValueError("shot_clean_recache is an inference option the training rollout does not "
                         "have: set it to false")
    if recache_noise is not None and recache_noise.shape != noise.shape:
        raise ValueError(f"recache_noise must have the shape of noise {tuple(noise.shape)} "
                         f"(got {tuple(recache_noise.shape)})")


def rollout(generator: CausalWanDiT, noise: Tensor, chunk_contexts: Sequence[Tensor],
            stream: StreamConfig, exit_step: int | Sequence[int],
            scene_cuts: Sequence[bool] | None = None, *, recache_noise: Tensor | None = None,
            image_latent: Tensor | None = None) -> Tensor:
    """The self-forcing backward-simulation rollout: latents `[B, F, C, H, W]`, differentiable
    through every chunk's exit-step forward.

    Arguments as in `core.pipeline.generate_latents` (`stream.guidance_scale` must be 1).
    `exit_step`: one int for every chunk or one per chunk, in `[0, stream.sampling_steps)`.
    `recache_noise [B, F, C, H, W]`: the noise of the recache inputs (default: a fresh
    `torch.randn_like(noise)`). `image_latent [B, 1, C, H, W]`: image-to-video, frame 0 of the
    first chunk is the image (at t = 0 in every forward; the output's frame 0 is the image).
    Under `torch.no_grad()` it is the critic's rollout.
    """
    _check_rollout(stream, noise, recache_noise)
    plans = plan_chunks(generator, noise, chunk_contexts, stream, scene_cuts, image_latent)
    exits = _exit_steps(exit_step, len(plans), stream.sampling_steps)
    if recache_noise is None:
        recache_noise = torch.randn_like(noise)
    cache = rollout_cache(generator, stream, noise.shape[-2], noise.shape[-1])
    grid = training_grid(stream.timestep_shift, stream.num_train_timesteps)
    outputs = []
    for plan, exit_index in zip(plans, exits, strict=True):
        frames = slice(plan.start_frame, plan.start_frame + plan.num_frames)
        chunk = _Chunk(plan, generator.prepare_text(plan.context), cache, image_latent if plan.index == 0 else None)
        x_t, t_exit = _steps_before_exit(generator, noise[:, frames], chunk, stream, exit_index)
        x0 = _exit_step(generator, x_t, t_exit, chunk, grid)
        _recache(generator, x0, recache_noise[:, frames], chunk, grid)
        outputs.append(x0)
    return torch.cat(outputs, dim=1)


# -- score-model timesteps and noise ----------------------------------------------------------


def score_timesteps(raw_t: Tensor, *, shift: float = 5.0, num_train_timesteps: int = 1000) -> Tensor:
    """Timesteps of the score models from integer draws `raw_t` in 0..999 (float32, same shape):
    u = raw_t / 1000, t = shift u / (1 + (shift - 1) u) * 1000, clamped to [20, 980]
    (2 % and 98 % of `num_train_timesteps`), in float32 and in that order."""
    t = raw_t.to(torch.float32)
    if shift > 1:  # the reference shifts only then
        u = t / 1000
        t = shift * u / (1 + (shift - 1) * u) * 1000
    return t.clamp(int(0.02 * num_train_timesteps), int(0.98 * num_train_timesteps))


def add_noise(x: Tensor, noise: Tensor, t: Tensor, *, shift: float = 5.0) -> Tensor:
    """x_t = (1 - s) x + s noise with s = sigma_grid(t) per frame (`t [B, F]`, float32 `s`), in
    the dtype of `noise`."""
    return _noised(x, noise, sigma_grid(t, shift=shift))


# -- losses -----------------------------------------------------------------------------------


def _stack_contexts(chunk_contexts: Sequence[Tensor], x: Tensor, frames_per_block: int) -> Tensor:
    """Chunk contexts stacked sample-major, `[B*K, T, D]`: chunk k's frames attend prompt k."""
    batch, frames = x.shape[:2]
    if frames % frames_per_block:
        raise ValueError(f"{frames} latent frames are not a whole number of "
                         f"frames_per_block={frames_per_block} blocks")
    if len(chunk_contexts) != frames // frames_per_block:
        raise ValueError(f"got {len(chunk_contexts)} chunk contexts for {frames // frames_per_block} "
                         f"blocks of {frames_per_block} frames: give one per block")
    if any(context.shape[0] != batch for context in chunk_contexts):
        raise ValueError(f"every chunk context must have batch {batch}")
    return torch.stack(list(chunk_contexts), dim=1).flatten(0, 1)


def _score_x0(score: CausalWanDiT, noisy_x: Tensor, t: Tensor, context: Tensor, frames_per_block: int,
              shift: float) -> Tensor:
    """A score model's x0 prediction: one block-causal full-sequence forward (RoPE offset 0)."""
    if t.shape != noisy_x.shape[:2]:
        raise ValueError(f"t must be [B, F] = {list(noisy_x.shape[:2])} (got {list(t.shape)})")
    velocity = score(noisy_x.transpose(1, 2), t, context, frames_per_block=frames_per_block)
    return _x0_from_velocity(noisy_x, velocity, sigma_grid(t, shift=shift))


def _block_normaliser(p_BFCHW: Tensor, frames_per_block: int) -> Tensor:
    """mean |p| over each sample's block of frames_per_block frames, broadcast back to p's shape."""
    batch, frames = p_BFCHW.shape[:2]
    blocks = p_BFCHW.reshape(batch, frames // frames_per_block, frames_per_block, *p_BFCHW.shape[2:])
    normaliser = blocks.abs().mean(dim=(2, 3, 4, 5), keepdim=True)
    return normaliser.expand_as(blocks).reshape(p_BFCHW.shape)


@torch.no_grad()
def dmd_gradient(x: Tensor, noisy_x: Tensor, t: Tensor, real_score: CausalWanDiT, fake_score: CausalWanDiT,
                 chunk_contexts: Sequence[Tensor], negative_context: Tensor, *, frames_per_block: int,
                 real_guidance_scale: float = 3.0, fake_guidance_scale: float = 0.0,
                 shift: float = 5.0) -> Tensor:
    """The DMD gradient G (detached, shape of x) at the noised generated clip `noisy_x`.

    x0_real = c + g_r (c - u) from the teacher with the chunk prompts (c) and the negative prompt
    (u); x0_fake from the critic (c only unless g_f != 0); G = nan_to_num((x0_fake - x0_real) / N),
    N = mean |x - x0_real| over each sample's block of `frames_per_block` frames.
    """
    conditional = _stack_contexts(chunk_contexts, x, frames_per_block)

    def x0_of(score: CausalWanDiT, context: Tensor) -> Tensor:
        return _score_x0(score, noisy_x, t, context, frames_per_block, shift)

    fake = x0_of(fake_score, conditional)
    if fake_guidance_scale != 0.0:
        fake = fake + (fake - x0_of(fake_score, negative_context)) * fake_guidance_scale
    real_cond = x0_of(real_score, conditional)
    real = real_cond + (real_cond - x0_of(real_score, negative_context)) * real_guidance_scale
    return torch.nan_to_num((fake - real) / _block_normaliser(x - real, frames_per_block))


def generator_loss(x: Tensor, G: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """0.5 mse(x, sg(x - G)) in float64: value 0.5 mean(G^2), gradient G / numel into x's graph.
    `mask` (bool, shape of x): only those elements count (I2V: not the image frame)."""
    x64 = x.double()
    target = (x64 - G.double()).detach()
    if mask is not None:
        x64, target = x64[mask], target[mask]
    return 0.5 * F.mse_loss(x64, target)


def critic_loss(fake_score: CausalWanDiT, x: Tensor, noisy_x: Tensor, t: Tensor, noise: Tensor,
                chunk_contexts: Sequence[Tensor], *, frames_per_block: int, shift: float = 5.0,
                mask: Tensor | None = None) -> Tensor:
    """Flow-matching loss of the critic on the generated clip (float32 scalar, with grad into
    `fake_score`): v = (noisy_x - x0_fake) / sigma_grid(t), mean((v - (noise - x))^2).
    `mask` (bool, shape of x): only those elements count."""
    context = _stack_contexts(chunk_contexts, x, frames_per_block)
    x0 = _score_x0(fake_score, noisy_x, t, context, frames_per_block, shift)
    flow = _velocity_from_x0(noisy_x, x0, sigma_grid(t, shift=shift))
    error = (flow - (noise - x.detach())) ** 2
    return (error.mean() if mask is None else error[mask].mean()).float()
