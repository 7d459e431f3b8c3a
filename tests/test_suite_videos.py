"""An evaluation folder keeps only videos made as the run would make them (longlive_cli/suite_videos.py),
and the shapes suite's CLI refuses, in one line, a folder of videos made with other settings."""

from __future__ import annotations

import json

import pytest

from core.errors import UserError
from longlive_cli.app import main
from longlive_cli.suite_videos import STAMP_NAME, claim_folder, file_fingerprint

SETTINGS = {"recipe": {"stream": {"sampling_steps": 4, "guidance_scale": 3.0}}, "files": {"dit": "sha256:ab"}}
RECORDS = {"prompts-000": {"seed": 0, "prompt": "a"}, "prompts-001": {"seed": 1, "prompt": "b"}}


def make_video(folder, name):
    (folder / f"{name}.mp4").write_bytes(b"video")


def test_a_fresh_folder_is_claimed_and_the_same_run_keeps_its_videos(tmp_path):
    claim_folder(tmp_path, SETTINGS, RECORDS)
    stamp = json.loads((tmp_path / STAMP_NAME).read_text())
    assert stamp == {"settings": SETTINGS, "videos": RECORDS}
    make_video(tmp_path, "prompts-000")
    claim_folder(tmp_path, SETTINGS, RECORDS)  # the same run resumed: kept
    # a run over fewer videos keeps the other records of the videos still there
    make_video(tmp_path, "prompts-001")
    claim_folder(tmp_path, SETTINGS, {"prompts-000": RECORDS["prompts-000"]})
    assert json.loads((tmp_path / STAMP_NAME).read_text())["videos"] == RECORDS


@pytest.mark.parametrize("settings, records, needle", [
    ({"recipe": {"stream": {"sampling_steps": 32, "guidance_scale": 3.0}}, "files": {"dit": "sha256:ab"}}, RECORDS,
     "other settings (recipe.stream.sampling_steps: 4 there, 32 now)"),
    ({**SETTINGS, "files": {"dit": "sha256:cd", "lora": "sha256:ef"}}, RECORDS,
     "files.dit: sha256:ab there, sha256:cd now; files.lora: - there, sha256:ef now"),
    (SETTINGS, {**RECORDS, "prompts-000": {"seed": 5, "prompt": "a"}},
     "prompts-000.mp4 was made otherwise (seed: 0 there, 5 now)"),
])
def test_videos_made_otherwise_are_refused(tmp_path, settings, records, needle):
    claim_folder(tmp_path, SETTINGS, RECORDS)
    make_video(tmp_path, "prompts-000")
    before = (tmp_path / STAMP_NAME).read_text()
    with pytest.raises(UserError, match="give another --videos-dir") as info:
        claim_folder(tmp_path, settings, records)
    assert needle in str(info.value)
    assert (tmp_path / STAMP_NAME).read_text() == before  # the record is left as it was


def test_other_settings_may_claim_a_folder_with_no_videos_left(tmp_path):
    claim_folder(tmp_path, SETTINGS, RECORDS)
    other = {**SETTINGS, "files": {"dit": "sha256:cd"}}
    claim_folder(tmp_path, other, RECORDS)
    assert json.loads((tmp_path / STAMP_NAME).read_text())["settings"] == other


@pytest.mark.parametrize("stamp, needle", [
    (None, "holds 1 video(s) with no generation.json"),
    ("{not json", "is not a readable record"),
    ('{"videos": {}}', "is not a readable record"),
    (json.dumps({"settings": SETTINGS, "videos": {}}), "prompts-000.mp4 has no record"),
])
def test_videos_of_unknown_making_are_refused(tmp_path, stamp, needle):
    make_video(tmp_path, "prompts-000")
    if stamp is not None:
        (tmp_path / STAMP_NAME).write_text(stamp)
    with pytest.raises(UserError, match="give another --videos-dir") as info:
        claim_folder(tmp_path, SETTINGS, RECORDS)
    assert needle in str(info.value)


def test_fingerprints_follow_the_content_not_the_name(tmp_path):
    a, b, c = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    a.write_bytes(b"weights")
    b.write_bytes(b"weights")
    c.write_bytes(b"weightz")
    assert file_fingerprint(a) == file_fingerprint(b) != file_fingerprint(c)
    assert file_fingerprint(a).startswith("sha256:") and file_fingerprint(tmp_path).startswith("path:")


def test_eval_suite_refuses_a_folder_made_with_other_steps(tmp_path, capsys):
    """The shapes suite run again into the same folder: at the same settings it keeps every video
    (nothing generated), with other steps or another seed it stops in one line, exit 2."""
    base = ["eval-vbench", "--suite", "shapes", "--preset", "tiny", "--random-weights", "--device", "cpu",
            "--max-prompts", "1", "--seconds", "0.5", "--dimensions", "prompts", "--set", "video.height=64",
            "--set", "video.width=64", "--set", "stream.frames_per_block=2", "--videos-dir", str(tmp_path / "v")]
    assert main([*base, "--out", str(tmp_path / "a.json")]) == 0
    capsys.readouterr()
    video = tmp_path / "v" / "prompts-000.mp4"
    made = video.stat().st_mtime_ns
    assert main([*base, "--out", str(tmp_path / "b.json")]) == 0
    assert "1 of 1 videos already made with these settings: kept" in capsys.readouterr().err
    assert video.stat().st_mtime_ns == made
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["parts"] for n in "ab")
    assert a == b
    for extra, needle in ((["--steps", "2"], "stream.sampling_steps: 4 there, 2 now"),
                          (["--seed", "3"], "prompts-000.mp4 was made otherwise (seed: 0 there, 3 now)")):
        assert main([*base, "--out", str(tmp_path / "c.json"), *extra]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
        assert not (tmp_path / "c.json").exists() and video.stat().st_mtime_ns == made


def test_every_part_is_checked_before_the_first_is_generated(tmp_path, capsys):
    """A later part's videos made otherwise stop the run before the earlier parts generate."""
    base = ["eval-vbench", "--suite", "shapes", "--preset", "tiny", "--random-weights", "--device", "cpu",
            "--max-prompts", "1", "--seconds", "0.5", "--set", "video.height=64", "--set", "video.width=64",
            "--set", "stream.frames_per_block=2", "--videos-dir", str(tmp_path / "v")]
    assert main([*base, "--out", str(tmp_path / "a.json"), "--dimensions", "multishot"]) == 0
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "b.json"), "--dimensions", "prompts,multishot", "--seed", "3"]) == 2
    assert "multishot-000.mp4 was made otherwise (seed: 0 there, 3 now)" in capsys.readouterr().err
    assert not (tmp_path / "v" / "prompts-000.mp4").exists()
