"""Wan2.2 VAE (the TI2V-5B VAE) with an exact streaming decoder.

Shapes (reference-systems.md §1): B batch, C channels, T frames (pixels or features), F latent
frames, H W pixel height/width, h w latent height/width (H/16, W/16).
  video    [B, 3, T, H, W] in [-1, 1], T = 1 + 4k, H and W multiples of 16
  latents  [B, 48, F, h, w], F = 1 + k  (pixel frames = 4F - 3)
Inside, `patchify` turns the video into [B, 12, T, H/2, W/2] (2x2 space-to-depth).

Both halves are causal in time and run in steps, carrying a few frames of state from one step to
the next in a `CausalCache`:
  * encode: frame 0 alone, then groups of 4 frames; each step yields one latent frame;
  * decode: a "cell" of `DecodePlan.latents_per_cell` latent frames per step (the official loop
    is the special case of one latent per step). A causal convolution over n frames with its
    cached past prepended equals n one-frame calls, and every other layer works per frame, so a
    cell is the same function of the latents as the official loop; inside a cell, each up stage
    runs on frame slices sized to a memory cap. The video's first latent yields 1 frame, every
    later one 4 frames.
The start of a video follows its own rules (the temporal resample convolutions skip its first
frame; the decoder's shortcut drops frames), copied from the official model, not "fixed".

`WanVAE.decode` is a fresh `StreamingDecoder` fed the whole sequence. Cells sit on a fixed grid
of latent indices and a chunk that ends inside a cell is decoded by padding that cell, so every
chunking of a video runs the same operations on the same shapes and the pieces concatenate bit
for bit to the one-shot result. Parameter names and shapes equal the official `Wan2.2_VAE.pth`
(196 tensors).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.checkpoint import check_state_dict, read_state_dict
from core.config import LATENT_MEAN, LATENT_STD, VAE_PRESETS, VAE_TEMPORAL_STRIDE, VAEConfig
from core.config import require as _require

PATCH = 2  # patchify cell (2x2 pixels -> 12 channels)
TEMPORAL_STRIDE = VAE_TEMPORAL_STRIDE  # pixel frames per latent frame (two temporal down stages)


@dataclass(frozen=True)
class DecodePlan:
    """How the decoder walks a video. Every plan computes the same function of the latents; only
    the shapes of the operations, and so the floating-point rounding, differ between plans.

    latents_per_cell: latents pushed through the decoder together, on a fixed grid of latent
        indices [0, k), [k, 2k), ... A chunk that ends inside a cell is decoded with the cell
        padded to k latents, and the next chunk recomputes that cell from its start: any chunking
        then runs the same shapes and concatenates bit for bit to `WanVAE.decode`. Chunks that are
        multiples of k waste nothing.
    slice_bytes: memory cap; each up stage runs on frame slices whose widest activation stays within
        it (`UpStage.frames_per_slice`). None: whole cells. At 720p in bf16, 64 MiB keeps ~4.5 GiB
        of activations and feature cache (3.1 GiB of it the cache; 4.7 GiB at 256 MiB, ~6.7 GiB
        for the per-latent loop: tests/test_vae.py, on `meta`); compiled on an H100 the whole decode
        peaks at 7.96 GiB with weights (8.12 at 256 MiB) for 0.7 % more time, compiled channels-last
        (the GPU default since) 7.68 GiB on an H100 with the cache in the weights' layout, 6.74 GiB
        with rings (`ring_past`; docs/BENCHMARKS.md, 2026-12-07).
    subpixel_upsample: compute "nearest 2x, then 3x3 conv" as a 2x2 conv with four phases on the
        small input (`subpixel_weight`): 2.25x fewer FLOPs in those convolutions.
    ring_past: in a compiled decoder, a causal convolution stepping one frame at a time keeps its
        past in a ring that each new frame overwrites in place (`CausalConv3d.ring_step`) instead
        of building a padded input and cloning its tail per step: 0.864 -> 0.768 s per 720p chunk
        and 8.28 -> 6.74 GiB peak (H100, same call, docs/BENCHMARKS.md, 2026-12-07). The same sums
        with the taps in another order. Eager decoders never use rings.
    """

    latents_per_cell: int = 4
    slice_bytes: int | None = 64 * 2**20
    subpixel_upsample: bool = True
    ring_past: bool = True

    def __post_init__(self) -> None:
        _require(isinstance(self.latents_per_cell, int) and self.latents_per_cell >= 1,
                 f"latents_per_cell must be a positive integer (got {self.latents_per_cell!r})")
        _require(self.slice_bytes is None or (isinstance(self.slice_bytes, int) and self.slice_bytes > 0),
                 f"slice_bytes must be a positive integer or None for no cap (got {self.slice_bytes!r})")
        _require(isinstance(self.ring_past, bool), f"ring_past must be True or False (got {self.ring_past!r})")


# The official loop, operation for operation: one latent per step, whole steps, nearest + 3x3.
PER_LATENT_PLAN = DecodePlan(latents_per_cell=1, slice_bytes=None, subpixel_upsample=False, ring_past=False)


# ----------------------------------------------------------------------------------------------
# Patchify: 2x2 space-to-depth, channel index c*4 + r*2 + q (c colour, r column offset, q row
# offset). Swapping r and q still "works" but gives a different image.


def patchify(video: Tensor) -> Tensor:
    """[B, C, T, H, W] -> [B, 4C, T, H/2, W/2]."""
    B, C, T, H, W = video.shape
    x = video.reshape(B, C, T, H // PATCH, PATCH, W // PATCH, PATCH)  # B C T h q w r
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(B, C * PATCH * PATCH, T, H // PATCH, W // PATCH)


def unpatchify(x: Tensor) -> Tensor:
    """[B, 4C, T, h, w] -> [B, C, T, 2h, 2w] (inverse of `patchify`)."""
    B, C4, T, h, w = x.shape
    x = x.reshape(B, C4 // (PATCH * PATCH), PATCH, PATCH, T, h, w)  # B C r q T h w
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(B, C4 // (PATCH * PATCH), T, h * PATCH, w * PATCH)


# ----------------------------------------------------------------------------------------------
# Building blocks. All take 5-D tensors [B, C, T, H, W].


def empty_like_layout(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """An uninitialised [B, C, *rest] tensor laid out like x: channels innermost when x is
    channels-last (`core.optimize.channels_last_vae_decoder`), so that layout survives our reshapes."""
    if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return x.new_empty((shape[0], *shape[2:], shape[1])).movedim(-1, 1)
    return x.new_empty(shape)


def conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...] = (1, 1, 1),
           padding: tuple[int, ...] = (0, 0, 0)) -> Tensor:
    """`F.conv3d`, except that eager fp32 on the CPU always runs oneDNN: PyTorch picks its reference
    kernel when B*C*T*H <= 20480, 2.5-6x slower (measured on 2 cores), e.g. for every step of the
    per-latent loop of the tiny VAE. oneDNN's per-frame results do not depend on T here."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling() \
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
        return torch.mkldnn_convolution(x, weight, bias, padding, stride, (1, 1, 1), 1)
    return F.conv3d(x, weight, bias, stride, padding)


