"""Where and how a run executes: device and dtype resolution, and timing without host syncs."""

from __future__ import annotations

import time

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` -> the current CUDA device or the CPU; `cuda` gets its index."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """`auto` / None -> bf16 on a GPU (what the official runs), fp32 elsewhere; names like
    "bfloat16" -> the torch dtype."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype must name a torch dtype such as 'bfloat16' (got {dtype!r})")
        return resolved
    return dtype


class SpanTimer:
    """Durations of start()/stop() spans: CUDA events on the current stream of a GPU (the host
    never waits until `durations()`), wall clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple] = []
        self._start = None

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> None:
        self.spans.append((self._start, self._now()))

    def durations(self) -> list[float]:
        """Seconds of every span so far (synchronizes the GPU once)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in self.spans]
        return [b - a for a, b in self.spans]
