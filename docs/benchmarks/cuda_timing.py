"""Shared by the GPU micro-benchmarks (METHOD.md): CUDA-event timing after a warm-up, median."""

from __future__ import annotations

import statistics
import sys

import torch


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def median_ms(fn, reps: int, warmup: int = 10, calls: int = 1) -> float:
    """Median over `reps` samples (CUDA events around each) of the mean time of `calls` back-to-back
    calls of `fn`, after `warmup` calls. calls > 1 hides the host's launch latency of short kernels
    behind the queued ones instead of counting it."""
    for _ in range(warmup):
        fn()
    spans = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        spans.append((start, stop))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) / calls for a, b in spans)
