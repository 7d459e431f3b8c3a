"""Prompt schedules: a shot list mapped onto whole chunks.

The video is generated in chunks of `frames_per_block` latent frames and the prompt can change
only at a chunk boundary (reference-model.md §5.7). A `PromptSchedule` is a list of `Shot`s, each
one prompt held for a whole number of chunks, and gives the pipeline what it takes: one prompt per
chunk (`chunk_prompts`, with the scene-cut prefix on the first chunk of every shot that starts
with a cut) and one scene-cut flag per chunk (`scene_cuts`). A shot with `transition: continue`
switches the prompt at its first chunk without a cut: no prefix, flag False.

Frames and time: latent frame 0 decodes to 1 video frame and every later one to 4, so F latent
frames are 4F - 3 video frames at 24 fps, and chunk c starts at video frame 0 (c = 0) or
4·c·fpb - 3 (`chunk_start_frame`). With fpb = 8 the first chunk is 29 video frames, every later
one 32 (1.33 s).

Durations to chunks (`durations_to_chunks`): each cut lands on the chunk boundary nearest to its
scripted time (the summed durations of the shots before it; a tie goes to the later boundary) and
every shot gets at least one chunk (a shot pushed later by that minimum pushes the next cut only
as far as needed). Rounding the cut times rather than each shot's length keeps every cut and the
total length within half a chunk of the script instead of letting the errors add up; the price is
that equal shots which are not a whole number of chunks long alternate between two lengths
(3 shots of 2 s at fpb 8 -> 2, 1, 2 chunks: 157 video frames for 144 scripted).

Sources (`load_schedule` picks one by the file suffix):
  .txt             one shot per non-empty line (lines starting with `#` are comments); the total
                   length is split evenly in whole chunks, the remainder going to the first shots,
                   and every shot after the first starts with a cut (the official prompt-file
                   convention of the image+prompt folders; the official T2V .txt, one video per
                   line, is not a shot list).
  .yaml/.yml/.json a list of shots, or a mapping `{shots: [...], defaults: {...}}`; a shot is
                   `{prompt, seconds | frames, transition: cut | continue}` (video frames at
                   24 fps; transition defaults to cut and is ignored for the first shot);
                   `defaults` gives seconds / frames / transition to shots without their own.
                   The durations set the length, so no total-length override applies.

Every problem with a file is a one-line `UserError` naming the file, the line (TXT, YAML, and JSON
where the YAML parser reads it the same) and the shot (counted from 1), and the fix.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml

from core.config import VAE_TEMPORAL_STRIDE, VIDEO_FPS, StreamConfig
from core.errors import UserError, plural

SCENE_CUT_PREFIX = "The scene transitions. "  # exact official string, trailing space included
TRANSITIONS = ("cut", "continue")
Transition = Literal["cut", "continue"]
DEFAULT_FRAMES_PER_BLOCK: int = StreamConfig.frames_per_block  # the official 8
SHOT_KEYS = ("prompt", "seconds", "frames", "transition")
DEFAULT_KEYS = ("seconds", "frames", "transition")
TOP_LEVEL_KEYS = ("shots", "defaults")
SUFFIXES = {".txt": "txt", ".yaml": "yaml", ".yml": "yaml", ".json": "json"}

PathLike = str | os.PathLike
_SHOW_CHARS = 40  # characters of a bad value quoted in an error message
_CUT_WORDS = SCENE_CUT_PREFIX.strip().casefold()
_TXT_CUT_FIX = "every shot after the first starts with a cut already"


# ----------------------------------------------------------------------------------------------
# Frames and chunks.


def chunk_start_frame(chunk: int, frames_per_block: int) -> int:
    """The video frame where chunk `chunk` starts: 0 for chunk 0, else 4·chunk·fpb - 3.

    `chunk_start_frame(n, fpb)` is also the number of video frames of the first n chunks."""
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0 (got {chunk})")
    if chunk == 0:
        return 0
    return VAE_TEMPORAL_STRIDE * chunk * frames_per_block - (VAE_TEMPORAL_STRIDE - 1)


def video_frame_count(num_chunks: int, frames_per_block: int) -> int:
    """Video frames decoded from `num_chunks` chunks: 4F - 3 for F = num_chunks·fpb latent frames."""
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1 (got {num_chunks})")
    return chunk_start_frame(num_chunks, frames_per_block)


def durations_to_chunks(frames: Sequence[int | float | Fraction], frames_per_block: int) -> list[int]:
    """Whole chunks per shot for shot durations in video frames (the module's rounding rule).

    Shot i ends at the chunk boundary nearest to the sum of the first i+1 durations (ties to the
    later boundary), and at least one chunk after the previous shot's end."""
    chunk_frames = VAE_TEMPORAL_STRIDE * frames_per_block
    counts: list[int] = []
    scripted_end = Fraction(0)
    end = 0
    for duration in frames:
        if not duration > 0:
            raise ValueError(f"durations must be > 0 video frames (got {duration!r})")
        scripted_end += Fraction(duration)
        # Boundary k >= 1 sits at k·chunk_frames - 3: the nearest one is round((t + 3) / chunk_frames).
        nearest = math.floor((scripted_end + VAE_TEMPORAL_STRIDE - 1) / chunk_frames + Fraction(1, 2))
        new_end = max(end + 1, nearest)
        counts.append(new_end - end)
        end = new_end
    return counts


# ----------------------------------------------------------------------------------------------
# Schedules.


@dataclass(frozen=True)
class Shot:
    """One prompt held for `num_chunks` whole chunks; `transition` says how it starts."""

    prompt: str
    num_chunks: int
    transition: Transition = "cut"  # ignored for the first shot of a schedule

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"a shot needs a non-empty prompt (got {self.prompt!r})")
        if self.prompt.strip().casefold().startswith(_CUT_WORDS):
            raise ValueError(f"prompt {_show(self.prompt)} starts with the scene-cut prefix: remove it, "
                             f"cuts are set with transition='cut'")
        if isinstance(self.num_chunks, bool) or not isinstance(self.num_chunks, int) or self.num_chunks < 1:
            raise ValueError(f"num_chunks must be a positive integer (got {self.num_chunks!r})")
        if self.transition not in TRANSITIONS:
            raise ValueError(f"transition must be one of {', '.join(TRANSITIONS)} (got {self.transition!r})")


