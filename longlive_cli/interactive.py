"""Prompts typed while a video generates (`multishot --interactive`), read by a thread.

Under a live progress bar the terminal is put in cbreak mode (no echo, keys one by one): the text
being typed is drawn in a line under the bar (`footer`) instead of being echoed into it; Enter
submits, Backspace edits, Ctrl-U clears, escape sequences (arrow keys) are ignored. Without a
live bar (stdin or stderr not a terminal) lines are read as they come. The terminal's settings
are restored on exit, whatever ends the run.
"""

from __future__ import annotations

import codecs
import os
import queue
import sys
import threading
from typing import TextIO

_SUBMIT = ("\r", "\n")
_ERASE = ("\x7f", "\b")
_CLEAR_LINE = "\x15"  # Ctrl-U
_ESCAPE = "\x1b"


class PromptReader:
    """Typed prompts, one per Enter; `next_prompt()` returns the oldest unread one or None."""

    def __init__(self, stream: TextIO | None = None, *, keys: bool = False):
        self.stream = stream if stream is not None else sys.stdin
        self.keys = keys  # read key by key in cbreak mode (needs a terminal)
        self.typed = ""
        self._prompts: queue.Queue[str] = queue.Queue()
        self._saved_mode: list | None = None
        self._escape: str | None = None  # inside an escape sequence: what followed ESC so far

    def __enter__(self) -> PromptReader:
        if self.keys:
            import termios
            import tty

            fd = self.stream.fileno()
            self._saved_mode = termios.tcgetattr(fd)
            tty.setcbreak(fd)  # Ctrl-C still interrupts (ISIG stays on)
        target = self._read_keys if self.keys else self._read_lines
        threading.Thread(target=target, name="longlive-prompts", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._saved_mode is not None:
            import termios

            termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self._saved_mode)
            self._saved_mode = None

    def next_prompt(self) -> str | None:
        try:
            return self._prompts.get_nowait()
        except queue.Empty:
            return None

    def footer(self) -> str:
        """The line under the progress bar: what is being typed."""
        return f"next prompt (Enter switches once it is encoded, at a chunk start): {self.typed}\u2588"

    def _submit(self, text: str) -> None:
        if text.strip():
            self._prompts.put(text.strip())

    def _read_lines(self) -> None:
        for line in self.stream:
            self._submit(line)

    def _read_keys(self) -> None:
        fd = self.stream.fileno()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:  # the terminal went away (EIO): no more input, as at end of file
                return
            if not data:
                return
            for char in decoder.decode(data):
                self.key(char)

    def key(self, char: str) -> None:
        """Apply one typed character to the line being edited. Escape sequences (arrows, function
        keys: ESC [ ... final byte, ESC O x, ESC x) are skipped."""
        if self._escape is not None:
            if self._escape == "" and char in "[O":
                self._escape = char
            elif self._escape == "[" and not "\x40" <= char <= "\x7e":
                pass  # parameter bytes of a CSI sequence
            else:
                self._escape = None
            return
        if char in _SUBMIT:
            self._submit(self.typed)
            self.typed = ""
        elif char in _ERASE:
            self.typed = self.typed[:-1]
        elif char == _CLEAR_LINE:
            self.typed = ""
        elif char == _ESCAPE:
            self._escape = ""
        elif char.isprintable():
            self.typed += char
