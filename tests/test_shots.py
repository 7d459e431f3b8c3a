"""Prompt schedules: shots -> whole chunks, scene-cut prefix and flags, files and their errors."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from core.config import VideoConfig
from core.errors import UserError
from core.pipeline import plan_chunks
from core.shots import (
    SCENE_CUT_PREFIX,
    PromptSchedule,
    Shot,
    chunk_start_frame,
    durations_to_chunks,
    even_split_schedule,
    load_schedule,
    single_prompt_schedule,
    video_frame_count,
)

P = SCENE_CUT_PREFIX


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def boundary(k: int, fpb: int) -> int:
    """Video frame of chunk boundary k, counted by hand: 1 frame for latent 0, 4 for each other."""
    latents = k * fpb
    return 0 if latents == 0 else 1 + 4 * (latents - 1)


def reference_chunks(frames: list[Fraction], fpb: int) -> list[int]:
    """Slow obvious rule: each shot ends at the boundary nearest its scripted end (ties later), >= 1 chunk."""
    counts, end, scripted = [], 0, Fraction(0)
    for duration in frames:
        scripted += duration
        candidates = range(end + 1, end + 3 + int(duration))  # every chunk adds >= 1 frame
        best = min(candidates, key=lambda k: (abs(boundary(k, fpb) - scripted), -k))
        counts.append(best - end)
        end = best
    return counts


# ----------------------------------------------------------------------------------------------
# Frames and chunks.


def test_prefix_is_the_official_string():
    assert SCENE_CUT_PREFIX == "The scene transitions. "


@pytest.mark.parametrize("fpb", [1, 2, 8])
@pytest.mark.parametrize("chunk", [0, 1, 2, 3, 16])
def test_chunk_start_frame(fpb, chunk):
    expected = 0 if chunk == 0 else 4 * chunk * fpb - 3
    assert chunk_start_frame(chunk, fpb) == expected == boundary(chunk, fpb)
    if chunk:
        # consistent with frames = 4F - 3 for the first `chunk` chunks
        assert video_frame_count(chunk, fpb) == VideoConfig(latent_frames=chunk * fpb).pixel_frames


def test_first_chunk_is_29_frames_then_32():
    schedule = single_prompt_schedule("a cat", 4)
    assert schedule.chunk_start_frames == [0, 29, 61, 93]
    assert schedule.num_video_frames == 125 == 4 * 32 - 3
    assert schedule.num_latent_frames == 32


@pytest.mark.parametrize("frames, chunks", [
    (1, 1), (29, 1), (44, 1),   # first chunk 29 frames; 44 is nearer 29 than 61
    (45, 2),                    # exactly between 29 and 61: the later boundary
    (61, 2), (76, 2), (77, 3), (93, 3), (253, 8),
])
def test_frames_to_chunks_single_shot(frames, chunks):
    assert durations_to_chunks([frames], 8) == [chunks] == reference_chunks([Fraction(frames)], 8)


@pytest.mark.parametrize("seconds, chunks", [
    (0.5, 1), (1, 1), (1.25, 1), (1.85, 1), (1.875, 2), (2, 2), (2.5, 2), (5, 4), (10, 8), (10.5, 8), (20, 15),
])
def test_seconds_to_chunks_from_yaml(tmp_path, seconds, chunks):
    path = write(tmp_path, "s.yaml", f"- prompt: a cat\n  seconds: {seconds}\n")
    schedule = load_schedule(path, 8)
    assert schedule.num_chunks == chunks == reference_chunks([Fraction(str(seconds)) * 24], 8)[0]


@pytest.mark.parametrize("fpb, frames, chunks", [(2, 5, 1), (2, 6, 1), (2, 9, 2), (2, 13, 2), (1, 1, 1), (1, 2, 1),
                                                  (1, 3, 2), (1, 5, 2)])
def test_frames_to_chunks_other_block_sizes(fpb, frames, chunks):
    assert durations_to_chunks([frames], fpb) == [chunks] == reference_chunks([Fraction(frames)], fpb)


@pytest.mark.parametrize("frames, chunks", [
    ([48, 48, 48], [2, 1, 2]),   # cuts at the nearest boundary: 157 frames for 144, not 189
    ([29, 32, 32], [1, 1, 1]),   # whole chunks stay whole
    ([29, 1, 32], [1, 1, 1]),    # the 1-frame shot still gets a chunk; the next cut catches up
    ([29, 16, 16], [1, 1, 1]),
    ([120, 120, 120, 120], [4, 4, 3, 4]),
    ([24] * 6, [1, 1, 1, 1, 1, 1]),
])
def test_multi_shot_cuts_at_nearest_boundary(frames, chunks):
    assert durations_to_chunks(frames, 8) == chunks == reference_chunks([Fraction(f) for f in frames], 8)


@pytest.mark.parametrize("seconds, chunks", [
    ([0.2, 5.675], [1, 4]),   # 4.8 + 136.2 = 141 frames: exactly between boundaries 4 and 5 -> 5
    ([0.7, 5.175], [1, 4]),
    ([0.3, 9.575], [1, 7]),   # 237 frames: between 7 and 8 chunks -> 8
])
def test_decimal_seconds_are_exact(tmp_path, seconds, chunks):
    # read as binary floats, these sums fall a hair short of the tie and round down
    text = "".join(f"- prompt: shot {i}\n  seconds: {s}\n" for i, s in enumerate(seconds))
    assert [s.num_chunks for s in load_schedule(write(tmp_path, "d.yaml", text), 8).shots] == chunks


@pytest.mark.parametrize("seed", range(5))
def test_durations_match_reference_rule(seed):
    gen = torch.Generator().manual_seed(seed)
    frames = [Fraction(int(f)) for f in torch.randint(1, 200, (12,), generator=gen)]
    for fpb in (1, 2, 8):
        assert durations_to_chunks(frames, fpb) == reference_chunks(frames, fpb)


# ----------------------------------------------------------------------------------------------
# Prefix placement and scene cuts.


@pytest.mark.parametrize("transitions, prompts, cuts", [
    (["cut"], ["A", "A"], [False, False]),
    (["cut", "cut"], ["A", "A", P + "B", "B"], [False, False, True, False]),
    (["cut", "continue"], ["A", "A", "B", "B"], [False, False, False, False]),
    (["continue", "cut"], ["A", "A", P + "B", "B"], [False, False, True, False]),  # first transition ignored
    (["cut", "continue", "cut", "continue"], ["A", "A", "B", "B", P + "C", "C", "D", "D"],
     [False, False, False, False, True, False, False, False]),
    (["cut", "cut", "continue", "cut"], ["A", "A", P + "B", "B", "C", "C", P + "D", "D"],
     [False, False, True, False, False, False, True, False]),
])
def test_prefix_and_scene_cuts(transitions, prompts, cuts):
    shots = [Shot("ABCD"[i], 2, t) for i, t in enumerate(transitions)]
    schedule = PromptSchedule(shots, 8)
    assert schedule.chunk_prompts == prompts
    assert schedule.scene_cuts == cuts
    assert schedule.num_chunks == len(prompts)
    # the official rule (a chunk after the first whose prompt starts with the prefix) finds our cuts
    assert [i > 0 and p.startswith(SCENE_CUT_PREFIX) for i, p in enumerate(prompts)] == cuts


def test_unequal_shots_start_chunks_frames_and_spans():
    schedule = PromptSchedule([Shot("A", 3), Shot("B", 1, "continue"), Shot("C", 2)], 8)
    assert schedule.shot_start_chunks == [0, 3, 4]
    assert schedule.chunk_shots == [0, 0, 0, 1, 2, 2]
    assert schedule.shot_start_frames == [0, 93, 125]
    assert schedule.shot_start_seconds == [0, 93 / 24, 125 / 24]
    assert schedule.scene_cuts == [False, False, False, False, True, False]
    assert schedule.chunk_prompts == ["A", "A", "A", "B", P + "C", "C"]
    spans = schedule.spans
    assert [s.num_frames for s in spans] == [93, 32, 64]
    assert sum(s.num_frames for s in spans) == schedule.num_video_frames == 189
    assert [s.scene_cut for s in spans] == [False, False, True]
    assert spans[2].start_seconds == pytest.approx(125 / 24)


def test_schedule_drives_the_pipeline_plan(model, small_stream):
    schedule = PromptSchedule([Shot("A", 1), Shot("B", 2), Shot("C", 1, "continue")], small_stream.frames_per_block)
    noise = torch.zeros(1, schedule.num_latent_frames, model.config.in_channels, 2, 2)
    contexts = [torch.zeros(1, 4, model.config.text_dim) for _ in schedule.chunk_prompts]
    plans = plan_chunks(model, noise, contexts, small_stream, schedule.scene_cuts)
    assert [p.scene_cut for p in plans] == [False, True, False, False]
    assert [p.start_frame for p in plans] == [0, 2, 4, 6]


# ----------------------------------------------------------------------------------------------
# Sources.


@pytest.mark.parametrize("num_chunks, sizes", [
    (12, [4, 4, 4]), (10, [4, 3, 3]), (11, [4, 4, 3]), (3, [1, 1, 1]), (4, [2, 1, 1]),
])
def test_txt_even_split_remainder_to_first(tmp_path, num_chunks, sizes):
    path = write(tmp_path, "shots.txt", "A\n\n# a comment\n  B  \r\nC\n")
    schedule = load_schedule(path, 8, num_chunks)
    assert [s.num_chunks for s in schedule.shots] == sizes
    expected = [p for name, n in zip("ABC", sizes, strict=True) for p in [name] * n]
    expected[sizes[0]] = P + "B"
    expected[sizes[0] + sizes[1]] = P + "C"
    assert schedule.chunk_prompts == expected


def test_txt_official_example():
    schedule = even_split_schedule(["A", "B", "C"], 12)
    assert schedule.chunk_prompts == ["A", "A", "A", "A", P + "B", "B", "B", "B", P + "C", "C", "C", "C"]
    assert schedule.scene_cuts == [False] * 4 + [True] + [False] * 3 + [True] + [False] * 3


def test_txt_with_byte_order_mark(tmp_path):
    path = write(tmp_path, "bom.txt", "\ufeffA\nB\n".encode())
    assert [s.prompt for s in load_schedule(path, 8, 2).shots] == ["A", "B"]


def test_single_prompt():
    schedule = single_prompt_schedule("  a cat  ", 5, frames_per_block=2)
    assert schedule.chunk_prompts == ["a cat"] * 5
    assert schedule.scene_cuts == [False] * 5
    assert schedule.num_latent_frames == 10


YAML_SHOTS = """\
# three shots
defaults:
  seconds: 2
  transition: cut