@dataclass(frozen=True)
class ShotSpan:
    """Where one shot lies in the video: for logs and the video's metadata."""

    index: int  # counted from 0
    prompt: str
    scene_cut: bool  # starts with a cut (False for the first shot and for "continue")
    start_chunk: int
    num_chunks: int
    start_frame: int  # video frame at 24 fps
    num_frames: int
    start_seconds: float
    seconds: float


@dataclass(frozen=True)
class PromptSchedule:
    """Shots in order; everything per chunk is derived from them."""

    shots: tuple[Shot, ...]
    frames_per_block: int = DEFAULT_FRAMES_PER_BLOCK
    source: str = ""  # where the shots came from (a path, "prompt"), for logs

    def __post_init__(self) -> None:
        object.__setattr__(self, "shots", tuple(self.shots))
        if not self.shots:
            raise ValueError("a prompt schedule needs at least one shot")
        for shot in self.shots:
            if not isinstance(shot, Shot):
                raise ValueError(f"shots must be Shot objects (got {type(shot).__name__})")
        fpb = self.frames_per_block
        if isinstance(fpb, bool) or not isinstance(fpb, int) or fpb < 1:
            raise ValueError(f"frames_per_block must be a positive integer (got {fpb!r})")

    @property
    def num_chunks(self) -> int:
        return sum(shot.num_chunks for shot in self.shots)

    @property
    def num_latent_frames(self) -> int:
        return self.num_chunks * self.frames_per_block

    @property
    def num_video_frames(self) -> int:
        return video_frame_count(self.num_chunks, self.frames_per_block)

    @property
    def seconds(self) -> float:
        return self.num_video_frames / VIDEO_FPS

    @property
    def shot_start_chunks(self) -> list[int]:
        starts, chunk = [], 0
        for shot in self.shots:
            starts.append(chunk)
            chunk += shot.num_chunks
        return starts

    @property
    def shot_start_frames(self) -> list[int]:
        return [chunk_start_frame(c, self.frames_per_block) for c in self.shot_start_chunks]

    @property
    def shot_start_seconds(self) -> list[float]:
        return [frame / VIDEO_FPS for frame in self.shot_start_frames]

    @property
    def shot_cuts(self) -> list[bool]:
        """Per shot: does it start with a scene cut (never the first shot)."""
        return [i > 0 and shot.transition == "cut" for i, shot in enumerate(self.shots)]

    @property
    def chunk_shots(self) -> list[int]:
        """Per chunk: the index of its shot."""
        return [i for i, shot in enumerate(self.shots) for _ in range(shot.num_chunks)]

    @property
    def chunk_start_frames(self) -> list[int]:
        return [chunk_start_frame(c, self.frames_per_block) for c in range(self.num_chunks)]

    @property
    def scene_cuts(self) -> list[bool]:
        """Per chunk: True at the first chunk of a shot that starts with a cut (`generate_latents`)."""
        flags = []
        for shot, cut in zip(self.shots, self.shot_cuts, strict=True):
            flags += [cut] + [False] * (shot.num_chunks - 1)
        return flags

    @property
    def chunk_prompts(self) -> list[str]:
        """Per chunk: the text it is conditioned on (the scene-cut prefix where a cut starts)."""
        prompts = []
        for shot, cut in zip(self.shots, self.shot_cuts, strict=True):
            first = SCENE_CUT_PREFIX + shot.prompt if cut else shot.prompt
            prompts += [first] + [shot.prompt] * (shot.num_chunks - 1)
        return prompts

    @property
    def spans(self) -> list[ShotSpan]:
        fpb, spans = self.frames_per_block, []
        for i, (shot, start, cut) in enumerate(zip(self.shots, self.shot_start_chunks, self.shot_cuts,
                                                   strict=True)):
            first, end = chunk_start_frame(start, fpb), chunk_start_frame(start + shot.num_chunks, fpb)
            spans.append(ShotSpan(index=i, prompt=shot.prompt, scene_cut=cut, start_chunk=start,
                                  num_chunks=shot.num_chunks, start_frame=first, num_frames=end - first,
                                  start_seconds=first / VIDEO_FPS, seconds=(end - first) / VIDEO_FPS))
        return spans


