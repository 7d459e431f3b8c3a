"""The streaming VAE decode split spatially over the ranks of a replica, exact.

Rank r of W decodes the band `[a, b)` of latent positions along the longer latent axis. The
decoder's trunk (`conv1` and the middle: residual blocks around a whole-frame attention) runs on
the whole (small) latent frame; the up stages and the head run on the band plus a margin: every
3x3 convolution corrupts one pixel at a cut edge (zero padding where the neighbours are), so a
stage input carries as many extra pixels as the convolutions after it can corrupt, and after each
stage the tensor is cut to the next level's margin. What is left at the end is the band, exact.
Image edges are real edges (the margin is clipped there, the zero padding is the true one).
Temporal caches are per rank and see the same region every step, so the streaming state stays
exact too. The band decoder is `core.vae`'s own (`StreamingDecoder`, `Decoder` with its cells and
frame slices) over the same modules, with the up stages wrapped (`BandStage`).

Margins of the 5B's decoder (3 residual blocks per stage, 2x up-sampling after stages 0-2): stage
inputs 13, 12, 10, 7 pixels at their own scale, head input 1. Most of the decoder's work is at the
high resolutions where the margins are small: by the FLOPs per stage, a rank does about 1.3x its
band's share at 4 ranks on 720p and 1.7x at 8 (estimates; docs/benchmarks/sp_decode.py measures).

Legend: B batch, C channels, T frames, h/w latent size, n positions along the split axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from core.errors import UserError
from core.vae import CausalCache, DecodePlan, Decoder, Upsample, WanVAE


def _radius(module: nn.Module) -> int:
    """Pixels a chain of convolutions reaches sideways (sum over its convolutions)."""
    return sum(m.kernel_size[-1] // 2 for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))


def _stage_parts(stage: nn.Module) -> tuple[int, Upsample | None]:
    """(radius of the stage's residual blocks, its Upsample or None)."""
    blocks = [block for block in stage.upsamples if not isinstance(block, Upsample)]
    upsample = next((block for block in stage.upsamples if isinstance(block, Upsample)), None)
    return sum(_radius(block) for block in blocks), upsample


def decoder_margins(vae: WanVAE) -> tuple[int, ...]:
    """Margins in pixels of each level's own scale: every up-stage input, the head input, the output
    (0). Walked backwards: an up-sampling doubles what the next level needs, minus rounding."""
    margins = [0, _radius(vae.decoder.head)]
    for stage in reversed(vae.decoder.upsamples):
        needed = margins[-1]
        blocks, upsample = _stage_parts(stage)
        if upsample is not None:  # nearest 2x, then a convolution at the new scale
            needed = -(-(needed + _radius(upsample.resample)) // 2)
        margins.append(needed + blocks)
    return tuple(reversed(margins))


def decoder_scales(vae: WanVAE) -> tuple[int, ...]:
    """Scale of each level (as `decoder_margins`) relative to the latent grid."""
    scales = [1]
    for stage in vae.decoder.upsamples:
        scales.append(scales[-1] * (2 if _stage_parts(stage)[1] is not None else 1))
    return (*scales, scales[-1])


def split_axis(height: int, width: int) -> int:
    """The tensor dim to split `[B, C, T, h, w]` along: the longer latent side (width on a tie)."""
    return 3 if height > width else 4


def band_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous bands of `size` positions, as even as integers allow."""
    if size < parts:
        raise UserError(f"the latent frame is {size} positions across: it cannot be split into {parts} decode "
                        f"bands (use --decode sync, or fewer ranks)")
    return [(i * size // parts, (i + 1) * size // parts) for i in range(parts)]


@dataclass(frozen=True)
class BandPlan:
    """Rank `index`'s band `[start, end)` of `size` latent positions along tensor dim `axis`."""

    axis: int
    size: int
    start: int
    end: int
    margins: tuple[int, ...]
    scales: tuple[int, ...]

    def region(self, level: int) -> tuple[int, int]:
        """Positions, at the level's scale, the tensor holds when it enters `level`."""
        scale, margin = self.scales[level], self.margins[level]
        return max(0, scale * self.start - margin), min(scale * self.size, scale * self.end + margin)

    def held(self, level: int) -> tuple[int, int]:
        """Positions the tensor arriving at `level` holds: the whole axis after the decoder's trunk,
        else the previous level's region at this level's scale."""
        if level == 0:
            return 0, self.size
        grow = self.scales[level] // self.scales[level - 1]
        lo, hi = self.region(level - 1)
        return lo * grow, hi * grow

    def crop(self, x: Tensor, level: int, held: tuple[int, int]) -> Tensor:
        """`x` holding positions `held` (at the level's scale) cut to the level's region."""
        lo, hi = self.region(level)
        assert held[0] <= lo and hi <= held[1], (held, (lo, hi))
        return x.narrow(self.axis, lo - held[0], hi - lo)


def band_plans(vae: WanVAE, height: int, width: int, parts: int) -> list[BandPlan]:
    axis = split_axis(height, width)
    size = height if axis == 3 else width
    margins, scales = decoder_margins(vae), decoder_scales(vae)
    return [BandPlan(axis, size, start, end, margins, scales) for start, end in band_bounds(size, parts)]


class BandStage(nn.Module):
    """Up stage `level` of a decoder that decodes one band: its input (holding the previous level's
    region) is cut to this level's region; the last stage also cuts its output to the head's."""

    def __init__(self, stage: nn.Module, plan: BandPlan, level: int, last: bool):
        super().__init__()
        self.stage, self.plan, self.level, self.last = stage, plan, level, last
        self.out_channels = stage.out_channels
        self.frames_out_per_in = stage.frames_out_per_in  # read by `Decoder._up_from`

    def frames_per_slice(self, x: Tensor, slice_bytes: int | None) -> int | None:
        return self.stage.frames_per_slice(x, slice_bytes)

    def forward(self, x: Tensor, cache: CausalCache, starts_video: bool, subpixel: bool = False) -> Tensor:
        plan, level = self.plan, self.level
        x = self.stage(plan.crop(x, level, plan.held(level)), cache, starts_video, subpixel)
        return plan.crop(x, level + 1, plan.held(level + 1)) if self.last else x


class BandDecoderModule(Decoder):
    """`core.vae.Decoder` on one band: the same modules (and so the same cache entries and any
    compiled units), with the up stages wrapped in `BandStage`; `Decoder`'s own cell and slice
    logic runs unchanged."""

    def __init__(self, decoder: Decoder, plan: BandPlan):
        nn.Module.__init__(self)
        self.conv1, self.middle, self.head = decoder.conv1, decoder.middle, decoder.head
        stages = list(decoder.upsamples)
        self.upsamples = nn.Sequential(*(BandStage(stage, plan, level, level == len(stages) - 1)
                                         for level, stage in enumerate(stages)))
        for unit in ("low_res", "head_out"):  # compiled units (core.optimize) are instance attributes
            if unit in decoder.__dict__:
                self.__dict__[unit] = decoder.__dict__[unit]


class BandVAE(WanVAE):
    """The decoding half of a `WanVAE` for one band (shares every module and weight)."""

    def __init__(self, vae: WanVAE, plan: BandPlan):
        nn.Module.__init__(self)
        self.config, self.conv2 = vae.config, vae.conv2
        self.decoder = BandDecoderModule(vae.decoder, plan)
        self.latent_mean, self.latent_std = vae.latent_mean, vae.latent_std


class BandDecoder:
    """`core.vae.StreamingDecoder` for one band: consecutive latent chunks in, the band's pixels out
    `[B, 3, frames, ...]` (the whole extent across the band), concatenating along the split axis to
    the whole decode with the same `DecodePlan`."""

    def __init__(self, vae: WanVAE, plan: BandPlan, decode_plan: DecodePlan | None = None):
        self.plan = plan
        self.stream = BandVAE(vae, plan).streaming_decoder(decode_plan)

    @torch.no_grad()
    def decode(self, latents_BCFhw: Tensor) -> Tensor:
        pixels = self.stream.decode(latents_BCFhw)  # the head's region, 2 pixels per head output
        head = len(self.plan.margins) - 2
        lo, hi = self.plan.held(head + 1)
        per_pixel = pixels.shape[self.plan.axis] // (hi - lo)
        first = self.plan.scales[head] * self.plan.start
        size = self.plan.scales[head] * (self.plan.end - self.plan.start)
        return pixels.narrow(self.plan.axis, per_pixel * (first - lo), per_pixel * size)


class GatheredBandDecoder:
    """Each rank of `group` decodes its band; the root (global rank `root`) gets the whole frames,
    the other ranks an empty `[B, 3, 0, H, W]` (they write nothing)."""

    def __init__(self, vae: WanVAE, group: dist.ProcessGroup, root: int):
        self.vae, self.group, self.root = vae, group, root
        self.rank, self.parts = dist.get_rank(group), dist.get_world_size(group)
        self.band: BandDecoder | None = None
        self.plans: list[BandPlan] = []

    def decode(self, latents_BCFhw: Tensor) -> Tensor:
        if self.band is None:
            self.plans = band_plans(self.vae, latents_BCFhw.shape[3], latents_BCFhw.shape[4], self.parts)
            self.band = BandDecoder(self.vae, self.plans[self.rank])
        pixels = self.band.decode(latents_BCFhw)
        plan = self.plans[self.rank]
        stride = pixels.shape[plan.axis] // (plan.end - plan.start)
        widest = max(p.end - p.start for p in self.plans) * stride
        padded = nn.functional.pad(pixels, (0, 0, 0, widest - pixels.shape[plan.axis]) if plan.axis == 3
                                   else (0, widest - pixels.shape[plan.axis])).contiguous()
        is_root = dist.get_rank() == self.root
        parts = [torch.empty_like(padded) for _ in self.plans] if is_root else None
        dist.gather(padded, parts, dst=self.root, group=self.group)
        if not is_root:
            batch, _, _, height, width = latents_BCFhw.shape
            return pixels.new_zeros(batch, 3, 0, height * stride, width * stride)
        return torch.cat([part.narrow(plan.axis, 0, (p.end - p.start) * stride)
                          for part, p in zip(parts, self.plans, strict=True)], dim=plan.axis)
