"""`bench --gpu-busy`: the union of kernel intervals against a rasterised reference; on a GPU, the
profiled last chunk reports a busy share in (0, 1] and its kernels."""

from __future__ import annotations

import json
import random

import pytest
import torch

from core.benchmark import busy_time
from longlive_cli.app import main


def rasterised(intervals: list[tuple[int, int]]) -> tuple[int, int]:
    """The slow obvious version on integer times: mark every covered unit."""
    if not intervals:
        return 0, 0
    covered = set()
    for start, end in intervals:
        covered.update(range(start, end))
    return len(covered), max(e for _, e in intervals) - min(s for s, _ in intervals)


@pytest.mark.parametrize("seed", range(6))
def test_busy_time_equals_the_rasterised_union(seed):
    rng = random.Random(seed)
    intervals = []
    for _ in range(rng.randint(0, 30)):
        start = rng.randint(0, 200)
        intervals.append((start, start + rng.randint(0, 25)))  # overlaps, nesting, touching, empty ones
    assert busy_time([(float(a), float(b)) for a, b in intervals]) == tuple(float(v) for v in rasterised(intervals))


def test_busy_time_of_known_cases():
    assert busy_time([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == (4.0, 6.0)  # one gap of 2
    assert busy_time([(0.0, 10.0), (2.0, 3.0)]) == (10.0, 10.0)  # nested
    assert busy_time([]) == (0.0, 0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bench_gpu_busy_on_a_gpu(capsys):
    assert main(["bench", "--preset", "tiny", "--frames-per-block", "2", "--window", "6", "--sink", "2",
                 "--frames", "12", "--device", "cuda", "--json", "--gpu-busy"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["gpu_busy_fraction"] <= 1 and result["gpu_kernels_per_block"] > 0
    assert result["steady_chunks"] == 2  # the profiled chunk is not among them
