"""The scoring path against the vbench package itself, run in the VBench environment (skipped
without it: `longlive download --eval --env-only`), on videos these tests write with real cuts.

Each check runs as a script in that environment and prints JSON; the comparisons happen here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from core.errors import UserError
from core.eval.environment import DEFAULT_ENV_DIR, worker_python
from tests.conftest import made_once

REPO = Path(__file__).resolve().parents[1]
SCENES = (20, 37, 17)  # frames per scene at 8 fps: 2 s clips of 16 frames, tails, a short last scene


def _python() -> Path:
    try:
        return worker_python(DEFAULT_ENV_DIR)
    except UserError:
        pytest.skip("the VBench environment is not installed (longlive download --eval --env-only)")


pytestmark = [pytest.mark.vbench]


def in_env(script: str, *args: str) -> dict:
    """Run `script` with the VBench env's python (only this repo on the path); its last stdout line is JSON."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(_python()), "-c", textwrap.dedent(script), *args], env=env, capture_output=True,
                          text=True, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    def make(folder: Path) -> None:
        (folder / "videos").mkdir()
        in_env("""
            import sys
            from core.eval.synthetic import write_scene_video
            write_scene_video(sys.argv[1] + "/a cat-0.mp4", [20, 37, 17])
            write_scene_video(sys.argv[1] + "/a dog-0.mp4", [30], seed=1)
            print("{}")
        """, str(folder / "videos"))

    return made_once(tmp_path_factory, "eval-videos", make) / "videos" / "a cat-0.mp4"


def test_scene_split_equals_vbench_long(video, tmp_path):
    got = in_env("""
        import sys, json
        from core.eval import compat
        compat.install()
        import vbench2_beta_long.utils as long_utils
        from decord import VideoReader
        from core.eval.scenes import detect_scenes
        captured = {}
        save = long_utils.save_video_by_scene_list
        def capture(path, name, scene_list, output_dir=None):
            captured["scenes"] = [(int(s.get_frames()), int(e.get_frames())) for s, e in scene_list]
            return save(path, name, scene_list, output_dir)
        long_utils.save_video_by_scene_list = capture
        long_utils.split_video_into_scenes(sys.argv[1], sys.argv[2], 35.0)
        files = sorted(p for p in __import__("os").listdir(sys.argv[2]))
        lengths = [len(VideoReader(sys.argv[2] + "/" + f)) for f in files]
        print(json.dumps({"ours": detect_scenes(sys.argv[1], 35.0), "theirs": captured["scenes"],
                          "files": files, "lengths": lengths}))
    """, str(video), str(tmp_path))
    assert got["ours"] == got["theirs"] == [[0, 20], [20, 57], [57, 74]]
    assert got["files"] == [f"a cat-0-Scene-{i}.mp4" for i in range(3)]
    assert got["lengths"] == list(SCENES)


def test_clip_files_equal_clip_spans(video, tmp_path):
    """VBench-Long's split_video_into_clips on each scene file: clip k holds exactly the frames of span k
    (identified by nearest source frame, despite the re-encode)."""
    got = in_env("""
        import sys, json, os
        import numpy as np
        from core.eval import compat
        compat.install()
        from vbench2_beta_long.utils import split_video_into_clips
        from decord import VideoReader
        from core.eval.synthetic import scene_frames, write_video
        frames = scene_frames([20, 37, 17])
        source = frames.astype(np.float32)
        out, spans, offset = sys.argv[2], [], 0
        def nearest(frame):
            return int(np.argmin(np.abs(source - frame).mean(axis=(1, 2, 3))))
        for k, n in enumerate([20, 37, 17]):  # each scene as its own file, as VBench-Long's scene files
            path = f"{out}/scene-{k}.mp4"
            write_video(path, frames[offset:offset + n], 8.0)
            split_video_into_clips(path, out + "/clips", 2)
            for clip in sorted(os.listdir(f"{out}/clips/scene-{k}")):
                reader = VideoReader(f"{out}/clips/scene-{k}/{clip}")
                first = reader[0].asnumpy().astype(np.float32)
                last = reader[len(reader) - 1].asnumpy().astype(np.float32)
                spans.append([k, nearest(first), nearest(last) + 1, len(reader)])
            offset += n
        print(json.dumps(spans))
    """, str(video), str(tmp_path))
    from core.eval.vbench import video_clips

    expected = video_clips([(0, 20), (20, 57), (57, 74)], 8.0, 2.0)
    assert [tuple(g[:3]) for g in got] == expected
    assert [g[3] for g in got] == [end - start for _, start, end in expected]


def _cli(args: list[str], tmp_path: Path) -> dict:
    from longlive_cli.app import main

    out = tmp_path / "results.json"
    assert main(["eval-vbench", *args, "--out", str(out), "--device", "cpu"]) == 0
    return json.loads(out.read_text())


