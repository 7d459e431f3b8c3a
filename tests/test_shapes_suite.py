"""`longlive eval-vbench --suite shapes`: the suite's plan and report against ground-truth renders
and noise (no model), the CLI end to end on the tiny random model (CI size), and its bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.eval.shapes import FULL_COUNTS, SUITE_PARTS, balanced_prompts, run_eval_suite
from core.shots import PromptSchedule, Shot
from core.train.synthetic import evaluation_prompts, is_held_out, parse_caption, render_clip, write_video
from longlive_cli.app import main
from longlive_cli.eval import scheduled_switches

SIZE = 64  # a 64x64 world: shapes of 16 px moving 1 px per frame (same probe, 4x fewer pixels)


class RenderedSource:
    """A `VideoSource` that renders each schedule's shots exactly (ground truth) or draws noise."""

    def __init__(self, noise: bool = False, frames_per_block: int = 2):
        self.noise, self.frames_per_block = noise, frames_per_block
        self.settings = {"preset": "ground truth", "steps": 0}
        self.asked = []

    def claim(self, videos) -> None:
        pass  # renders every video anew: nothing to keep

    def generate(self, videos) -> None:
        self.asked += list(videos)  # one call per part
        rng = np.random.default_rng(0)
        for video in videos:
            schedule = video.schedule
            total = schedule.num_video_frames
            if self.noise:
                frames = rng.integers(0, 256, (total, SIZE, SIZE, 3), dtype=np.uint8)
            else:
                frames = np.concatenate([render_clip(parse_caption(span.prompt), span.num_frames, SIZE, SIZE)
                                         for span in schedule.spans])
            write_video(video.output, frames)


def test_balanced_prompts_are_the_48_evaluation_prompts_alternating_seen_and_held_out():
    prompts = balanced_prompts()
    assert sorted(prompts) == sorted(p.caption for p in evaluation_prompts())
    assert [is_held_out(parse_caption(p)) for p in prompts[:6]] == [False, True] * 3


def test_suite_reads_ground_truth_right_and_writes_json_and_markdown(tmp_path):
    source = RenderedSource()
    out = tmp_path / "shapes.json"
    results = run_eval_suite(out, "cpu", None, source=source, max_prompts=2, seconds=1.0, seed=3)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    markdown = out.with_suffix(".md").read_text()
    assert [line for line in markdown.splitlines() if line.startswith("## ")][:4] == [
        f"## {part}: 2 videos" for part in SUITE_PARTS]
    assert [v.seed for v in source.asked[:2]] == [3, 4]
    assert [v.interactive for v in source.asked] == [part == "interactive" for part in SUITE_PARTS for _ in (0, 1)]
    for part in SUITE_PARTS:
        summary = results["parts"][part]["summary"]
        assert summary["all"]["accuracy"] == dict.fromkeys(("background", "colour", "shape", "direction"), 1.0), part
        assert summary["all"]["identity_kept"] == 1.0
    assert results["parts"]["prompts"]["summary"]["held_out"]["shots"] == 1  # balanced: one seen, one held out
    cuts, switches = (results["parts"][p]["summary"] for p in ("multishot", "interactive"))
    assert cuts["cuts"]["obeyed"] == cuts["cuts"]["count"] == 4 and cuts["cuts"]["max_frames"] == 0
    assert switches["switches"]["obeyed"] == switches["switches"]["count"] == 4
    assert all(entry["change"] == 0.0 and entry["first"] == 1.0 for entry in results["long"].values())
    long_video = results["parts"]["long"]["videos"]["long-000"]
    first, last = long_video["shots"]
    assert first["start"] == 0 and last["end"] == long_video["num_frames"]
    assert first["end"] == last["end"] - last["start"]


def test_suite_rejects_noise(tmp_path):
    results = run_eval_suite(tmp_path / "noise.json", "cpu", ("prompts",), source=RenderedSource(noise=True),
                             max_prompts=2, seconds=1.0)
    assert list(results["parts"]) == ["prompts"]
    accuracy = results["parts"]["prompts"]["summary"]["all"]["accuracy"]
    assert max(accuracy.values()) == 0.0


def test_full_suite_plan_sizes(tmp_path):
    """The full suite: 48 prompts of 4 s, 8 + 8 three-shot lists, 4 long videos of 60 s (nothing generated)."""
    from core.eval.shapes import plan_suite

    planned = plan_suite(SUITE_PARTS, 8, tmp_path, 4.0, 0, None)
    counts = {part: sum(p.part == part for p in planned) for part in SUITE_PARTS}
    assert counts == FULL_COUNTS
    first = {p.part: p.video.schedule for p in reversed(planned)}
    assert first["prompts"].num_chunks == 3 and first["prompts"].num_video_frames == 93  # ~4 s at 24 fps
    assert first["long"].seconds == pytest.approx(60, abs=1.5)
    assert [s.num_chunks for s in first["multishot"].shots] == [2, 2, 2]
    assert first["multishot"].shot_cuts == [False, True, True] and first["interactive"].shot_cuts == [False] * 3


