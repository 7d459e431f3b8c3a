"""Interactive mode (issue 14, item 6): typed text is read key by key under the bar (no echo into
it, drawn in a line below), and every switch is recorded in the mp4's and the latents' metadata."""

from __future__ import annotations

import io
import json
import os
import queue
import termios
import threading
import time
from pathlib import Path

import av
from rich.console import Console
from safetensors import safe_open

import core.generate as gen
import core.interactive
from core.config import load_recipe
from core.shots import single_prompt_schedule
from longlive_cli.build import build_models, generation_spec
from longlive_cli.interactive import PromptReader
from longlive_cli.progress import TaskProgress, count_of, per_second


def _wait_for(condition, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_keys_are_read_without_echo_and_the_terminal_is_restored():
    master, slave = os.openpty()
    stream = os.fdopen(slave, "r")
    before = termios.tcgetattr(slave)
    try:
        with PromptReader(stream, keys=True) as reader:
            assert not termios.tcgetattr(slave)[3] & termios.ECHO  # nothing typed lands in the bar
            os.write(master, b"a stormy\x7f begins\x1b[D\r")  # Backspace edits, an arrow key is ignored
            assert _wait_for(reader.next_prompt) == "a storm begins"
            os.write(master, "la mer calme\u0301".encode())
            _wait_for(lambda: reader.typed == "la mer calme\u0301")
            assert reader.footer().endswith("la mer calme\u0301\u2588")
            os.write(master, b"\x15\r")  # Ctrl-U clears the line: an empty Enter submits nothing
            _wait_for(lambda: reader.typed == "")
            assert reader.next_prompt() is None
        assert termios.tcgetattr(slave) == before
        os.set_blocking(master, False)
        try:
            echoed = os.read(master, 1024)
        except BlockingIOError:
            echoed = b""
        assert echoed == b""
    finally:
        stream.close()
        os.close(master)


def test_lines_are_read_as_they_come_without_a_terminal():
    with PromptReader(io.StringIO("  \nfirst prompt\nsecond\n"), keys=False) as reader:
        assert _wait_for(reader.next_prompt) == "first prompt"
        assert _wait_for(reader.next_prompt) == "second"


def test_the_typed_line_is_drawn_under_the_bar():
    console = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    progress = TaskProgress("multishot", count_of("chunks"), console=console, total=3, rate=per_second("frames/s"),
                            footer=lambda: "next prompt (Enter switches once it is encoded, at a chunk start): a sto")
    with console.capture() as captured:
        console.print(progress._bar.get_renderable())
    lines = captured.get().splitlines()
    assert lines[0].startswith("multishot") and "0/3 chunks" in lines[0]
    assert lines[1] == "next prompt (Enter switches once it is encoded, at a chunk start): a sto"


def test_switches_are_recorded_in_the_video_and_latents_metadata(tmp_path, fast_decode, monkeypatch):
    recipe = load_recipe(None, ["stream.frames_per_block=2", "stream.local_window_frames=6", "stream.sink_frames=2",
                                "video.height=32", "video.width=32"], preset="tiny")
    # Prompts typed as chunks 1 and 3 are about to start; the run waits until each is encoded and
    # handed over, so each lands at that chunk (the encoder runs on its own thread).
    typed, ready = queue.Queue(), {"a storm begins": threading.Event(), "lightning": threading.Event()}

    class HandedOver(core.interactive.BackgroundPrompts):
        def _encode_one(self, switch, side):
            super()._encode_one(switch, side)
            ready[switch.prompt].set()

    def on_chunk(done, total):
        prompt = {1: "a storm begins", 3: "lightning"}.get(done)
        if prompt is not None:
            typed.put(prompt)
            assert ready[prompt].wait(30)

    monkeypatch.setattr(core.interactive, "BackgroundPrompts", HandedOver)
    # 93 frames: x264 holds back ~40 frames, so the mp4 header (and the metadata in it) has gone out
    # long before the run ends and the switches are known
    request = gen.GenerateRequest(recipe, single_prompt_schedule("calm sea", 12, 2), tmp_path / "i.mp4",
                                  latents_out=tmp_path / "z.safetensors")
    placement = gen.prepare(request)
    models = build_models(request, placement, generation_spec(request, placement))
    report = gen.generate_video(request, placement, models, on_chunk,
                                prompt_source=lambda: None if typed.empty() else typed.get(), log=lambda text: None)
    expected = [{"chunk": 1, "frame": 5, "prompt": "a storm begins"}, {"chunk": 3, "frame": 21, "prompt": "lightning"}]
    assert [(s["chunk"], s["frame"], s["prompt"]) for s in expected] == report.switches
    with av.open(str(tmp_path / "i.mp4")) as container:
        comment = json.loads(container.metadata["comment"])
        assert len(list(container.decode(video=0))) == 93 and container.streams.video[0].average_rate == 24
    assert comment["switches"] == expected and comment["shot_start_frames"] == [0]
    with safe_open(str(tmp_path / "z.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["switches"]) == expected
        assert json.loads(f.metadata()["shot_start_frames"]) == [0]
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["i.mp4", "z.safetensors"]
