"""3-D rotary position embedding of the Wan DiT.

A head of size d holds d/2 rotation pairs, interleaved: elements (2i, 2i+1) are the real and
imaginary part of pair i. The pairs are split over the axes (time, height, width) as
(c - 2*(c//3), c//3, c//3) with c = d/2 (22/21/21 for d = 128), and each axis has its own base
`theta^(-2j/n_axis)`, n_axis = 2 * its pair count. Height and width positions count from 0 in
every call; the temporal position is the absolute latent-frame index plus an optional shot
offset, so cached keys (rotated once, when written) stay valid after any number of cache rolls.

Legend: B batch, L tokens, N heads, P = d/2 pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    pairs = head_dim // 2
    spatial = pairs // 3
    return pairs - 2 * spatial, spatial, spatial


def inverse_frequencies(pairs: int, theta: float) -> Tensor:
    """float64 `theta^(-2j/(2*pairs))`, j = 0..pairs-1."""
    # Explicit CPU device: the model may be built under `torch.device("meta")`.
    exponent = torch.arange(0, 2 * pairs, 2, dtype=torch.float64, device="cpu") / (2 * pairs)
    return 1.0 / torch.pow(torch.tensor(theta, dtype=torch.float64, device="cpu"), exponent)


@dataclass(frozen=True)
class RotaryTable:
    """cos/sin of every token's rotation angles: `[B or 1, L, 1, P]`, float32 (float64 for
    float64 inputs). Built once per forward and shared by every layer."""

    cos: Tensor
    sin: Tensor

    def rotate(self, x_BLND: Tensor) -> Tensor:
        """Rotate the interleaved pairs of `x` [B, L, N, d]; returns x's dtype."""
        pairs = x_BLND.to(self.cos.dtype).unflatten(-1, (-1, 2))
        real, imag = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((real * self.cos - imag * self.sin,
                               real * self.sin + imag * self.cos), dim=-1)
        return rotated.flatten(-2).to(x_BLND.dtype)

    def concat(self, other: RotaryTable) -> RotaryTable:
        """Tokens of `self` followed by the tokens of `other` (teacher forcing: clean | noisy)."""
        return RotaryTable(torch.cat([self.cos, other.cos], dim=1),
                           torch.cat([self.sin, other.sin], dim=1))


class Rope3D:
    """Per-axis inverse frequencies of a head size; builds `RotaryTable`s for token grids."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        self.pairs = axis_pairs(head_dim)
        self.inv_freq = [inverse_frequencies(p, theta) for p in self.pairs]

    def table(self, frame_positions: Tensor, height: int, width: int,
              dtype: torch.dtype = torch.float32) -> RotaryTable:
        """Angles for a grid of frames x height x width tokens in (f, h, w) order.

        `frame_positions` is float64 `[F]` (shared) or `[B, F]` (per sample): the temporal
        position of each frame, already including start frame and shot offset.
        """
        device = frame_positions.device
        positions = frame_positions.to(torch.float64)
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)
        batch, frames = positions.shape
        inv_t, inv_h, inv_w = (f.to(device) for f in self.inv_freq)
        angle_t = positions[:, :, None] * inv_t  # [B, F, Pt]
        angle_h = torch.arange(height, device=device, dtype=torch.float64)[:, None] * inv_h
        angle_w = torch.arange(width, device=device, dtype=torch.float64)[:, None] * inv_w
        grid = (batch, frames, height, width)
        angles = torch.cat([
            angle_t[:, :, None, None, :].expand(*grid, -1),
            angle_h[None, None, :, None, :].expand(*grid, -1),
            angle_w[None, None, None, :, :].expand(*grid, -1),
        ], dim=-1).reshape(batch, frames * height * width, 1, -1)
        return RotaryTable(torch.cos(angles).to(dtype), torch.sin(angles).to(dtype))


def frame_positions(num_frames: int, start_frame: int = 0, offset: float | Tensor = 0.0,
                    device: torch.device | str = "cpu") -> Tensor:
    """float64 temporal positions `start + f + offset`.

    `offset` is a number (one shot offset for all), a `[F]` tensor (per frame), or a `[B, F]` /
    `[B, 1]` tensor (per sample); the result is `[F]` or `[B, F]`.
    """
    base = torch.arange(start_frame, start_frame + num_frames, device=device, dtype=torch.float64)
    if not torch.is_tensor(offset):
        return base + float(offset)
    offset = offset.to(device=device, dtype=torch.float64)
    if offset.dim() == 0:
        return base + offset
    if offset.dim() == 1:
        if offset.numel() != num_frames:
            raise ValueError(f"rope_offset of shape {tuple(offset.shape)} must have one value per "
                             f"frame ({num_frames}); use [B, 1] for one offset per sample")
        return base + offset
    if offset.dim() == 2 and offset.shape[1] in (1, num_frames):
        return base[None, :] + offset
    raise ValueError(f"rope_offset must be a number, [F], [B, F] or [B, 1] "
                     f"(got shape {tuple(offset.shape)})")