# ----------------------------------------------------------------------------------------------
# Sources.


def single_prompt_schedule(prompt: str, num_chunks: int,
                           frames_per_block: int = DEFAULT_FRAMES_PER_BLOCK) -> PromptSchedule:
    """One shot: `prompt` on every chunk."""
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise UserError('the prompt is empty: describe what the video shows, e.g. longlive generate '
                        '"a red ball bounces on a wooden floor"')
    text = _check_prompt(prompt, "prompt", "cuts need a shot list (.txt, .yaml or .json)")
    _check_num_chunks(num_chunks, "prompt")
    return PromptSchedule((Shot(text, num_chunks),), frames_per_block, source="prompt")


def even_split_schedule(prompts: Sequence[str], num_chunks: int,
                        frames_per_block: int = DEFAULT_FRAMES_PER_BLOCK,
                        source: str = "prompts") -> PromptSchedule:
    """`num_chunks` split evenly over the prompts (remainder to the first), a cut before each."""
    texts = [_check_prompt(p, f"{source} shot {i + 1}", _TXT_CUT_FIX) for i, p in enumerate(prompts)]
    return _even_split(texts, num_chunks, frames_per_block, source)


def load_schedule(path: PathLike, frames_per_block: int, num_chunks: int | None = None) -> PromptSchedule:
    """Read a shot list (.txt, .yaml/.yml, .json) into a schedule.

    `num_chunks` is the total length, required for .txt and refused for YAML/JSON, whose shot
    durations set the length (pass None there unless the user asked for a length)."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path}: unknown shot-list type {path.suffix or '(no suffix)'!r}: use .txt (one "
                        f"prompt per line), .yaml/.yml or .json (shots with prompt and seconds or frames)")
    text = _read_text(path)
    if kind == "txt":
        return _txt_schedule(text, path, frames_per_block, num_chunks)
    if num_chunks is not None:
        raise UserError(f"{path}: the shots' seconds/frames set the video length, so a total length "
                        f"({plural(num_chunks, 'chunk')}) cannot apply: drop the length option, or give the prompts "
                        f"as a .txt file to split a length evenly")
    if not text.strip():
        raise UserError(f"{path}: the file is empty: write a list of shots, each with prompt and "
                        f"seconds or frames")
    data = _parse_yaml(text, path) if kind == "yaml" else _parse_json(text, path)
    return _structured_schedule(data, path, frames_per_block)


# -- text files ---------------------------------------------------------------------------------


def _txt_schedule(text: str, path: Path, frames_per_block: int, num_chunks: int | None) -> PromptSchedule:
    if num_chunks is None:
        raise UserError(f"{path}: a .txt shot list needs the total video length to split over its lines: "
                        f"give a length, or use .yaml/.json with seconds or frames per shot")
    prompts = []
    for line_number, line in enumerate(text.split("\n"), 1):
        prompt = line.strip()
        if not prompt or prompt.startswith("#"):
            continue
        prompts.append(_check_prompt(prompt, f"{path} line {line_number}", _TXT_CUT_FIX))
    if not prompts:
        what = "the file is empty" if not text.strip() else "the file has only empty or # comment lines"
        raise UserError(f"{path}: no shots ({what}): write one prompt per line")
    return _even_split(prompts, num_chunks, frames_per_block, str(path))


def _even_split(prompts: list[str], num_chunks: int, frames_per_block: int, source: str) -> PromptSchedule:
    if not prompts:
        raise UserError(f"{source}: no shots: give at least one prompt")
    _check_num_chunks(num_chunks, source)
    if len(prompts) > num_chunks:
        raise UserError(f"{source}: {len(prompts)} shots but the video has only {plural(num_chunks, 'chunk')} and "
                        f"every shot needs one: make the video at least {len(prompts)} chunks "
                        f"({video_frame_count(len(prompts), frames_per_block)} video frames) long or remove shots")
    base, extra = divmod(num_chunks, len(prompts))
    shots = tuple(Shot(p, base + (i < extra), "cut") for i, p in enumerate(prompts))
    return PromptSchedule(shots, frames_per_block, source)


# -- YAML and JSON ------------------------------------------------------------------------------


class _LineDict(dict):
    """A YAML mapping that remembers its own line and its keys' lines (1-based)."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[Any, int] = {}