shots:
  - prompt: A cat sits on a mat.
  - prompt: "The cat jumps: a leap."
    frames: 61
    transition: continue
  - prompt: |
      A dog barks.
    seconds: 5
"""
JSON_SHOTS = {"defaults": {"seconds": 2, "transition": "cut"}, "shots": [
    {"prompt": "A cat sits on a mat."},
    {"prompt": "The cat jumps: a leap.", "frames": 61, "transition": "continue"},
    {"prompt": "A dog barks.\n", "seconds": 5},
]}


@pytest.mark.parametrize("indent", [None, 2])
def test_yaml_and_json_give_the_same_schedule(tmp_path, indent):
    from_yaml = load_schedule(write(tmp_path, "s.yaml", YAML_SHOTS), 8)
    from_json = load_schedule(write(tmp_path, "s.json", json.dumps(JSON_SHOTS, indent=indent)), 8)
    as_list = load_schedule(write(tmp_path, "l.yml", json.dumps([
        {"prompt": "A cat sits on a mat.", "seconds": 2},
        {"prompt": "The cat jumps: a leap.", "frames": 61, "transition": "continue"},
        {"prompt": "A dog barks.", "seconds": 5}])), 8)
    assert from_yaml.shots == from_json.shots == as_list.shots
    # 48 -> boundary 2; 48 + 61 = 109 -> 3.5 chunks -> 4; 229 -> 7.25 -> 7
    assert [s.num_chunks for s in from_yaml.shots] == [2, 2, 3]
    assert from_yaml.chunk_prompts == ["A cat sits on a mat."] * 2 + ["The cat jumps: a leap."] * 2 + [
        P + "A dog barks.", "A dog barks.", "A dog barks."]
    assert from_yaml.scene_cuts == [False, False, False, False, True, False, False]


def test_suffix_is_case_insensitive(tmp_path):
    path = write(tmp_path, "S.YAML", "- {prompt: a, frames: 29}\n")
    assert load_schedule(path, 8).num_chunks == 1


# ----------------------------------------------------------------------------------------------
# Errors: one line, naming the file and the line or the shot.

SHOT = "  - prompt: a cat\n    seconds: 2\n"
ERRORS = [
    # (file name, content, num_chunks, where, words in the message)
    ("missing.yaml", None, None, None, "not found"),
    ("shots.md", "A\n", None, None, "unknown shot-list type"),
    ("folder.yaml", "DIR", None, None, "folder"),
    ("bad.yaml", "shots:\n  - prompt: [a, b\n    seconds: 2\n", None, "line 3", "bad YAML"),
    ("bad2.yaml", "shots:\n  - prompt: a: b\n", None, "line 2", "bad YAML"),
    ("bad.json", '{"shots": [\n  {"prompt": "a", "seconds": 2},\n]}', None, "line 3", "bad JSON"),
    ("dup.yaml", "shots:\n  - prompt: a\n    seconds: 2\n    seconds: 3\n", None, "line 4", "keep one"),
    ("dup.json", '[{"prompt": "a", "seconds": 2, "seconds": 3}]', None, None, "twice"),
    ("latin1.txt", "caf\xe9\n".encode("latin-1"), 4, "line 1", "UTF-8"),
    ("empty.yaml", "", None, None, "empty"),
    ("empty.json", "  \n", None, None, "empty"),
    ("empty.txt", "\n\n", 4, None, "no shots"),
    ("comments.txt", "# just a note\n\n", 4, None, "no shots"),
    ("noshots.yaml", "shots: []\n", None, None, "no shots"),
    ("emptylist.json", "[]", None, None, "no shots"),
    ("nolist.yaml", "defaults:\n  seconds: 2\n", None, "line 1", "shots:"),
    ("shotsmap.yaml", "shots:\n  prompt: a\n", None, "line 1", "must be a list"),
    ("scalar.yaml", "just words\n", None, None, "expected a list"),
    ("emptyprompt.yaml", f"shots:\n{SHOT}  - prompt: ''\n    seconds: 2\n", None, "line 4, shot 2", "empty"),
    ("blankprompt.yaml", f"shots:\n{SHOT}  - prompt: '   '\n    seconds: 2\n", None, "line 4, shot 2", "empty"),
    ("nullprompt.yaml", "- prompt:\n  seconds: 2\n", None, "line 1, shot 1", "empty"),
    ("emptyprompt.json", '[{"prompt": "a", "seconds": 1},\n {"prompt": "", "seconds": 1}]', None, "line 2, shot 2",
     "empty"),
    ("numprompt.yaml", f"shots:\n{SHOT}  - prompt: 42\n    seconds: 2\n", None, "line 4, shot 2", "must be text"),
    ("listprompt.yaml", "- seconds: 2\n  prompt: [a, b]\n", None, "line 2, shot 1", "must be text"),
    ("numprompt.json", '[{"seconds": 2, "prompt": 3}]', None, "line 1, shot 1", "must be text"),
    ("noprompt.yaml", "- seconds: 2\n", None, "line 1, shot 1", "no prompt"),
    ("notmap.yaml", f"shots:\n{SHOT}  - just a prompt\n", None, "line 4, shot 2", "must be a mapping"),
    ("zero.yaml", f"shots:\n{SHOT}  - prompt: b\n    seconds: 0\n", None, "line 5, shot 2", "greater than 0"),
    ("neg.yaml", "- prompt: b\n  seconds: -1.5\n", None, "line 2, shot 1", "greater than 0"),
    ("zeroframes.yaml", "- prompt: b\n  frames: 0\n", None, "line 2, shot 1", "greater than 0"),
    ("negframes.json", '[{"prompt": "b", "frames": -5}]', None, "line 1, shot 1", "greater than 0"),
    ("nan.yaml", "- prompt: b\n  seconds: .nan\n", None, "line 2, shot 1", "greater than 0"),
    ("word.yaml", "- prompt: b\n  seconds: five\n", None, "line 2, shot 1", "must be a number"),
    ("unit.yaml", "- prompt: b\n  seconds: 5s\n", None, "line 2, shot 1", "must be a number"),
    ("bool.yaml", "- prompt: b\n  frames: true\n", None, "line 2, shot 1", "must be a number"),
    ("str.json", '[{"prompt": "b", "seconds": "2"}]', None, "line 1, shot 1", "must be a number"),
    ("fraction.yaml", "- prompt: b\n  frames: 30.5\n", None, "line 2, shot 1", "whole number"),
    ("both.yaml", f"shots:\n{SHOT}  - prompt: b\n    seconds: 2\n    frames: 48\n", None, "line 6, shot 2",
     "both"),
    ("both.json", '[{"prompt": "b", "seconds": 2, "frames": 48}]', None, "line 1, shot 1", "both"),
    ("bothdefaults.yaml", f"defaults:\n  seconds: 2\n  frames: 48\nshots:\n{SHOT}", None, "line 3", "both"),
    ("neither.yaml", f"shots:\n{SHOT}  - prompt: b\n", None, "line 4, shot 2", "no duration"),
    ("neither.json", '[{"prompt": "b"}]', None, "line 1, shot 1", "no duration"),
    ("unknown.yaml", f"shots:\n{SHOT}  - prompt: b\n    duration: 2\n", None, "line 5, shot 2",
     "prompt, seconds, frames, transition"),
    ("unknown.json", '[{"prompt": "b", "secs": 2}]', None, "line 1, shot 1", "prompt, seconds, frames, transition"),
    ("unknowntop.yaml", f"fps: 24\nshots:\n{SHOT}", None, "line 1", "shots, defaults"),
    ("oneshot.yaml", "prompt: a cat\nseconds: 2\n", None, "line 1", "a shot goes in a list"),
    ("unknowndefault.yaml", f"defaults:\n  prompt: x\nshots:\n{SHOT}", None, "line 2", "seconds, frames, transition"),
    ("fade.yaml", f"shots:\n{SHOT}  - prompt: b\n    seconds: 2\n    transition: fade\n", None, "line 6, shot 2",
     "cut, continue"),
    ("yes.yaml", "- prompt: b\n  seconds: 2\n  transition: yes\n", None, "line 3, shot 1", "true/false"),
    ("fade.json", '[{"prompt": "b", "seconds": 2, "transition": "Cut"}]', None, "line 1, shot 1", "cut, continue"),
    ("defaultfade.yaml", f"defaults:\n  transition: dissolve\nshots:\n{SHOT}", None, "line 2", "cut, continue"),
    ("prefix.yaml", f"shots:\n{SHOT}  - prompt: 'The scene transitions. A dog.'\n    seconds: 2\n", None,
     "line 4, shot 2", "remove it"),
    ("prefix.json", '[{"prompt": "the scene transitions.  A dog.", "seconds": 2}]', None, "line 1, shot 1",
     "remove it"),
    ("prefix.txt", "A cat.\n\nThe scene transitions. A dog.\n", 4, "line 3", "remove it"),
    ("many.txt", "A\nB\n\nC\nD\n", 3, None, "4 shots but the video has only 3 chunks"),
    ("nolength.txt", "A\nB\n", None, None, "total video length"),
    ("zerolength.txt", "A\n", 0, None, "at least one chunk"),
    # JSON that YAML reads differently (1e0 is text in YAML 1.1): no line, the shot still named
    ("yamldiffers.json", '[{"prompt": "b", "seconds": 1e0, "transition": "fade"}]', None, "shot 1",
     "cut, continue"),
    ("length.yaml", f"shots:\n{SHOT}", 12, None, "cannot apply"),
]


@pytest.mark.parametrize("name, content, num_chunks, where, words", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_are_one_line_user_errors(tmp_path, name, content, num_chunks, where, words):
    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        write(tmp_path, name, content)
    with pytest.raises(UserError) as info:
        load_schedule(path, 8, num_chunks)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(str(path)), message
    if where is not None:
        assert f"{path.name} {where}" in message, message
    assert words in message, message
    assert ": " in message[len(str(path)):], message  # problem and fix after the place


@pytest.mark.parametrize("prompt, num_chunks, words", [
    ("", 4, "empty"), ("   ", 4, "empty"), (P + "a cat", 4, "remove it"), ("a cat", 0, "at least one chunk"),
])
def test_single_prompt_errors(prompt, num_chunks, words):
    with pytest.raises(UserError, match=words) as info:
        single_prompt_schedule(prompt, num_chunks)
    message = str(info.value)
    assert "\n" not in message and "prompt" in message and "the shot" not in message  # one prompt, no shots


def test_even_split_errors_name_the_shot():
    with pytest.raises(UserError, match=r"^prompts shot 2: the prompt is empty"):
        even_split_schedule(["a", " "], 4)
    with pytest.raises(UserError, match=r"^prompts: 3 shots but the video has only 2 chunks"):
        even_split_schedule(["a", "b", "c"], 2)
    with pytest.raises(UserError, match=r"only 1 chunk and"):  # not "1 chunks"
        even_split_schedule(["a", "b"], 1)


@pytest.mark.parametrize("kwargs", [
    dict(prompt="", num_chunks=1), dict(prompt="a", num_chunks=0), dict(prompt="a", num_chunks=1, transition="fade"),
    dict(prompt=P + "a", num_chunks=1), dict(prompt="a", num_chunks=True),
])
def test_shot_validates(kwargs):
    with pytest.raises(ValueError):
        Shot(**kwargs)


def test_schedule_validates():
    with pytest.raises(ValueError):
        PromptSchedule([], 8)
    with pytest.raises(ValueError):
        PromptSchedule([Shot("a", 1)], 0)