# A ring (`CausalConv3d.ring_step`): its frames, and the slot of the oldest one as a tensor (where
# the compiled step writes) and as an int (which rotation of the taps the conv uses).
Ring = tuple[Tensor, Tensor, int]


class CausalCache:
    """What the causal layers of one encoder or decoder pass carry from one step to the next.

    For each temporal convolution, the last input frames it needs as past context; and, for the
    encoder, whether the current step is the first of the video (it follows special rules; the
    decoder is told per call). One object per video: independent streams never share state.
    """

    def __init__(self, rings: bool = False) -> None:
        self.first_step = True
        self.rings = rings  # one-frame compiled steps may keep rings (`CausalConv3d.ring_step`)
        self._frames: dict[nn.Module, Tensor | Ring | None] = {}

    def get(self, layer: nn.Module) -> Tensor | Ring | None:
        return self._frames.get(layer)

    def put(self, layer: nn.Module, frames: Tensor | Ring) -> None:
        self._frames[layer] = frames

    def take(self, layer: nn.Module) -> Tensor | Ring | None:
        """Take a layer's frames out, so they can be freed as soon as they are used. The slot stays
        where it is (a stable key order keeps `torch.compile`'s guards on this dict stable)."""
        frames = self._frames.get(layer)
        if frames is not None:
            self._frames[layer] = None
        return frames

    def copy(self) -> CausalCache:
        """A cache that continues from this one's state; stepping it leaves this one as it is
        (entries are replaced, and rings copied)."""
        other = CausalCache(self.rings)
        other.first_step = self.first_step
        # a ring (`CausalConv3d.ring_step`) is written in place: the copy gets its own frames
        other._frames = {layer: (entry[0].clone(), *entry[1:]) if isinstance(entry, tuple) else entry
                         for layer, entry in self._frames.items()}
        return other