def test_scheduled_switches_type_each_later_shot_at_its_first_chunk():
    schedule = PromptSchedule((Shot("a red circle moves left to right on a blue background", 2),
                               Shot("a red circle moves left to right on a green background", 1, "continue"),
                               Shot("a red circle moves left to right on a black background", 2, "continue")), 8)

    class Text:
        def encode(self, prompts):
            return torch.full((1, 2, 3), float(len(prompts[0])))

    feed = scheduled_switches(schedule, Text(), torch.float64, torch.device("cpu"))
    taken = [feed.take(chunk) for chunk in range(1, schedule.num_chunks)]  # before chunks 1..4
    assert [t and t[0].prompt for t in taken] == [None, schedule.shots[1].prompt, schedule.shots[2].prompt, None]
    assert taken[1][1].dtype == torch.float64 and taken[1][1][0, 0, 0] == len(schedule.shots[1].prompt)
    assert [s.chunk for s in feed.switches] == [2, 3]


def test_eval_vbench_suite_shapes_end_to_end_on_the_tiny_random_model(tmp_path, capsys):
    """The CLI path (CI size): generation with the tiny random model, the probe, the files."""
    out = tmp_path / "shapes.json"
    code = main(["eval-vbench", "--suite", "shapes", "--out", str(out), "--preset", "tiny", "--random-weights",
                 "--device", "cpu", "--max-prompts", "2", "--seconds", "1",
                 "--dimensions", "prompts,multishot,interactive", "--set", "video.height=64",
                 "--set", "video.width=64", "--set", "stream.frames_per_block=2"])
    assert code == 0, capsys.readouterr().err
    results = json.loads(out.read_text())
    assert list(results["parts"]) == ["prompts", "multishot", "interactive"]
    assert results["settings"]["preset"] == "tiny" and results["settings"]["random_weights"] is True
    for part, report in results["parts"].items():
        assert sorted(report["videos"]) == [f"{part}-000", f"{part}-001"]
        assert set(report["summary"]) == {"all", "seen", "held_out", "cuts", "switches"}
        for video in report["videos"].values():  # 1 s = 3 chunks of 2 latent frames; 3 shots of 2 chunks
            assert video["num_frames"] == (21 if part == "prompts" else 45)
    assert results["parts"]["multishot"]["summary"]["cuts"]["count"] == 4
    assert results["parts"]["interactive"]["summary"]["switches"]["count"] == 4
    assert "## interactive: 2 videos" in out.with_suffix(".md").read_text()
    assert sorted(p.name for p in (tmp_path / "shapes_videos").iterdir()) == sorted(
        [f"{part}-{i:03d}.mp4" for part in results["parts"] for i in range(2)] + ["generation.json"])


@pytest.mark.parametrize("extra, needle", [
    (["--dimensions", "colour"], "'colour' is not a part of the shapes suite: choose from prompts, multishot"),
    (["--max-prompts", "0"], "--max-prompts 0: use 1 or more"),
    (["--samples", "2"], "--suite shapes generates its own videos"),
    (["--preset", "shapes", "--random-weights"], "--random-weights is for the tiny preset"),
    (["--preset", "shapes", "--model-dir", "EMPTY"], "the shapes preset needs dit.safetensors, vae.safetensors in"),
    (["--seconds", "-1"], "--seconds -1.0: the length must be positive"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(extra, needle, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    extra = [str(tmp_path / "empty") if arg == "EMPTY" else arg for arg in extra]
    out = tmp_path / "r.json"
    assert main(["eval-vbench", "--suite", "shapes", "--out", str(out), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0].replace("\n", " "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_ground_truth_video_names_are_paths(tmp_path):
    out = tmp_path / "x.json"
    run_eval_suite(out, "cpu", ("prompts",), source=RenderedSource(), max_prompts=1, seconds=1.0,
                   videos_dir=tmp_path / "v")
    assert [p.name for p in Path(tmp_path / "v").iterdir()] == ["prompts-000.mp4"]


def test_a_run_stopped_during_a_part_keeps_the_parts_before_it(tmp_path):
    class StopsAtMultishot(RenderedSource):
        def generate(self, videos) -> None:
            if "multishot" in videos[0].output.name:
                raise KeyboardInterrupt
            super().generate(videos)

    out = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        run_eval_suite(out, "cpu", ("prompts", "multishot"), source=StopsAtMultishot(), max_prompts=1, seconds=1.0)
    assert list(json.loads(out.read_text())["parts"]) == ["prompts"]
    assert "## prompts: 1 videos" in out.with_suffix(".md").read_text()


def test_eval_vbench_suite_shapes_runs_the_shapes_world_model_offline(tmp_path, capsys):
    """CI size with the shapes preset itself (its DiT, VAE and shipped text encoder, from files at
    the shapes widths that the test writes: values are random until the trained files ship)."""
    from tests.test_shapes_preset import write_shapes_files

    model_dir = tmp_path / "shapes-model"
    model_dir.mkdir()
    write_shapes_files(model_dir)
    out = tmp_path / "shapes.json"
    code = main(["eval-vbench", "--suite", "shapes", "--out", str(out), "--preset", "shapes",
                 "--model-dir", str(model_dir), "--device", "cpu", "--max-prompts", "1", "--seconds", "1",
                 "--dimensions", "prompts,interactive"])
    assert code == 0, capsys.readouterr().err
    results = json.loads(out.read_text())
    assert results["settings"]["preset"] == "shapes" and list(results["parts"]) == ["prompts", "interactive"]
    assert results["parts"]["interactive"]["summary"]["switches"]["count"] == 2
    frames = {part: [v["num_frames"] for v in report["videos"].values()] for part, report in results["parts"].items()}
    assert frames == {"prompts": [29], "interactive": [93]}, frames  # 1 s: one chunk of 8; 3 shots of one chunk
