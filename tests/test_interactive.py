"""Interactive switches never wait for the text encoder (core/interactive.py)."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from core.interactive import BackgroundPrompts


def _source(prompts: queue.Queue):
    def next_prompt():
        try:
            return prompts.get_nowait()
        except queue.Empty:
            return None
    return next_prompt


def _context(prompt: str) -> torch.Tensor:
    return torch.full((1, 4, 3), float(len(prompt)))


def _wait_until(condition, timeout=5.0):
    deadline = time.perf_counter() + timeout
    while not condition():
        assert time.perf_counter() < deadline, "timed out"
        time.sleep(0.002)


def test_take_never_waits_for_a_slow_encoder():
    typed, release = queue.Queue(), threading.Event()

    def slow_encode(prompt):
        release.wait(10)
        return _context(prompt)

    with BackgroundPrompts(_source(typed), slow_encode, torch.device("cpu")) as prompts:
        typed.put("a red circle")
        _wait_until(lambda: prompts.switches)
        started = time.perf_counter()
        for chunk in range(5):  # boundaries pass while the encoder is busy: no switch, no wait
            assert prompts.take(chunk) is None
        assert time.perf_counter() - started < 0.5
        release.set()
        _wait_until(lambda: prompts.switches[0].encoded_at is not None)
        switch, context = prompts.take(5)
    assert switch.prompt == "a red circle" and switch.chunk == 5
    assert torch.equal(context, _context("a red circle"))
    assert 0 <= switch.encode_seconds <= switch.wait_seconds


@pytest.mark.parametrize("count", [2, 3])
def test_newest_ready_prompt_wins_and_older_are_marked(count):
    typed = queue.Queue()
    with BackgroundPrompts(_source(typed), _context, torch.device("cpu")) as prompts:
        for i in range(count):
            typed.put(f"prompt {'x' * i}")
        _wait_until(lambda: len(prompts.switches) == count
                    and all(s.encoded_at is not None for s in prompts.switches))
        switch, context = prompts.take(2)
        assert prompts.take(3) is None  # taken once
    assert switch.prompt == f"prompt {'x' * (count - 1)}"
    assert torch.equal(context, _context(switch.prompt))
    assert [s.superseded for s in prompts.switches] == [True] * (count - 1) + [False]


def test_encoder_error_reaches_the_generation_thread():
    typed = queue.Queue()

    def broken(prompt):
        raise RuntimeError("encoder exploded")

    with BackgroundPrompts(_source(typed), broken, torch.device("cpu")) as prompts:
        typed.put("anything")
        _wait_until(lambda: prompts._error is not None)
        with pytest.raises(RuntimeError, match="encoder exploded"):
            prompts.take(0)


def test_thread_stops_on_exit():
    with BackgroundPrompts(lambda: None, _context, torch.device("cpu")) as prompts:
        assert prompts._thread.is_alive()
    assert not prompts._thread.is_alive()


def test_wait_ready_times_out_then_wakes_when_a_context_is_ready():
    typed = queue.Queue()
    with BackgroundPrompts(_source(typed), _context, torch.device("cpu")) as prompts:
        assert prompts.wait_ready(0.05) is False
        typed.put("a blue square")
        assert prompts.wait_ready(10) is True
        switch, context = prompts.take(1)
    assert switch.prompt == "a blue square" and torch.equal(context, _context("a blue square"))
