"""`bench --gpu-busy`: the union of kernel intervals against a rasterised reference; on a GPU, the
profiled last chunk reports a busy share in (0, 1] and its kernels."""

from __future__ import annotations

import json
import random

import pytest
import torch

from core.benchmark import busy_time, kernel_table
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
    top = result["gpu_top_kernels"]
    assert top and sum(k["calls"] for k in top) <= result["gpu_kernels_per_block"]
    assert [k["ms"] for k in top] == sorted((k["ms"] for k in top), reverse=True)
    assert result["steady_chunks"] == 2  # the profiled chunk is not among them


@pytest.mark.parametrize("seed", range(4))
def test_kernel_table_totals_each_name_against_a_loop(seed):
    rng = random.Random(seed)
    names = ["gemm", "norm", "attn", "copy"]
    events = []
    for _ in range(rng.randint(1, 40)):
        start = rng.uniform(0, 1000)
        events.append((rng.choice(names), start, start + rng.uniform(0, 50)))
    table = kernel_table(events, top=3)
    whole = sum(end - start for _, start, end in events)
    expected = []
    for name in names:  # the obvious version: one pass per name
        mine = [end - start for n, start, end in events if n == name]
        if mine:
            expected.append((name, sum(mine), len(mine)))
    expected.sort(key=lambda row: (-row[1], row[0]))
    assert [k["name"] for k in table] == [name for name, _, _ in expected[:3]]
    for row, (_, us, calls) in zip(table, expected, strict=False):
        assert row["ms"] == pytest.approx(us / 1e3) and row["calls"] == calls
        assert row["share"] == pytest.approx(us / whole)


def test_kernel_table_of_no_kernels_is_empty():
    assert kernel_table([], top=5) == []
