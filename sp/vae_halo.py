"""SP-aware VAE encoding: each rank encodes only the raw frames of its own latents plus a causal halo.

The Wan VAE is causal in time (latent 0 <- raw frame 0, latent i <- raw frames 4i-3..4i, with
temporal caches carried forward). Rank r keeps latents `[keep_start, keep_end)` and starts encoding
`halo` latents earlier to warm the caches. A window starting at latent a > 0 begins at raw frame
`4(a-1)` (the last frame of latent a-1), which the encoder takes alone as its causal "first frame":
one pseudo latent that is dropped with the halo. Windows starting at latent 0 reproduce the
full-clip latents exactly; later ones approximate them (the error shrinks as the halo grows).

Legend: B batch, T raw frames, H/W pixels, z latent channels, h/w latent size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from core.errors import UserError
from core.vae import TEMPORAL_STRIDE, WanVAE

DEFAULT_HALO_LATENTS = 28  # official default: ~112 raw frames of warm-up


@dataclass(frozen=True)
class HaloWindow:
    """One rank's encode plan: it keeps latents `[keep_start, keep_end)` and encodes from `halo_start`.
    Raw frames `[raw_start, raw_end)` encode to latents `[halo_start - pseudo, keep_end)`; the first
    `drop_latents` are dropped."""

    sp_rank: int
    keep_start: int
    keep_end: int
    halo_start: int
    stride: int = TEMPORAL_STRIDE  # raw frames per latent after the first

    @property
    def pseudo_first(self) -> bool:
        """The window starts at the last raw frame of latent `halo_start - 1`, encoded alone."""
        return self.halo_start > 0

    @property
    def raw_start(self) -> int:
        return self.stride * (self.halo_start - 1) if self.pseudo_first else 0

    @property
    def raw_end(self) -> int:
        return 1 + self.stride * (self.keep_end - 1)

    @property
    def drop_latents(self) -> int:
        return int(self.pseudo_first) + self.keep_start - self.halo_start

    @property
    def raw_frames(self) -> int:
        return self.raw_end - self.raw_start

    @property
    def local_latent_frames(self) -> int:
        return self.keep_end - self.keep_start


def halo_windows(latent_frames: int, raw_frames: int, sp: int, halo: int = DEFAULT_HALO_LATENTS,
                 stride: int = TEMPORAL_STRIDE) -> list[HaloWindow]:
    """The encode plan of every rank of an SP group for a clip of `raw_frames` frames giving
    `latent_frames` latents."""
    if sp < 1 or latent_frames % sp:
        raise UserError(f"{latent_frames} latent frames are not divisible by the sequence-parallel size {sp} "
                        f"(use a multiple of {sp} latent frames)")
    if halo < 0:
        raise UserError(f"VAE halo of {halo} latents must be >= 0 (default {DEFAULT_HALO_LATENTS})")
    needed = 1 + stride * (latent_frames - 1)
    if raw_frames < needed:
        raise UserError(f"a clip of {raw_frames} raw frames is too short for {latent_frames} latent frames "
                        f"(needs {needed}: use shorter clips or fewer latent frames)")
    local = latent_frames // sp
    return [HaloWindow(rank, rank * local, (rank + 1) * local, max(0, rank * local - halo), stride)
            for rank in range(sp)]


def raw_window(video_BCTHW: Tensor, window: HaloWindow) -> Tensor:
    """The window's raw frames of the whole clip."""
    return video_BCTHW[:, :, window.raw_start:window.raw_end]


@torch.no_grad()
def encode_rank_window(vae: WanVAE, window_BCTHW: Tensor, window: HaloWindow) -> Tensor:
    """Encode a rank's raw window and return its kept latents `[B, z, keep, h, w]`.

    `WanVAE.encode` takes the window's first raw frame alone, so with `pseudo_first` the last frame of
    the latent before the halo serves as the causal first frame; its latent is dropped with the halo."""
    if window_BCTHW.shape[2] != window.raw_frames:
        raise ValueError(f"rank {window.sp_rank}'s window has {window.raw_frames} raw frames "
                         f"(got {window_BCTHW.shape[2]}): pass raw_window(video, window)")
    latents = vae.encode(window_BCTHW)
    keep = window.local_latent_frames
    assert latents.shape[2] == window.drop_latents + keep, (tuple(latents.shape), window)
    return latents[:, :, window.drop_latents:].contiguous()


def scatter_raw_windows(video_BCTHW: Tensor | None, windows: list[HaloWindow], group: dist.ProcessGroup | None,
                        device: torch.device | str = "cpu") -> Tensor:
    """Send each rank of the SP group its raw window from the group's first rank, which passes the
    whole clip (the others pass None and receive on `device`). Returns this rank's window."""
    group = dist.group.WORLD if group is None else group
    rank = dist.get_rank(group)
    root = dist.get_global_rank(group, 0)
    header = [None]
    if rank == 0:
        assert video_BCTHW is not None, "the SP root must pass the clip"
        batch, channels, _, height, width = video_BCTHW.shape
        header = [(batch, channels, height, width, video_BCTHW.dtype)]
    dist.broadcast_object_list(header, src=root, group=group)
    batch, channels, height, width, dtype = header[0]
    window = windows[rank]
    if rank != 0:
        received = torch.empty(batch, channels, window.raw_frames, height, width, dtype=dtype, device=device)
        dist.recv(received, src=root, group=group)
        return received
    for peer in windows[1:]:
        dist.send(raw_window(video_BCTHW, peer).contiguous(), dst=dist.get_global_rank(group, peer.sp_rank),
                  group=group)
    return raw_window(video_BCTHW, window)