class _LineList(list):
    """A YAML sequence that remembers its own line and its items' lines (1-based)."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader of its own, so the line-recording constructors below stay local."""


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping repeats a key (PyYAML would silently keep the last one)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    seen = set()
    for key_node, _ in node.value:  # duplicates among the mapping's own keys (merged keys may be overridden)
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            if (key_node.tag, key_node.value) in seen:
                raise _DuplicateKeyError(None, None, f"the key {key_node.value!r} appears twice", key_node.start_mark)
            seen.add((key_node.tag, key_node.value))
    loader.flatten_mapping(node)
    result = _LineDict(node.start_mark.line + 1)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(None, None, "a key that is a list or mapping",
                                                    key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _LineList:
    result = _LineList(node.start_mark.line + 1)
    for item in node.value:
        result.append(loader.construct_object(item, deep=True))
        result.item_lines.append(item.start_mark.line + 1)
    return result


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        return yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path} line {mark.line + 1}" if mark is not None else str(path)
        problem = _one_line(err.problem or err.context or "syntax error")
        fix = ("keep one of them" if isinstance(err, _DuplicateKeyError) else
               "fix it there (quote a prompt that contains ': ' or ' #' or starts with a special character)")
        raise UserError(f"{where}: bad YAML ({problem}): {fix}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: bad YAML ({_one_line(str(err))}): fix the file") from None


class _DuplicateJSONKey(Exception):
    """A JSON object repeats a key (json would silently keep the last one)."""


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateJSONKey(key)
        result[key] = value
    return result


