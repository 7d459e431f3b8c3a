"""`longlive eval-vbench` without the VBench environment: bad input (one line, exit 2, nothing
written), the outputs beside results.json from a worker response, --compare, download --eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.eval import vbench
from core.eval.weights import DIMENSION_FILES, FAST_BRANCH_FILES, required_files
from longlive_cli.app import main


def run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def videos(tmp_path) -> Path:
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a cat-0.mp4", "a dog-1.mp4"):
        (folder / name).write_bytes(b"not decoded before the checks")
    return folder


@pytest.fixture
def full_cache(tmp_path) -> Path:
    cache = tmp_path / "cache"
    for item in required_files(vbench.DIMENSIONS, "long", True):
        (cache / item.path).parent.mkdir(parents=True, exist_ok=True)
        (cache / item.path).write_bytes(b"")
    return cache


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("case, match", [
    ("empty folder", "holds no .mp4 videos"),
    ("unknown dimension", "'colour' is not a VBench dimension"),
    ("needs prompts", "--dimensions color needs VBench's prompt info"),
    ("missing weights", "VBench weights missing"),
    ("no environment", "VBench environment is not installed"),
    ("bad mode", "--mode"),
    ("no input", "nothing to evaluate"),
    ("not json", "give a .json file"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(case, match, tmp_path, videos, full_cache, capsys,
                                                      monkeypatch):
    import core.eval.environment as environment

    monkeypatch.setattr(environment.importlib.util, "find_spec", lambda name: None)  # no vbench here
    out = tmp_path / "out" / "results.json"
    out.parent.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["eval-vbench", str(videos), "--out", str(out), "--cache-dir", str(full_cache), "--device", "cpu",
            "--env-dir", str(tmp_path / "no-env")]
    argv = {
        "empty folder": ["eval-vbench", str(empty), *base[2:]],
        "unknown dimension": [*base, "--dimensions", "subject_consistency,colour"],
        "needs prompts": [*base, "--dimensions", "color"],
        "missing weights": [*base[:4], "--cache-dir", str(tmp_path / "none"), *base[6:],
                            "--dimensions", "dynamic_degree,temporal_flickering"],
        "no environment": [*base, "--dimensions", "temporal_flickering"],
        "bad mode": [*base, "--mode", "short"],
        "no input": ["eval-vbench", *base[2:]],
        "not json": ["eval-vbench", str(videos), "--out", str(tmp_path / "out" / "r.txt")],
    }[case]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert match in one_line_error(err)
    assert list(out.parent.iterdir()) == []


def test_missing_weights_names_the_files_and_the_command(tmp_path, videos, capsys):
    code, _, err = run(["eval-vbench", str(videos), "--out", str(tmp_path / "r.json"), "--device", "cpu",
                        "--cache-dir", str(tmp_path / "c"), "--dimensions", "dynamic_degree,motion_smoothness"], capsys)
    line = one_line_error(err)
    assert code == 2 and "raft_model/models/raft-things.pth" in line and "amt_model/amt-s.pth" in line
    assert "longlive download --eval" in line


def test_required_files_follow_mode_and_dev_flag():
    assert required_files(["temporal_flickering"]) == []
    long_dev = {f.path for f in required_files(["subject_consistency", "background_consistency"], "long", True)}
    standard = {f.path for f in required_files(["subject_consistency", "background_consistency"], "standard", True)}
    fast = {f.path for d in FAST_BRANCH_FILES.values() for f in d}
    assert long_dev == standard | fast and not standard & fast
    assert set(DIMENSION_FILES) == set(vbench.DIMENSIONS)


def worker_response(names, dims) -> dict:
    videos = {}
    for k, name in enumerate(names):
        spans = [(0, 0, 16), (0, 16, 32), (1, 32, 48)] if k == 0 else [(0, 0, 12)]
        videos[name] = {"path": f"/v/{name}.mp4", "fps": 8.0, "num_frames": spans[-1][2],
                        "scenes": [[0, 32], [32, 48]] if k == 0 else [[0, 12]],
                        "dimensions": {d: {"clips": [{"scene": s, "start": a, "end": b, "score": 0.9 - 0.01 * i}
                                                     for i, (s, a, b) in enumerate(spans)],
                                           "clip2clip": 0.85 if len(spans) > 1 else None} for d in dims}}
    return {"versions": {"vbench": "0.1.5"}, "videos": videos}


def test_outputs_from_a_worker_response(tmp_path, videos, full_cache, capsys, monkeypatch):
    pytest.importorskip("matplotlib", reason="plots need the [eval] extra")
    import longlive_cli.eval as cli

    dims = ("subject_consistency", "temporal_flickering")
    seen = {}

    def fake_score(videos_, settings, cache_dir, python):
        seen["settings"], seen["videos"] = settings, videos_
        return worker_response([v.name for v in videos_], settings.dimensions)

    monkeypatch.setattr(cli, "score_videos", fake_score)
    monkeypatch.setattr("core.eval.environment.worker_python", lambda env_dir: Path("/usr/bin/python3"))
    out = tmp_path / "results.json"
    code, stdout, _ = run(["eval-vbench", str(videos), "--out", str(out), "--cache-dir", str(full_cache),
                           "--device", "cpu", "--dimensions", ",".join(dims), "--scene-split"], capsys)
    assert code == 0, stdout
    assert [v.prompt for v in seen["videos"]] == ["a cat", "a dog"]
    results = json.loads(out.read_text())
    assert (results["mode"], results["clip_source"], results["scene_split"], results["scene_threshold"],
            results["dev_flag"]) == ("long", "frames", True, 35.0, True)
    assert list(results["videos"]) == ["a cat-0", "a dog-1"]
    assert results["dimensions"]["temporal_flickering"]["score"] == pytest.approx((0.9 + 0.89 + 0.88 + 0.9) / 4)
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "video,dimension,clip,scene,start,end,start_s,end_s,score" and len(csv_lines) == 1 + 8
    assert "| results |" in (tmp_path / "results.md").read_text()
    provenance = json.loads((tmp_path / "results.provenance.json").read_text())
    assert provenance["versions"] == {"vbench": "0.1.5"} and provenance["slow_fast"]["a cat-0"]
    for png in ("results_dimensions.png", "results_clips.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_compare_prints_deltas_and_ranks(tmp_path, capsys):
    paths = []
    for name, shift in (("bf16", 0.0), ("nvfp4", -0.01)):
        dims = {d: {"score": 0.9 + shift} for d in vbench.LONG_TABLE_DIMENSIONS}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"mode": "long", "dimensions": dims, "aggregate": None, "videos": {}}))
        paths.append(str(path))
    code, out, _ = run(["eval-vbench", "--compare", *paths], capsys)
    assert code == 0
    assert "-1.00" in out and "| bf16 | 1.00 |" in out and "| nvfp4 | 2.00 |" in out
    code, _, err = run(["eval-vbench", "--compare", paths[0], str(tmp_path / "missing.json")], capsys)
    assert code == 2 and "file not found" in one_line_error(err)


def test_download_eval_dry_run_lists_cache_files(tmp_path, capsys):
    code, out, _ = run(["download", "--eval", "--dry-run", "--cache-dir", str(tmp_path),
                        "--dimensions", "dynamic_degree"], capsys)
    assert code == 0 and "raft-things.pth" in out and "torch==" in out


@pytest.mark.slow
def test_generate_source_loads_the_model_once(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib", reason="plots need the [eval] extra")
    """--prompt-file with the tiny preset: VBench-named videos, recorded seeds, one DiT build."""
    import longlive_cli.build
    import longlive_cli.eval as cli

    builds = []
    real_build = longlive_cli.build.build_dit
    monkeypatch.setattr(longlive_cli.build, "build_dit", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    monkeypatch.setattr(cli, "score_videos", lambda videos_, settings, cache_dir, python: worker_response(
        [v.name for v in videos_], settings.dimensions))
    monkeypatch.setattr("core.eval.environment.worker_python", lambda env_dir: Path("/usr/bin/python3"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\na blue cube\n")
    out = tmp_path / "r.json"
    code, stdout, _ = run(["eval-vbench", "--prompt-file", str(prompts), "--preset", "tiny", "--random-weights",
                           "--samples", "1",
                           "--seed", "7", "--seconds", "0.3", "--set", "video.height=64", "--set", "video.width=64",
                           "--dimensions", "temporal_flickering", "--out", str(out), "--device", "cpu",
                           "--cache-dir", str(tmp_path)], capsys)
    assert code == 0, stdout
    assert sorted(p.name for p in (tmp_path / "r_videos").iterdir()) == [
        "a blue cube-0.mp4", "a red ball-0.mp4", "generation.json"]
    assert len(builds) == 1
    # run again with other steps: the videos in the folder were made otherwise, nothing is scored
    code, _, err = run(["eval-vbench", "--prompt-file", str(prompts), "--preset", "tiny", "--random-weights",
                        "--samples", "1", "--seed", "7", "--seconds", "0.3", "--set", "video.height=64",
                        "--set", "video.width=64", "--steps", "2", "--dimensions", "temporal_flickering",
                        "--out", str(tmp_path / "r2.json"), "--videos-dir", str(tmp_path / "r_videos"),
                        "--device", "cpu", "--cache-dir", str(tmp_path)], capsys)
    assert code == 2 and "stream.sampling_steps: 4 there, 2 now" in one_line_error(err)
    assert len(builds) == 1 and not (tmp_path / "r2.json").exists()
    provenance = json.loads((tmp_path / "r.provenance.json").read_text())
    assert provenance["seeds"] == {"a red ball-0": 7, "a blue cube-0": 7}
    assert provenance["prompt_file_sha256"] == __import__("hashlib").sha256(prompts.read_bytes()).hexdigest()
