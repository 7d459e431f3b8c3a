"""Shared by the GPU micro-benchmarks (METHOD.md): CUDA-event timing after a warm-up, median."""

from __future__ import annotations

import statistics
import sys

import torch


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def median_ms(fn, reps: int, warmup: int = 10) -> float:
    """Median over `reps` calls of `fn` (CUDA events around each), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    spans = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        spans.append((start, stop))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in spans)