def _parse_json(text: str, path: Path) -> Any:
    try:
        data = json.loads(text, object_pairs_hook=_json_object)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} line {err.lineno}: bad JSON ({err.msg} at column {err.colno}): "
                        f"fix it there") from None
    except _DuplicateJSONKey as err:
        raise UserError(f"{path}: bad JSON (the key {err.args[0]!r} appears twice in one object): "
                        f"keep one of them") from None
    # JSON parses as YAML nearly always; where it gives the same data the YAML reading has line numbers.
    try:
        located = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError:
        return data
    return located if located == data else data


@dataclass(frozen=True)
class _Defaults:
    frames: Fraction | None = None  # video frames
    transition: Transition = "cut"


def _structured_schedule(data: Any, path: Path, frames_per_block: int) -> PromptSchedule:
    defaults = _Defaults()
    if isinstance(data, dict):
        _check_keys(data, TOP_LEVEL_KEYS, path, None, "top-level")
        if "defaults" in data:
            defaults = _read_defaults(data, path)
        if "shots" not in data:
            raise UserError(f"{_place(path, _line(data), None)}: no `shots:` list: put the shots under "
                            f"`shots:` (or make the whole file a list of shots)")
        items = data["shots"]
        if not isinstance(items, list):
            raise UserError(f"{_place(path, _key_line(data, 'shots'), None)}: `shots` must be a list of shots "
                            f"(got {_kind(items)}): write each shot as an item `- prompt: ...`")
    elif isinstance(data, list):
        items = data
    elif data is None:
        items = []
    else:
        raise UserError(f"{path}: expected a list of shots or a mapping with `shots:` (got {_kind(data)}): "
                        f"write shots with prompt and seconds or frames")
    if not items:
        raise UserError(f"{path}: no shots: add shots, each with prompt and seconds or frames")

    prompts, durations, transitions = [], [], []
    for index, item in enumerate(items):
        shot_line = items.item_lines[index] if isinstance(items, _LineList) else None
        where = _place(path, shot_line, index + 1)
        if not isinstance(item, dict):
            raise UserError(f"{where}: a shot must be a mapping with prompt and seconds or frames (got "
                            f"{_kind(item)}): write `- prompt: ...` with `seconds: ...` below it")
        _check_keys(item, SHOT_KEYS, path, index + 1, "shot")
        if "prompt" not in item:
            raise UserError(f"{where}: the shot has no prompt: add `prompt: ...`")
        prompts.append(_check_prompt(item["prompt"], _place(path, _key_line(item, "prompt", shot_line), index + 1),
                                     "cuts are set with `transition: cut` (the default) or `continue`"))
        frames = _read_duration(item, path, index + 1, shot_line)
        if frames is None:
            frames = defaults.frames
        if frames is None:
            raise UserError(f"{where}: the shot has no duration: add `seconds: ...` or `frames: ...` (video "
                            f"frames at {VIDEO_FPS} fps), or give one under `defaults:`")
        durations.append(frames)
        transition = defaults.transition
        if "transition" in item:
            transition = _check_transition(item["transition"],
                                           _place(path, _key_line(item, "transition", shot_line), index + 1))
        transitions.append(transition)
    counts = durations_to_chunks(durations, frames_per_block)
    shots = tuple(Shot(p, n, t) for p, n, t in zip(prompts, counts, transitions, strict=True))
    return PromptSchedule(shots, frames_per_block, str(path))


def _read_defaults(data: dict, path: Path) -> _Defaults:
    value = data["defaults"]
    if not isinstance(value, dict):
        raise UserError(f"{_place(path, _key_line(data, 'defaults'), None)}: `defaults` must be a mapping (got "
                        f"{_kind(value)}): write e.g. `defaults: {{seconds: 5, transition: cut}}`")
    _check_keys(value, DEFAULT_KEYS, path, None, "defaults")
    frames = _read_duration(value, path, None, _line(value))
    transition: Transition = "cut"
    if "transition" in value:
        transition = _check_transition(value["transition"], _place(path, _key_line(value, "transition"), None))
    return _Defaults(frames, transition)


