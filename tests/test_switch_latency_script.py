"""docs/benchmarks/switch_latency.py on the CPU (tiny preset): the run it times is the one asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "switch_latency.py"


@pytest.mark.parametrize("chunks, type_at", [(3, 1)])
def test_tiny_run_generates_the_chunks_asked_for_and_switches_after_typing(chunks: int, type_at: int) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--height", "64", "--width", "64",
                          "--chunks", str(chunks), "--type-at", str(type_at)],
                         capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["chunks"] == chunks
    assert len(result["chunk_s"]) == chunks - 1  # intervals between the chunks written
    assert f"{chunks}/{chunks} chunks written" in run.stderr  # not chunks x frames_per_block
    assert type_at < result["switch_chunk"] < chunks  # the typed prompt lands on a later chunk
    assert result["enter_to_first_switched_frame_s"] > 0
