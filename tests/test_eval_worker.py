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


# Everything these tests need from vbench's side, computed by one process in its environment (each
# process there pays ~7 s of imports: vbench imports torchvision, which imports dynamo): the test
# videos, VBench-Long's scene split and clip files, vbench's flickering scores on the videos and on
# lossless files of the expected clip spans, and the stand-in weights with their video.
REFERENCE = """
    import json, os, sys
    from pathlib import Path
    import numpy as np
    import av, cv2
    from core.eval import compat
    compat.install()
    import vbench2_beta_long.utils as long_utils
    from decord import VideoReader
    from vbench.temporal_flickering import cal_score, compute_temporal_flickering
    from core.eval.scenes import detect_scenes
    from core.eval.standins import build, STANDIN_DIMENSIONS
    from core.eval.synthetic import scene_frames, write_scene_video, write_video
    from core.eval.vbench import video_clips

    root, scenes = Path(sys.argv[1]), json.loads(sys.argv[2])
    videos = root / "videos"
    videos.mkdir()
    cat = str(videos / "a cat-0.mp4")
    write_scene_video(cat, scenes)
    write_scene_video(videos / "a dog-0.mp4", [30], seed=1)
    out = {}

    # VBench-Long's scene split (its cut list captured on the way to its scene files)
    captured, save = {}, long_utils.save_video_by_scene_list
    def capture(path, name, scene_list, output_dir=None):
        captured["scenes"] = [(int(s.get_frames()), int(e.get_frames())) for s, e in scene_list]
        return save(path, name, scene_list, output_dir)
    long_utils.save_video_by_scene_list = capture
    (root / "split").mkdir()
    long_utils.split_video_into_scenes(cat, str(root / "split"), 35.0)
    files = sorted(os.listdir(root / "split"))
    out["split"] = {"ours": detect_scenes(cat, 35.0), "theirs": captured["scenes"], "files": files,
                    "lengths": [len(VideoReader(str(root / "split" / f))) for f in files]}

    # VBench-Long's clip files of each scene file: clip k's source span (nearest source frame)
    frames = scene_frames(scenes)
    source, spans, offset = frames.astype(np.float32), [], 0
    def nearest(frame):
        return int(np.argmin(np.abs(source - frame).mean(axis=(1, 2, 3))))
    (root / "clips").mkdir()
    for k, n in enumerate(scenes):  # each scene as its own file, as VBench-Long's scene files
        path = str(root / "clips" / f"scene-{k}.mp4")
        write_video(path, frames[offset:offset + n], 8.0)
        long_utils.split_video_into_clips(path, str(root / "clips" / "out"), 2)
        for clip in sorted(os.listdir(root / "clips" / "out" / f"scene-{k}")):
            reader = VideoReader(str(root / "clips" / "out" / f"scene-{k}" / clip))
            first = reader[0].asnumpy().astype(np.float32)
            last = reader[len(reader) - 1].asnumpy().astype(np.float32)
            spans.append([k, nearest(first), nearest(last) + 1, len(reader)])
        offset += n
    out["clip_files"] = spans

    # vbench's temporal flickering on the two videos (standard mode)
    listed = sorted(str(v) for v in videos.glob("*.mp4"))
    info = str(root / "info.json")
    json.dump([{"prompt_en": "x", "dimension": ["temporal_flickering"], "video_list": listed}], open(info, "w"))
    score, per_video = compute_temporal_flickering(info, "cpu", [])
    out["flickering"] = {"score": float(score), "videos": {os.path.basename(r["video_path"])[:-4]: r["video_results"]
                                                           for r in per_video}}

    # vbench's cal_score on lossless (FFV1, BGR) files of the decoded frames of each expected clip span
    capture_, decoded = cv2.VideoCapture(cat), []
    while True:
        ok, frame = capture_.read()
        if not ok:
            break
        decoded.append(frame)
    cuts, offset = [], 0
    for n in scenes:
        cuts.append((offset, offset + n))
        offset += n
    expected, scores = video_clips(cuts, 8.0, 2.0), []
    for k, (_, start, end) in enumerate(expected):
        path = str(root / f"span-{k}.mkv")
        with av.open(path, "w") as container:
            stream = container.add_stream("ffv1", rate=8)
            stream.width, stream.height, stream.pix_fmt = decoded[0].shape[1], decoded[0].shape[0], "bgr0"
            for f in decoded[start:end]:
                for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="bgr24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        scores.append(cal_score(path))
    out["frames_mode"] = {"spans": [[start, end] for _, start, end in expected], "scores": scores}

    # seeded stand-ins for every dimension, and an 8-frame video at 4 fps (two 1 s clips of 4 frames)
    build(root / "standins", list(STANDIN_DIMENSIONS))
    (root / "standin-videos").mkdir()
    write_scene_video(root / "standin-videos" / "a person is running-0.mp4", [8], fps=4.0, width=128, height=128)
    (root / "reference.json").write_text(json.dumps(out))
    print("{}")
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    """(the shared folder, vbench's side as JSON): made once per run (tests/conftest.made_once)."""
    folder = made_once(tmp_path_factory, "eval-vbench-side",
                       lambda folder: in_env(REFERENCE, str(folder), json.dumps(list(SCENES))))
    return folder, json.loads((folder / "reference.json").read_text())


@pytest.fixture(scope="module")
def video(reference) -> Path:
    return reference[0] / "videos" / "a cat-0.mp4"


def test_scene_split_equals_vbench_long(reference):
    got = reference[1]["split"]
    assert got["ours"] == got["theirs"] == [[0, 20], [20, 57], [57, 74]]
    assert got["files"] == [f"a cat-0-Scene-{i}.mp4" for i in range(3)]
    assert got["lengths"] == list(SCENES)


def test_clip_files_equal_clip_spans(reference):
    """VBench-Long's split_video_into_clips on each scene file: clip k holds exactly the frames of span k
    (identified by nearest source frame, despite the re-encode)."""
    from core.eval.vbench import video_clips

    got = reference[1]["clip_files"]
    expected = video_clips([(0, 20), (20, 57), (57, 74)], 8.0, 2.0)
    assert [tuple(g[:3]) for g in got] == expected
    assert [g[3] for g in got] == [end - start for _, start, end in expected]


def _cli(args: list[str], tmp_path: Path) -> dict:
    from longlive_cli.app import main

    out = tmp_path / "results.json"
    assert main(["eval-vbench", *args, "--out", str(out), "--device", "cpu"]) == 0
    return json.loads(out.read_text())


def test_temporal_flickering_equals_vbench(reference, video, tmp_path):
    """Standard mode: our per-video and dimension scores == vbench's compute_temporal_flickering."""
    standard = _cli([str(video.parent), "--mode", "standard", "--dimensions", "temporal_flickering",
                     "--cache-dir", str(tmp_path)], tmp_path)
    theirs = reference[1]["flickering"]
    assert sorted(theirs["videos"]) == sorted(standard["videos"]) == ["a cat-0", "a dog-0"]
    for name, score in theirs["videos"].items():
        assert standard["videos"][name]["dimensions"]["temporal_flickering"]["score"] == score
    assert math.isclose(standard["dimensions"]["temporal_flickering"]["score"], theirs["score"], rel_tol=1e-12)


def test_frames_mode_scores_the_decoded_frames_of_each_span(reference, video, tmp_path):
    """--clip-source frames == vbench's own function on a lossless file of the span's decoded frames."""
    results = _cli([str(video), "--dimensions", "temporal_flickering", "--scene-split", "--cache-dir",
                    str(tmp_path)], tmp_path)
    clips = results["videos"]["a cat-0"]["dimensions"]["temporal_flickering"]["clips"]
    theirs = reference[1]["frames_mode"]
    assert [[c["start"], c["end"]] for c in clips] == theirs["spans"]
    assert [c["score"] for c in clips] == pytest.approx(theirs["scores"], rel=1e-12, abs=0)
    reencoded = _cli([str(video), "--dimensions", "temporal_flickering", "--scene-split", "--clip-source",
                      "reencoded", "--cache-dir", str(tmp_path)], tmp_path)
    moved = [abs(a["score"] - b["score"]) for a, b in
             zip(clips, reencoded["videos"]["a cat-0"]["dimensions"]["temporal_flickering"]["clips"], strict=True)]
    assert 0 < max(moved) < 5e-3  # re-encoding moves scores a little, not a lot


@pytest.mark.slow
def test_every_standin_dimension_runs_end_to_end(reference, tmp_path):
    """Seeded stand-ins (RAFT, AMT-S, MUSIQ as vbench ships them; small CLIP / ViT) through the CLI, on an
    8-frame video at 4 fps cut into two 1 s clips (so the clip-to-clip branch runs too)."""
    from core.eval.standins import STANDIN_DIMENSIONS

    cache, folder = reference[0] / "standins", reference[0] / "standin-videos"
    dims = [d for d in STANDIN_DIMENSIONS if d != "appearance_style"]  # needs VBench prompt info
    results = _cli([str(folder), "--dimensions", ",".join(dims), "--clip-seconds", "1", "--no-dev-flag",
                    "--cache-dir", str(cache)], tmp_path)
    video = results["videos"]["a person is running-0"]
    for dimension in dims:
        clips = video["dimensions"][dimension]["clips"]
        assert [(c["start"], c["end"]) for c in clips] == [(0, 4), (4, 8)], dimension
        assert all(math.isfinite(c["score"]) for c in clips), dimension
    assert all(c["score"] in (0.0, 1.0) and len(c["pair_scores"]) == 3
               for c in video["dimensions"]["dynamic_degree"]["clips"])
    dev = _cli([str(folder), "--dimensions", "subject_consistency", "--clip-seconds", "1", "--cache-dir", str(cache)],
               tmp_path)  # DINOv2 stand-in on the clip-to-clip branch, 0.5 / 0.5 fusion
    assert math.isfinite(dev["dimensions"]["subject_consistency"]["score"])
