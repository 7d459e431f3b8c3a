"""The streaming VAE decode split spatially over the ranks of a replica, exact.

Rank r of W decodes the band `[a, b)` of latent positions along the longer latent axis. The
decoder's trunk (`conv1` and the middle: residual blocks around a whole-frame attention) runs on
the whole (small) latent frame; the up stages and the head run on the band plus a margin: every
3x3 convolution corrupts one pixel at a cut edge (zero padding where the neighbours are), so a
stage input carries as many extra pixels as the convolutions after it can corrupt, and after each
stage the tensor is cropped to the next stage's margin. What is left at the end is the band,
exact. Image edges are real edges (the margin is clipped there, the zero padding is the true
one). Temporal caches are per rank and see the same region every step, so the streaming state
stays exact too.

Margins of the 5B's decoder (3 residual blocks per stage, 2x up-sampling after stages 0-2): stage
inputs 13, 12, 10, 7 pixels at their own scale, head input 1: the redundant work is mostly at
low resolution (about 1.3x the band's work at 4 ranks on 720p, 1.7x at 8).

Legend: B batch, C channels, T frames, h/w latent size, n positions along the split axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from core.errors import UserError
from core.vae import CausalCache, CausalConv3d, Upsample, WanVAE, unpatchify


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


class BandDecoder:
    """`core.vae.StreamingDecoder` for one band: consecutive latent chunks in, the band's pixels out
    `[B, 3, frames, ...]` (the whole extent across the band), concatenating along the split axis to
    the whole decode."""

    def __init__(self, vae: WanVAE, plan: BandPlan):
        self.vae, self.plan = vae, plan
        self.cache = CausalCache()

    @torch.no_grad()
    def decode(self, latents_BCFhw: Tensor) -> Tensor:
        x = self.vae.denormalize(latents_BCFhw).to(self.vae.dtype)
        frames = [self._step(x[:, :, i:i + 1]) for i in range(x.shape[2])]
        return unpatchify(torch.cat(frames, dim=2))

    def _step(self, latent: Tensor) -> Tensor:
        """`core.vae.Decoder.forward` with a crop between the stages."""
        decoder, cache, plan = self.vae.decoder, self.cache, self.plan
        x = decoder.conv1(self.vae.conv2(latent), cache)
        first, attention, second = decoder.middle
        x = second(attention(first(x, cache)), cache)
        held = (0, plan.size)
        for level, stage in enumerate(decoder.upsamples):
            x = plan.crop(x, level, held)
            held = plan.region(level)
            x = stage(x, cache)
            grow = plan.scales[level + 1] // plan.scales[level]
            held = (held[0] * grow, held[1] * grow)
        head_level = len(decoder.upsamples)
        x = plan.crop(x, head_level, held)
        held = plan.region(head_level)
        for layer in decoder.head:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        cache.first_step = False
        return plan.crop(x, head_level + 1, held)


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