def test_temporal_flickering_equals_vbench(video, tmp_path):
    """Standard mode: our per-video and dimension scores == vbench's compute_temporal_flickering.
    Long mode, reencoded: each clip == vbench on VBench-Long's clip file of that span."""
    standard = _cli([str(video.parent), "--mode", "standard", "--dimensions", "temporal_flickering",
                     "--cache-dir", str(tmp_path)], tmp_path)
    theirs = in_env("""
        import sys, json, os
        from vbench.temporal_flickering import compute_temporal_flickering
        folder = sys.argv[1]
        videos = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".mp4"))
        info = sys.argv[2] + "/info.json"
        json.dump([{"prompt_en": "x", "dimension": ["temporal_flickering"], "video_list": videos}], open(info, "w"))
        score, per_video = compute_temporal_flickering(info, "cpu", [])
        print(json.dumps({"score": float(score), "videos": {os.path.basename(r["video_path"])[:-4]: r["video_results"]
                                                            for r in per_video}}))
    """, str(video.parent), str(tmp_path))
    for name, score in theirs["videos"].items():
        assert standard["videos"][name]["dimensions"]["temporal_flickering"]["score"] == score
    assert math.isclose(standard["dimensions"]["temporal_flickering"]["score"], theirs["score"], rel_tol=1e-12)


def test_frames_mode_scores_the_decoded_frames_of_each_span(video, tmp_path):
    """--clip-source frames == vbench's own function on a lossless file of the span's decoded frames."""
    results = _cli([str(video), "--dimensions", "temporal_flickering", "--scene-split", "--cache-dir",
                    str(tmp_path)], tmp_path)
    clips = results["videos"]["a cat-0"]["dimensions"]["temporal_flickering"]["clips"]
    theirs = in_env("""
        import sys, json, cv2, av
        from vbench.temporal_flickering import cal_score
        capture, frames = cv2.VideoCapture(sys.argv[1]), []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame)
        scores = []
        for k, span in enumerate(json.loads(sys.argv[3])):
            path = f"{sys.argv[2]}/span-{k}.mkv"
            with av.open(path, "w") as out:  # lossless: FFV1 in BGR
                stream = out.add_stream("ffv1", rate=8)
                stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "bgr0"
                for f in frames[span[0]:span[1]]:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="bgr24")):
                        out.mux(packet)
                for packet in stream.encode():
                    out.mux(packet)
            scores.append(cal_score(path))
        print(json.dumps(scores))
    """, str(video), str(tmp_path), json.dumps([[c["start"], c["end"]] for c in clips]))
    assert [c["score"] for c in clips] == pytest.approx(theirs, rel=1e-12, abs=0)
    reencoded = _cli([str(video), "--dimensions", "temporal_flickering", "--scene-split", "--clip-source",
                      "reencoded", "--cache-dir", str(tmp_path)], tmp_path)
    moved = [abs(a["score"] - b["score"]) for a, b in
             zip(clips, reencoded["videos"]["a cat-0"]["dimensions"]["temporal_flickering"]["clips"], strict=True)]
    assert 0 < max(moved) < 5e-3  # re-encoding moves scores a little, not a lot


@pytest.mark.slow
def test_every_standin_dimension_runs_end_to_end(tmp_path):
    """Seeded stand-ins (RAFT, AMT-S, MUSIQ as vbench ships them; small CLIP / ViT) through the CLI, on a
    16-frame video cut into two 1 s clips (so the clip-to-clip branch runs too)."""
    from core.eval.standins import STANDIN_DIMENSIONS

    cache, folder = tmp_path / "cache", tmp_path / "videos"
    in_env("""
        import sys
        from pathlib import Path
        from core.eval.standins import build, STANDIN_DIMENSIONS
        from core.eval.synthetic import write_scene_video
        build(Path(sys.argv[1]), list(STANDIN_DIMENSIONS))
        Path(sys.argv[2]).mkdir()
        write_scene_video(sys.argv[2] + "/a person is running-0.mp4", [16], width=128, height=128)
        print("{}")
    """, str(cache), str(folder))
    dims = [d for d in STANDIN_DIMENSIONS if d != "appearance_style"]  # needs VBench prompt info
    results = _cli([str(folder), "--dimensions", ",".join(dims), "--clip-seconds", "1", "--no-dev-flag",
                    "--cache-dir", str(cache)], tmp_path)
    video = results["videos"]["a person is running-0"]
    for dimension in dims:
        clips = video["dimensions"][dimension]["clips"]
        assert [(c["start"], c["end"]) for c in clips] == [(0, 8), (8, 16)], dimension
        assert all(math.isfinite(c["score"]) for c in clips), dimension
    assert all(c["score"] in (0.0, 1.0) and len(c["pair_scores"]) == 7
               for c in video["dimensions"]["dynamic_degree"]["clips"])
    dev = _cli([str(folder), "--dimensions", "subject_consistency", "--clip-seconds", "1", "--cache-dir", str(cache)],
               tmp_path)  # DINOv2 stand-in on the clip-to-clip branch, 0.5 / 0.5 fusion
    assert math.isfinite(dev["dimensions"]["subject_consistency"]["score"])
