"""`interrupted()` (longlive_cli/app.py): a Ctrl-C that Python swallows in a finalizer ("Exception
ignored in ...": seen once in CI, where a training run then went on after its SIGINT) is raised
again where the work is; other finalizer errors still reach the hook that was there."""

from __future__ import annotations

import signal
import sys
import time

import pytest

from core.errors import Interrupted
from longlive_cli.app import interrupted


class RaisesInDel:
    def __init__(self, error: type[BaseException]):
        self.error = error

    def __del__(self):
        raise self.error  # KeyboardInterrupt: what the SIGINT handler raises when the signal lands here


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler (a run started from a background job may inherit SIG_IGN)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_ctrl_c_swallowed_by_a_finalizer_still_interrupts(default_sigint):
    hook = sys.unraisablehook
    loops = 0
    with pytest.raises(Interrupted, match="nothing was written"):
        with interrupted("nothing was written"):
            RaisesInDel(KeyboardInterrupt)  # collected at once: its KeyboardInterrupt is "ignored"
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the work going on
                loops += 1
                time.sleep(0.01)
    assert loops < 100  # stopped at once, not after the 5 s
    assert sys.unraisablehook is hook


def test_other_finalizer_errors_reach_the_previous_hook(default_sigint, monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(unraisable.exc_type))
    with interrupted("kept"):
        RaisesInDel(ValueError)
    assert seen == [ValueError]
