"""docs/benchmarks/shapes_frame_strip.py: rows pair each chosen prompt's ground truth with its video,
chosen evenly over the prompt list, and the PNG is written."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "shapes_frame_strip.py"
spec = importlib.util.spec_from_file_location("shapes_frame_strip", SCRIPT)
strip = importlib.util.module_from_spec(spec)
spec.loader.exec_module(strip)

PROMPTS = ["a red circle moves left to right on a blue background",
           "a green square moves top to bottom on a white background",
           "a yellow triangle moves right to left on a black background"]


@pytest.mark.parametrize("total, count, expected", [
    (5, 3, [0, 2, 4]), (48, 2, [0, 47]), (3, 6, [0, 1, 2]), (4, 1, [0])])
def test_chosen_spreads_over_the_list(total, count, expected):
    videos = {f"prompts-{i:03d}": {} for i in range(total)}
    assert strip.chosen(videos, count) == [f"prompts-{i:03d}" for i in expected]


def _probe_run(tmp_path: Path, frames: int = 12, size: int = 64) -> Path:
    from core.train.synthetic import parse_caption, render_clip, write_video

    folder = tmp_path / "R_videos"
    folder.mkdir()
    videos = {}
    for i, prompt in enumerate(PROMPTS):
        # the middle video is the wrong clip: its row must show its own frames, not the truth's
        source = PROMPTS[(i + 1) % 3] if i == 1 else prompt
        write_video(folder / f"prompts-{i:03d}.mp4", render_clip(parse_caption(source), frames, size, size))
        videos[f"prompts-{i:03d}"] = {"num_frames": frames, "shots": [{
            "prompt": prompt, "split": "seen", "start": 0, "end": frames,
            "read": {"shape": "circle", "direction": "left to right"}}]}
    result = tmp_path / "R.json"
    result.write_text(json.dumps({"parts": {"prompts": {"videos": videos}}}))
    return result


def test_rows_put_the_truth_above_the_generated_frames(tmp_path):
    rows = strip.strip_rows(_probe_run(tmp_path), count=3, frames=4)
    assert [label.split("  [")[0] for label, _, _ in rows] == PROMPTS
    for index, (_, truth, generated) in enumerate(rows):
        assert truth.shape == generated.shape == (64, 4 * 64, 3)
        error = np.abs(truth.astype(np.int16) - generated.astype(np.int16)).mean()
        assert (error > 20) if index == 1 else (error < 4), (index, error)


def test_script_writes_the_png(tmp_path):
    out = tmp_path / "strip.png"
    done = subprocess.run([sys.executable, str(SCRIPT), str(_probe_run(tmp_path)), "--out", str(out),
                           "--videos", "2", "--frames", "3"], capture_output=True, text=True,
                          cwd=SCRIPT.parents[2], env={"PYTHONPATH": str(SCRIPT.parents[2]), "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["R.json", "R_videos", "strip.png"]  # no temp left


def test_missing_result_is_one_line_exit_2(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "none.json"), "--out", str(tmp_path / "s.png")],
                          capture_output=True, text=True, cwd=SCRIPT.parents[2],
                          env={"PYTHONPATH": str(SCRIPT.parents[2]), "PATH": ""})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "missing" in done.stderr
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("source, reads_right", [(PROMPTS[0], True), (PROMPTS[2], False)])
def test_one_video_row_is_read_by_the_probe_against_its_prompt(tmp_path, source, reads_right):
    from core.train.synthetic import parse_caption, render_clip, write_video

    video = tmp_path / "demo.mp4"
    write_video(video, render_clip(parse_caption(source), 32, 64, 64))
    ((label, truth, generated),) = strip.video_rows(video, PROMPTS[0], frames=4)
    assert label.startswith(PROMPTS[0] + "  [seen; read: ")
    assert ("read: circle, left to right" in label) == reads_right, label
    assert truth.shape == generated.shape == (64, 4 * 64, 3)


@pytest.mark.parametrize("args, says", [
    (["--video", "none.mp4", "--prompt", PROMPTS[0]], "missing"),
    (["--video", "v.mp4", "--prompt", "a red blob"], "not a shapes-world caption"),
    (["--video", "v.mp4"], "--video and --prompt"),
    ([], "--video and --prompt")])
def test_bad_video_arguments_are_one_line_exit_2(tmp_path, args, says):
    from core.train.synthetic import parse_caption, render_clip, write_video

    write_video(tmp_path / "v.mp4", render_clip(parse_caption(PROMPTS[0]), 8, 32, 32))
    done = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", "s.png"], capture_output=True, text=True,
                          cwd=tmp_path, env={"PYTHONPATH": str(SCRIPT.parents[2]), "PATH": ""})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and says in done.stderr, done.stderr
    assert not (tmp_path / "s.png").exists()