class CausalConv3d(nn.Conv3d):
    """Conv3d that sees the current frame and `kernel_t - 1` past frames ("same" in H and W).

    The past comes from the cache (the previous step's last input frames) or, at the start of
    the video, from zero frames, so stepping through a video in pieces equals one causal
    convolution over the whole of it. Without a cache the input is one whole clip.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int]) -> None:
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        super().__init__(in_channels, out_channels, (kt, kh, kw), padding=(0, kh // 2, kw // 2))
        self.context = kt - 1

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        return self.convolve(*self.with_past(x, cache))

    def with_past(self, x: Tensor, cache: CausalCache | None) -> tuple[Tensor, int | None]:
        """x with its `context` past frames in front (stores x's last frames as the next past), and
        None; or, for a one-frame step of a compiled decoder, a ring and the slot of x in it (`ring_step`)."""
        if self.context == 0:
            return x, None
        if self._rings_pay(x, cache):
            return self.ring_step(x, cache)
        # The past is kept in the weight's layout, so that cat builds the padded input in it too
        # (cat follows its inputs' layout, in eager and in inductor) and cuDNN gets channels-last
        # input from a channels-last decoder (`core.optimize.channels_last_vae_decoder`). With a
        # channels-first past, every compiled step built the padded input channels-first and
        # transposed all of it before the conv (~0.1 s of a 720p chunk on an H200, docs/BENCHMARKS.md).
        layout = self._layout()
        past = cache.take(self) if cache is not None else None
        if isinstance(past, tuple):  # a ring, from one-frame steps: its newest frames, oldest first
            frames, _, oldest = past
            order = (torch.arange(1, self.context + 1, device=x.device) + oldest) % (self.context + 1)
            past = frames.index_select(2, order).contiguous(memory_format=layout)
        if past is None:
            past = self._zero_frames(x, self.context)
        x = torch.cat([past, x], dim=2)
        del past  # the old past goes before the new one is cloned
        if cache is not None:
            # clone: a view would keep the whole input alive until the next step
            cache.put(self, x[:, :, -self.context:].clone(memory_format=layout))
        return x, None

    def ring_step(self, x: Tensor, cache: CausalCache) -> tuple[Tensor, int]:
        """One frame x through a ring of `context + 1` frames kept in the cache with the slot of its
        oldest frame: x overwrites that frame in place, and the convolution runs over the ring as
        it lies in memory with its taps rotated to match (`ring_taps`). Per step this
        writes one frame, where the padded input costs a copy of the past into it and a clone of
        its last frames (2 x context frames read and written); `_rings_pay` keeps rings to layers
        whose frames are larger than their weights.

        The write is an indexed assignment at a tensor slot (`index_put_`), which inductor performs
        in place on the cache's tensor, fused with the norm + SiLU producing x (`index_copy_` it
        turned into an out-of-place copy of the whole ring per step: its generated code, CPU and
        H100). The rotation is picked by the slot as an int: `torch.compile` captures one graph per
        slot, and with frozen rotations (`freeze_ring_taps`) those graphs differ only in which
        weight tensor they are given, so inductor compiles their code once."""
        slots = self.context + 1
        entry = cache.get(self)
        if isinstance(entry, tuple):
            frames, oldest_slot, oldest = entry
        else:  # start: the past (zeros at the start of the video) in front, the last slot free
            frames = self._zero_frames(x, slots)
            if entry is not None:
                frames[:, :, :self.context] = entry
            oldest_slot, oldest = torch.full((1,), self.context, dtype=torch.long, device=x.device), self.context
        frames[:, :, oldest_slot] = x
        newest = oldest  # x, the newest frame, now lies where the oldest one did
        cache.put(self, (frames, (oldest_slot + 1) % slots, (oldest + 1) % slots))
        return frames, newest

    def convolve(self, x_with_past: Tensor, newest: int | None = None) -> Tensor:
        """The convolution; `newest`: x_with_past is a ring with its newest frame in that slot."""
        weight = self.weight if newest is None else self.ring_taps(newest)
        return conv3d(x_with_past, weight, self.bias, self.stride, self.padding)

    def ring_taps(self, newest: int) -> Tensor:
        """The weights with their temporal taps in the order of a ring's slots when its newest frame
        lies in slot `newest`: slot j holds the frame (j - newest - 1) mod slots steps after the
        oldest one. Frozen (`freeze_ring_taps`) or gathered now."""
        frozen = getattr(self, f"ring_taps_{newest}", None)
        if frozen is not None:
            return frozen
        if newest == self.context:  # the slots in time order
            return self.weight
        slots = self.context + 1
        order = (torch.arange(slots, device=self.weight.device) - newest - 1) % slots
        return self.weight.index_select(2, order).contiguous(memory_format=self._layout())

    def freeze_ring_taps(self) -> None:
        """Keep the rotations of the taps (`ring_taps`), for a decoder whose weights no longer change
        (`core.optimize.compile_vae_decoder`): a compiled ring step otherwise gathers its rotation
        every step, a copy of the weights. Every rotation is a buffer of its own, the one in time
        order too: the compiled steps of all slots are then the same graph given other buffers,
        which inductor compiles once. Non-persistent, so the state dict stays the checkpoint's."""
        slots = self.context + 1
        for newest in range(slots):  # a refreeze derives them from the current weights
            self._buffers.pop(f"ring_taps_{newest}", None)
        rotations = [self.ring_taps(newest) for newest in range(slots)]
        rotations[-1] = rotations[-1].clone(memory_format=self._layout())
        for newest, rotation in enumerate(rotations):
            self.register_buffer(f"ring_taps_{newest}", rotation, persistent=False)

    def _zero_frames(self, x: Tensor, frames: int) -> Tensor:
        """`frames` zero frames of x's size, in the weight's layout (a zeros() converted after is
        two writes)."""
        B, C, _, H, W = x.shape
        return torch.empty((B, C, frames, H, W), dtype=x.dtype, device=x.device,
                           memory_format=self._layout()).zero_()

    def _layout(self) -> torch.memory_format:
        return torch.channels_last_3d if self.weight.is_contiguous(memory_format=torch.channels_last_3d) \
            else torch.contiguous_format

    def _rings_pay(self, x: Tensor, cache: CausalCache | None) -> bool:
        """Rings for one-frame steps of a compiled decoder (the 720p decode runs every stage in
        one-frame slices), where a frame outweighs the weights gathered per step. Eager decoders
        (the CPU demo, videos too short to compile for) keep the padded input, and so does a step
        that autograd records (a ring overwritten in place would corrupt its saved input)."""
        if cache is None or not cache.rings or not torch.compiler.is_compiling() or x.shape[2] != 1:
            return False  # the eager path stops here
        recorded = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        return (not recorded and type(self).convolve is CausalConv3d.convolve
                and x[:, :, 0].numel() >= self.weight.numel())


