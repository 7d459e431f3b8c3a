"""A PNG loss curve with no plotting library: rasterise the polyline, write PNG with zlib."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch

from core.checkpoint import atomic_write


def _png_bytes(rgb_HW3: torch.Tensor) -> bytes:
    height, width, _ = rgb_HW3.shape
    filter_bytes = torch.zeros(height, 1, dtype=torch.uint8)  # filter type 0 (none) before every row
    raw = torch.cat([filter_bytes, rgb_HW3.reshape(height, width * 3)], dim=1).numpy().tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def loss_curve_image(steps: list[int], losses: list[float], width: int = 640, height: int = 360,
                     margin: int = 24) -> torch.Tensor:
    """White canvas, grey axes, the loss as a blue polyline (log scale when it spans > 10x)."""
    image = torch.full((height, width, 3), 255, dtype=torch.uint8)
    image[height - margin, margin:width - margin] = 128
    image[margin:height - margin, margin] = 128
    values = torch.tensor(losses, dtype=torch.float64)
    finite = values[torch.isfinite(values)]
    if len(finite) == 0:
        return image
    if finite.min() > 0 and finite.max() / finite.min() > 10:
        values = values.log10()
        finite = finite.log10()
    lo, hi = float(finite.min()), float(finite.max())
    span = hi - lo or 1.0
    first, last = steps[0], steps[-1]
    xs = [margin + (s - first) / max(last - first, 1) * (width - 2 * margin - 1) for s in steps]
    ys = [height - margin - 1 - (float(v) - lo) / span * (height - 2 * margin - 1) for v in values]
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if y == y]
    blue = torch.tensor([31, 119, 180], dtype=torch.uint8)
    for (x0, y0), (x1, y1) in zip(points, points[1:] or points, strict=False):
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for i in range(n + 1):
            x = round(x0 + (x1 - x0) * i / n)
            y = round(y0 + (y1 - y0) * i / n)
            image[max(y - 1, 0):y + 1, max(x - 1, 0):x + 1] = blue
    return image


def write_loss_curve(path: Path, steps: list[int], losses: list[float]) -> Path:
    """Write the loss curve as a PNG at `path` (atomically: readers never see a half-written file)."""
    path = Path(path)
    data = _png_bytes(loss_curve_image(steps, losses))
    atomic_write(path, lambda temp: Path(temp).write_bytes(data))
    return path