def _read_duration(entry: dict, path: Path, shot: int | None, fallback_line: int | None) -> Fraction | None:
    """The entry's `seconds` or `frames` in video frames, or None when it has neither."""
    given = [key for key in ("seconds", "frames") if key in entry]
    if len(given) == 2:
        raise UserError(f"{_place(path, _key_line(entry, 'frames', fallback_line), shot)}: both seconds and "
                        f"frames are given: keep one of them")
    if not given:
        return None
    key = given[0]
    value = entry[key]
    where = _place(path, _key_line(entry, key, fallback_line), shot)
    example = "seconds: 4.5" if key == "seconds" else "frames: 96"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{where}: {key} must be a number (got {_show(value)}): write e.g. `{example}`")
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{where}: {key} must be a number greater than 0 (got {value!r}): give the shot's length, "
                        f"e.g. `{example}`")
    if key == "seconds":
        return Fraction(str(value)) * VIDEO_FPS  # str: 0.1 s is exactly 2.4 frames
    if isinstance(value, float) and not value.is_integer():
        raise UserError(f"{where}: frames must be a whole number of video frames (got {value!r}): round it, "
                        f"or use `seconds:`")
    return Fraction(int(value))


def _check_transition(value: Any, where: str) -> Transition:
    if not isinstance(value, str) or value not in TRANSITIONS:
        note = " (YAML reads yes/no/on/off as true/false)" if isinstance(value, bool) else ""
        raise UserError(f"{where}: unknown transition {_show(value)}{note}: use one of {', '.join(TRANSITIONS)}")
    return value  # type: ignore[return-value]


def _check_keys(entry: dict, allowed: tuple[str, ...], path: Path, shot: int | None, what: str) -> None:
    for key in entry:
        if key not in allowed:
            where = _place(path, _key_line(entry, key), shot)
            hint = " (a shot goes in a list: `- prompt: ...`)" if what == "top-level" and key in SHOT_KEYS else ""
            raise UserError(f"{where}: unknown {what} key {_show(key)}: allowed keys are {', '.join(allowed)}{hint}")


# -- shared checks and message helpers ----------------------------------------------------------


def _check_prompt(value: Any, where: str, cut_fix: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{where}: the prompt is empty: write what the shot shows (or remove the shot)")
    if not isinstance(value, str):
        raise UserError(f"{where}: the prompt must be text (got {_kind(value)} {_show(value)}): put it in "
                        f"quotes")
    prompt = value.strip()
    if prompt.casefold().startswith(_CUT_WORDS):
        raise UserError(f"{where}: the prompt starts with the scene-cut prefix {SCENE_CUT_PREFIX.strip()!r}: "
                        f"remove it, {cut_fix}")
    return prompt


def _check_num_chunks(num_chunks: Any, source: str) -> None:
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise UserError(f"{source}: the video length must be at least one chunk (got num_chunks="
                        f"{num_chunks!r}): give a longer video")


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found: check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a shot list: give a .txt, .yaml or .json file") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied: fix the file's permissions") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror}): check the file") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise UserError(f"{path} line {line}: not UTF-8 text: save the file as UTF-8") from None


def _place(path: Path, line: int | None, shot: int | None) -> str:
    parts = [f"line {line}"] if line is not None else []
    parts += [f"shot {shot}"] if shot is not None else []
    return f"{path} {', '.join(parts)}" if parts else str(path)


def _line(entry: Any) -> int | None:
    return entry.line if isinstance(entry, _LineDict | _LineList) else None


def _key_line(entry: Any, key: Any, fallback: int | None = None) -> int | None:
    if isinstance(entry, _LineDict) and key in entry.key_lines:
        return entry.key_lines[key]
    return fallback if fallback is not None else _line(entry)


def _kind(value: Any) -> str:
    names = {bool: "true/false", int: "a number", float: "a number", dict: "a mapping", list: "a list",
             str: "text", type(None): "nothing"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return f"a {type(value).__name__}"


def _show(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= _SHOW_CHARS else shown[:_SHOW_CHARS - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())