class FrameConv2d(nn.Conv2d):
    """A 2-D convolution applied to every frame, run as a 1 x kh x kw 3-D convolution so that
    frames need not be folded into the batch (which would copy the tensor twice)."""

    def forward(self, x: Tensor) -> Tensor:
        return conv3d(x, self.weight.unsqueeze(2), self.bias, (1, *self.stride), (0, *self.padding))


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a learned per-channel gain (no bias).
    The gain's shape is [C, 1, 1, 1], or [C, 1, 1] in the attention block (checkpoint layout)."""

    def __init__(self, channels: int, gain_dims: int = 3) -> None:
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, *(1,) * gain_dims))

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu":
            # F.normalize's vector_norm over a non-last dim is ~100x slower than this on the CPU
            # (torch 2.13: 10 ms vs 0.1 ms for [4, 8, 3, 66, 66]); the same math, equal to ~1 ulp.
            normed = x / x.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
        else:
            normed = F.normalize(x, dim=1)
        # in place on the fresh quotient: one activation-sized buffer fewer
        return normed.mul_(self.scale * self.gamma.view(-1, 1, 1, 1))


def _run(layers: nn.Sequential, x: Tensor, cache: CausalCache) -> Tensor:
    """Apply a Sequential, handing the cache to its causal convolutions."""
    for layer in layers:
        if isinstance(layer, CausalConv3d):
            x, newest = layer.with_past(x, cache)  # two steps: the unpadded input is freed before the conv
            x = layer.convolve(x, newest)
        else:
            x = layer(x)
    return x


class ResidualBlock(nn.Module):
    """(RMS -> SiLU -> conv3) x 2 plus a 1x1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # Index 5 held a dropout (p = 0) in the official model; kept so the parameters sit at
        # the checkpoint's indices 0, 2, 3, 6.
        # SiLU in place: it always follows a norm's fresh output (the VAE is frozen, no autograd)
        self.residual = nn.Sequential(
            RMSNorm(in_channels), nn.SiLU(inplace=True), CausalConv3d(in_channels, out_channels, 3),
            RMSNorm(out_channels), nn.SiLU(inplace=True), nn.Identity(), CausalConv3d(out_channels, out_channels, 3))
        self.shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        return _run(self.residual, x, cache).add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = RMSNorm(channels, gain_dims=2)
        self.to_qkv = FrameConv2d(channels, 3 * channels, 1)
        self.proj = FrameConv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, T, H, W = x.shape
        qkv = self.to_qkv(self.norm(x))  # [B, 3C, T, H, W]
        qkv = qkv.permute(0, 2, 3, 4, 1).reshape(B * T, H * W, 3 * C)  # (frames, tokens, 3C)
        out = self.attend(*qkv.chunk(3, dim=-1))  # [B*T, H*W, C]
        out = out.reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3)
        return x + self.proj(out)

    @staticmethod
    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Softmax attention of [frames, tokens, C] queries, keys and values, one head."""
        return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]


class Downsample(nn.Module):
    """Halve H and W (pad right/bottom, 3x3 stride 2), then optionally T (kernel 3, stride 2).

    Temporal rule: the first step passes its frames through; every later step is convolved
    after the previous step's last frame (4 frames -> 2, 2 -> 1).
    """

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad3d((0, 1, 0, 1, 0, 0)), FrameConv2d(channels, channels, 3, stride=2))
        self.time_conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.resample(x)
        if self.time_conv is None:
            return x
        previous = cache.get(self.time_conv)
        cache.put(self.time_conv, x[:, :, -1:].clone())
        if cache.first_step:
            return x
        return self.time_conv(torch.cat([previous, x], dim=2))


# Rows of a 3x3 kernel that land on each of the two input rows a nearest-2x upsampled pixel sees:
# output row 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1 = input rows (i - 1, i, i) for
# a = 0 and (i, i, i + 1) for a = 1. Indexed [a, input row (2), kernel row (3)]; same for columns.
_SUBPIXEL_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def subpixel_weight(weight: Tensor) -> Tensor:
    """3x3 kernel [O, I, 3, 3] applied after nearest 2x upsampling -> the four 2x2 kernels
    [4 * O, I, 2, 2] (phase 2a + b: output row parity a, column parity b) that give the same
    result on the input itself, padded by 1. Summed in fp32, returned in the weight's dtype."""
    taps = torch.tensor(_SUBPIXEL_TAPS, device=weight.device)
    phases = torch.einsum("ari,ocij,bsj->abocrs", taps, weight.float(), taps)
    return phases.reshape(4 * weight.shape[0], weight.shape[1], 2, 2).to(weight.dtype)


class Upsample(nn.Module):
    """Optionally double T (a causal conv emits two frames per frame), then double H and W
    (nearest, 3x3 conv).

    Temporal rule: the video's first frame passes through and never enters the temporal conv's
    past, so the frame after it sees zero padding (pitfall 2).
    """

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        # nearest is an exact copy in any dtype, so no fp32 round trip is needed
        self.resample = nn.Sequential(nn.Upsample(scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact"),
                                      FrameConv2d(channels, channels, 3, padding=1))
        self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1)) if temporal else None

    def forward(self, x: Tensor, cache: CausalCache, starts_video: bool, subpixel: bool = False) -> Tensor:
        """`starts_video`: x begins with the video's first frame. `subpixel`: see `subpixel_weight`."""
        if self.time_conv is not None:
            x = self._double_frames(x, cache, starts_video)
        return self._subpixel_resample(x) if subpixel else self.resample(x)

    def _double_frames(self, x: Tensor, cache: CausalCache, starts_video: bool) -> Tensor:
        first, rest = (x[:, :, :1], x[:, :, 1:]) if starts_video else (None, x)
        if rest.shape[2] == 0:
            return first
        pair = self.time_conv(rest, cache)  # [B, 2C, T, H, W]: frames 2t and 2t+1 side by side
        B, C2, T, H, W = pair.shape
        doubled = empty_like_layout(pair, (B, C2 // 2, T, 2, H, W))
        doubled.copy_(pair.unflatten(1, (2, C2 // 2)).permute(0, 2, 3, 1, 4, 5))
        doubled = doubled.flatten(2, 3)
        return doubled if first is None else torch.cat([first, doubled], dim=2)

    def freeze_subpixel(self) -> None:
        """Compute the sub-pixel phase kernels and bias once, for a decoder whose weights no longer
        change (`core.optimize.compile_vae_decoder`); otherwise every call derives them (in fp32)
        from the 3x3 weights. Non-persistent buffers: the state dict stays the checkpoint's."""
        weight, bias = self._subpixel_params()
        self.register_buffer("subpixel_phase_weight", weight, persistent=False)
        self.register_buffer("subpixel_phase_bias", bias, persistent=False)

    def _subpixel_params(self) -> tuple[Tensor, Tensor]:
        """The phase kernels [4 * O, I, 1, 2, 2] and bias: frozen ones, or derived now."""
        if hasattr(self, "subpixel_phase_weight"):
            return self.subpixel_phase_weight, self.subpixel_phase_bias
        conv = self.resample[1]
        weight = subpixel_weight(conv.weight).unsqueeze(2)
        if conv.weight.is_contiguous(memory_format=torch.channels_last):  # channels-last weights: the
            weight = weight.contiguous(memory_format=torch.channels_last_3d)  # phase kernels too
        return weight, conv.bias.repeat(4)

    def _subpixel_resample(self, x: Tensor) -> Tensor:
        """nearest 2x then 3x3 conv, as one 2x2 conv with four phases (2.25x fewer FLOPs; the
        same sums with the shared input's weights added first, so fp rounding differs)."""
        C = self.resample[1].out_channels
        B, _, T, H, W = x.shape
        weight, bias = self._subpixel_params()
        phases = conv3d(x, weight, bias, padding=(0, 1, 1))

        def phase(a: int, b: int) -> Tensor:  # output rows 2h + a, columns 2w + b: [B, C, T, H, W]
            # phase 2a + b: its [H + 1, W + 1] map starts a rows and b columns early
            return phases[:, (2 * a + b) * C:(2 * a + b + 1) * C, :, a:a + H, b:b + W]

        if torch.compiler.is_compiling():
            # one expression without writes into a buffer, which inductor fuses with the phase
            # conv's bias add (eager, stacking would copy twice). Channels-last, the stack runs over
            # [B, T, H, W, C] views so that its contiguous result already is the channels-last
            # output: stacked channels-first, inductor converted the whole output in a second pass
            # (8 ms of a 720p chunk on an H100, docs/BENCHMARKS.md, 2026-12-07)
            if weight.is_contiguous(memory_format=torch.channels_last_3d):
                rows = [torch.stack([phase(a, b).permute(0, 2, 3, 4, 1) for b in range(2)], dim=4)
                        for a in range(2)]  # [B, T, H, W, 2, C]
                return torch.stack(rows, dim=3).reshape(B, T, 2 * H, 2 * W, C).permute(0, 4, 1, 2, 3)
            rows = [torch.stack([phase(a, b) for b in range(2)], dim=-1) for a in range(2)]
            return torch.stack(rows, dim=4).reshape(B, C, T, 2 * H, 2 * W)  # [B, C, T, H, 2, W, 2]
        out = empty_like_layout(phases, (B, C, T, H, 2, W, 2))
        for a in range(2):
            for b in range(2):
                out[:, :, :, :, a, :, b] = phase(a, b)
        return out.view(B, C, T, 2 * H, 2 * W)


class AvgDown3D(nn.Module):
    """Parameter-free shortcut of a down stage: zero-pad T in front to a multiple of `factor_t`,
    fold each (factor_t, factor_s, factor_s) cell into channels, average channel groups down to
    `out_channels`."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        cells = factor_t * factor_s * factor_s
        assert (in_channels * cells) % out_channels == 0
        self.group_size = in_channels * cells // out_channels

    def forward(self, x: Tensor) -> Tensor:
        ft, fs = self.factor_t, self.factor_s
        pad_t = -x.shape[2] % ft
        if pad_t:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        B, C, T, H, W = x.shape
        x = x.reshape(B, C, T // ft, ft, H // fs, fs, W // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(B, self.out_channels, self.group_size, T // ft, H // fs, W // fs).mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut of an up stage: repeat channels, unfold them into (factor_t,
    factor_s, factor_s) cells; the first step drops its first `factor_t - 1` frames."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        cells = factor_t * factor_s * factor_s
        assert (out_channels * cells) % in_channels == 0
        self.repeats = out_channels * cells // in_channels

    def forward(self, x: Tensor, first_step: bool) -> Tensor:
        ft, fs = self.factor_t, self.factor_s
        B, C, T, H, W = x.shape
        # = repeat_interleave over channels, as a broadcast view: the cell unfold below is then
        # the only copy (reshape copies on its own where a view is impossible)
        cells = x.unsqueeze(2).expand(B, C, self.repeats, T, H, W)
        cells = cells.reshape(B, self.out_channels, ft, fs, fs, T, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)
        out = empty_like_layout(x, (B, self.out_channels, T, ft, H, fs, W, fs))
        x = out.copy_(cells).view(B, self.out_channels, T * ft, H * fs, W * fs)
        return x[:, :, ft - 1:] if first_step else x


class DownStage(nn.Module):
    """Residual blocks (+ Downsample) plus the AvgDown3D shortcut of the stage input."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.shortcut = AvgDown3D(in_channels, out_channels, 2 if temporal else 1, 2 if spatial else 1)
        blocks: list[nn.Module] = [ResidualBlock(in_channels if i == 0 else out_channels, out_channels)
                                   for i in range(num_blocks)]
        if spatial:
            blocks.append(Downsample(out_channels, temporal))
        self.downsamples = nn.Sequential(*blocks)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        out = x
        for block in self.downsamples:
            out = block(out, cache)
        return out + self.shortcut(x)


class UpStage(nn.Module):
    """Residual blocks (+ Upsample) plus, when the stage resamples, the DupUp3D shortcut."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.frames_out_per_in = 2 if temporal and spatial else 1
        self.pixels_out_per_in = 4 if spatial else 1
        self.shortcut = DupUp3D(in_channels, out_channels, 2 if temporal else 1, 2) if spatial else None
        blocks: list[nn.Module] = [ResidualBlock(in_channels if i == 0 else out_channels, out_channels)
                                   for i in range(num_blocks)]
        if spatial:
            blocks.append(Upsample(out_channels, temporal))
        self.upsamples = nn.Sequential(*blocks)

    def forward(self, x: Tensor, cache: CausalCache, starts_video: bool, subpixel: bool = False) -> Tensor:
        """`starts_video`: x begins with the video's first frame (it follows the first-step rules)."""
        out = x
        for block in self.upsamples:
            out = block(out, cache, starts_video, subpixel) if isinstance(block, Upsample) else block(out, cache)
        return out if self.shortcut is None else out.add_(self.shortcut(x, starts_video))

    def frames_per_slice(self, x: Tensor, slice_bytes: int | None) -> int | None:
        """Input frames per call so that the stage's widest activation (input width at input size,
        or output width at output size) stays within `slice_bytes`: the largest power of two that
        does, at least 1. None: no cap."""
        if slice_bytes is None:
            return None
        B, C, _, H, W = x.shape
        widest = max(C, self.out_channels * self.frames_out_per_in * self.pixels_out_per_in)
        frames = max(1, slice_bytes // (B * widest * H * W * x.element_size()))
        return 1 << (frames.bit_length() - 1)


class Encoder(nn.Module):
    """One call is one step: patchified frames [B, 12, 1 or 4, H/2, W/2] -> [B, 2*z_dim, 1, h, w]
    (mean ‖ log-variance)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = config.encoder_widths
        num_stages = len(config.dim_mult)
        self.conv1 = CausalConv3d(3 * PATCH * PATCH, widths[0], 3)
        self.downsamples = nn.Sequential(*(
            DownStage(widths[i], widths[i + 1], config.num_res_blocks,
                      temporal=i < num_stages - 1 and config.temporal_downsample[i], spatial=i < num_stages - 1)
            for i in range(num_stages)))
        width = widths[-1]
        self.middle = nn.Sequential(ResidualBlock(width, width), AttentionBlock(width), ResidualBlock(width, width))
        self.head = nn.Sequential(RMSNorm(width), nn.SiLU(), CausalConv3d(width, 2 * config.z_dim, 3))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1(x, cache)
        for stage in self.downsamples:
            x = stage(x, cache)
        first_block, attention, second_block = self.middle
        x = second_block(attention(first_block(x, cache)), cache)
        x = _run(self.head, x, cache)
        cache.first_step = False
        return x


class Decoder(nn.Module):
    """One call is one cell of k latents: latent features [B, z_dim, k, h, w] -> patchified frames
    [B, 12, 4k, H/2, W/2] (4k - 3 when the cell starts the video)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = config.decoder_widths
        num_stages = len(config.dim_mult)
        temporal_upsample = config.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(config.z_dim, widths[0], 3)
        width = widths[0]
        self.middle = nn.Sequential(ResidualBlock(width, width), AttentionBlock(width), ResidualBlock(width, width))
        self.upsamples = nn.Sequential(*(
            UpStage(widths[i], widths[i + 1], config.num_res_blocks + 1,
                    temporal=i < num_stages - 1 and temporal_upsample[i], spatial=i < num_stages - 1)
            for i in range(num_stages)))
        self.head = nn.Sequential(RMSNorm(widths[-1]), nn.SiLU(inplace=True),
                                  CausalConv3d(widths[-1], 3 * PATCH * PATCH, 3))

    def forward(self, x: Tensor, cache: CausalCache, starts_video: bool, plan: DecodePlan) -> Tensor:
        pieces: list[Tensor] = []
        self._up_from(0, self.low_res(x, cache), cache, starts_video, plan, pieces)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

    def low_res(self, x: Tensor, cache: CausalCache) -> Tensor:
        """conv1 and the middle blocks, at latent resolution (a unit for `torch.compile`)."""
        x = self.conv1(x, cache)
        first_block, attention, second_block = self.middle
        return second_block(attention(first_block(x, cache)), cache)

    def head_out(self, x: Tensor, cache: CausalCache) -> Tensor:
        """Norm, SiLU, conv to the 12 patchified pixel channels (a unit for `torch.compile`)."""
        return _run(self.head, x, cache)

    def _up_from(self, index: int, x: Tensor, cache: CausalCache, starts_video: bool, plan: DecodePlan,
                 pieces: list[Tensor]) -> None:
        """Run up stage `index` on frame slices of x, each slice straight on through the later
        stages and the head (depth first, so one slice per level is alive), appending the head
        outputs in order. Slices lie on a grid of whole later-cell slices, so every cell but the
        first sees the same shapes (the first is missing frames at the front of its grid)."""
        if index == len(self.upsamples):
            pieces.append(self.head_out(x, cache))
            return
        stage = self.upsamples[index]
        frames = x.shape[2]
        # the first cell's stage-`index` input lacks 2^u - 1 leading frames of a later cell's
        # (u temporal doublings so far), since the first latent yields 1 frame
        missing = (1 << sum(s.frames_out_per_in == 2 for s in self.upsamples[:index])) - 1 if starts_video else 0
        step = stage.frames_per_slice(x, plan.slice_bytes) or frames + missing  # uncapped: one slice
        start = 0
        while start < frames:
            stop = min(frames, start + step - (missing % step if start == 0 else 0))
            first = starts_video and start == 0
            y = stage(x[:, :, start:stop], cache, first, plan.subpixel_upsample)
            self._up_from(index + 1, y, cache, first, plan, pieces)
            del y  # before the next slice is computed
            start = stop


# ----------------------------------------------------------------------------------------------
# The VAE.


class WanVAE(nn.Module):
    """Encoder, the two 1x1x1 latent convolutions, decoder (registration order = checkpoint order)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.conv1 = nn.Conv3d(2 * config.z_dim, 2 * config.z_dim, 1)  # encoder output -> mean ‖ log-var
        self.conv2 = nn.Conv3d(config.z_dim, config.z_dim, 1)  # latents -> decoder input
        self.decoder = Decoder(config)
        # fp32, outside the state dict and untouched by .to(dtype); cast at use (as LongLive).
        # Explicitly on the CPU so that building on `meta` keeps the values.
        self.latent_mean = torch.tensor(LATENT_MEAN, dtype=torch.float32, device="cpu")
        self.latent_std = torch.tensor(LATENT_STD, dtype=torch.float32, device="cpu")

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, 1 / std) as [1, z, 1, 1, 1] in `like`'s dtype. The reciprocal is taken in that
        dtype and multiplied / divided by, as the official wrapper does (same rounding)."""
        if self.latent_mean.device != like.device:  # follow the data once, stay fp32
            self.latent_mean = self.latent_mean.to(like.device)
            self.latent_std = self.latent_std.to(like.device)
        shape = (1, -1, 1, 1, 1)
        mean = self.latent_mean.to(like.dtype).view(shape)
        return mean, 1.0 / self.latent_std.to(like.dtype).view(shape)

    def normalize(self, mu: Tensor) -> Tensor:
        mean, inv_std = self._latent_stats(mu)
        return (mu - mean) * inv_std

    def denormalize(self, latents: Tensor) -> Tensor:
        mean, inv_std = self._latent_stats(latents)
        return latents / inv_std + mean

    def _check_video(self, video: Tensor) -> None:
        stride = self.config.spatial_stride
        _require(video.dim() == 5 and video.shape[1] == 3,
                 f"video must be [B, 3, T, H, W] (got shape {tuple(video.shape)})")
        T, H, W = video.shape[2:]
        _require(T % TEMPORAL_STRIDE == 1,
                 f"video frames must be 1 + {TEMPORAL_STRIDE}k (1, 5, 9, ...) (got T={T}): trim the clip")
        _require(H % stride == 0 and W % stride == 0 and H > 0 and W > 0,
                 f"video height and width must be positive multiples of {stride} (got {H}x{W})")

    def encode(self, video: Tensor, normalize: bool = True) -> Tensor:
        """[B, 3, 1 + 4k, H, W] in [-1, 1] -> posterior mean [B, z, 1 + k, H/16, W/16],
        normalised per channel unless `normalize=False`. In the weights' dtype."""
        self._check_video(video)
        x = patchify(video.to(self.dtype))
        cache = CausalCache()
        means = []
        # frame 0 alone, then groups of 4; the 1x1x1 conv per step keeps prefixes bit-exact
        for start in (0, *range(1, x.shape[2], TEMPORAL_STRIDE)):
            stop = 1 if start == 0 else start + TEMPORAL_STRIDE
            features = self.encoder(x[:, :, start:stop], cache)
            means.append(self.conv1(features)[:, :self.config.z_dim])
        mu = torch.cat(means, dim=2)
        return self.normalize(mu) if normalize else mu

    def decode(self, latents: Tensor, plan: DecodePlan | None = None) -> Tensor:
        """[B, z, F, h, w] normalised latents -> pixels [B, 3, 4F - 3, 16h, 16w], not clamped, in the
        weights' dtype."""
        return self.streaming_decoder(plan).decode(latents)

    def streaming_decoder(self, plan: DecodePlan | None = None) -> StreamingDecoder:
        """A decoder for one video fed in consecutive latent chunks (owns its cache)."""
        return StreamingDecoder(self, plan)

    def decode_cell(self, latents: Tensor, cache: CausalCache, starts_video: bool, plan: DecodePlan) -> Tensor:
        """One cell of un-normalised latents [B, z, k, h, w] -> patchified pixels [B, 12, 4k, ...]
        (4k - 3 when `starts_video`)."""
        return self.decoder(self.conv2(latents), cache, starts_video, plan)


class StreamingDecoder:
    """Decodes one video's latents chunk by chunk; the pieces concatenate bit for bit to
    `WanVAE.decode` of the whole sequence (same plan). The first chunk of n latents gives
    1 + 4(n - 1) frames, every later one 4n. `reset()` starts a new video."""

    def __init__(self, vae: WanVAE, plan: DecodePlan | None = None) -> None:
        self.vae = vae
        self.plan = plan or DecodePlan()
        self.reset()

    def reset(self) -> None:
        self.cache = CausalCache(rings=self.plan.ring_past)  # the state at the start of the open cell
        self._chunk_shape: tuple[int, int, int] | None = None  # (B, h, w) of this video
        self._cells_done = 0
        self._open_cell: Tensor | None = None  # latents of a cell that a chunk ended inside
        self._open_frames = 0  # frames of that cell already returned

    def decode(self, latents: Tensor) -> Tensor:
        """[B, z, n, h, w] (n >= 1, the next latents of the video) -> [B, 3, frames, 16h, 16w]."""
        z_dim = self.vae.config.z_dim
        _require(latents.dim() == 5 and latents.shape[1] == z_dim and latents.shape[2] >= 1,
                 f"latents must be [B, {z_dim}, F, h, w] with F >= 1 (got shape {tuple(latents.shape)})")
        B, _, n, h, w = latents.shape
        if self._chunk_shape is None:
            self._chunk_shape = (B, h, w)
        _require(self._chunk_shape == (B, h, w),
                 f"latent chunk of batch {B} and size {h}x{w} continues a video of batch "
                 f"{self._chunk_shape[0]} and size {self._chunk_shape[1]}x{self._chunk_shape[2]}: "
                 f"call reset() (or use a new streaming_decoder()) for a new video")
        x = self.vae.denormalize(latents).to(self.vae.dtype)
        if self._open_cell is not None:
            x = torch.cat([self._open_cell, x], dim=2)
        k = self.plan.latents_per_cell
        pieces = [self._decode_cell(x[:, :, start:start + k]) for start in range(0, x.shape[2], k)]
        return unpatchify(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2))

    def _decode_cell(self, cell: Tensor) -> Tensor:
        """Decode one cell on the grid (padded if the chunk ends inside it); return its frames
        not returned before. The cache moves on only past complete cells."""
        k, n = self.plan.latents_per_cell, cell.shape[2]
        starts_video = self._cells_done == 0
        if n == k:
            frames = self.vae.decode_cell(cell, self.cache, starts_video, self.plan)
        else:  # the padding's values only reach frames after the real ones (causal), cut below
            padded = F.pad(cell, (0, 0, 0, 0, 0, k - n))
            frames = self.vae.decode_cell(padded, self.cache.copy(), starts_video, self.plan)
        real = TEMPORAL_STRIDE * n - (TEMPORAL_STRIDE - 1 if starts_video else 0)
        new = frames[:, :, self._open_frames:real]
        if n == k:
            self._cells_done, self._open_cell, self._open_frames = self._cells_done + 1, None, 0
        else:
            self._open_cell, self._open_frames = cell.contiguous(), real
        return new


# ----------------------------------------------------------------------------------------------
# Weights.


def load_vae(path: str | os.PathLike, config: VAEConfig | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> WanVAE:
    """Load `Wan2.2_VAE.pth` (or a .safetensors with the same names) strictly, frozen, in eval."""
    config = config or VAEConfig.preset("wan2.2")
    with torch.device("meta"):
        model = WanVAE(config)
    state_dict = read_state_dict(path)
    check_state_dict(model, state_dict, str(path))
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def random_vae(config: VAEConfig, seed: int = 0, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> WanVAE:
    """Deterministic random weights for tests and benchmarks, frozen, in eval.

    Weights N(0, 0.5^2 / fan_in) (halved so the residual streams of the 5B-size decoder stay
    well inside bf16/fp32 range), biases N(0, 0.05^2), norm gains 1 + N(0, 0.1^2). Built on
    `meta` and materialised on `device`, so the same seed gives the same values anywhere.
    """
    with torch.device("meta"):
        model = WanVAE(config)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for index, (name, param) in enumerate(model.named_parameters()):
            generator = torch.Generator(device=param.device).manual_seed(seed * 100003 + index)
            values = torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32)
            if name.endswith("gamma"):
                values = 1 + 0.1 * values
            elif param.dim() > 1:
                values = values * (0.5 / math.sqrt(param[0].numel()))
            else:
                values = 0.05 * values
            param.copy_(values)
    return model.to(dtype).eval().requires_grad_(False)


__all__ = [
    "LATENT_MEAN", "LATENT_STD", "PER_LATENT_PLAN", "VAE_PRESETS", "CausalCache", "DecodePlan", "StreamingDecoder",
    "Upsample", "VAEConfig", "WanVAE", "load_vae", "patchify", "random_vae", "subpixel_weight", "unpatchify",
]
