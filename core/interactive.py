"""Interactive prompt switches without a stall: typed prompts are encoded off the denoising thread.

The text encoder (umt5-xxl, 5.7B; its weights visit the GPU only while it encodes) takes longer
than a chunk of denoising. Encoding a typed prompt on the generation thread would stall the video
for that long. `BackgroundPrompts` polls the prompt source from its own thread, encodes each prompt
there (on its own CUDA stream), and hands finished contexts to the pipeline's `prompt_switch(chunk)`
without ever blocking it: a switch lands at the first chunk boundary after its context is ready.

Timeline of one switch (`Switch`): typed (the source returned it) -> encoded (context ready) ->
applied (the chunk that first uses it starts). Enter-to-first-switched-frame is `applied - typed`
plus that chunk's denoise and decode.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class Switch:
    """One typed prompt and its timestamps (`time.perf_counter()` seconds)."""

    prompt: str
    typed_at: float
    encoded_at: float | None = None
    applied_at: float | None = None
    chunk: int | None = None  # the first chunk denoised with it; None if never applied
    superseded: bool = False  # a later prompt was ready at the same boundary and won

    @property
    def encode_seconds(self) -> float | None:
        return None if self.encoded_at is None else self.encoded_at - self.typed_at

    @property
    def wait_seconds(self) -> float | None:
        """From Enter to the start of the chunk that uses it."""
        return None if self.applied_at is None else self.applied_at - self.typed_at


@runtime_checkable
class PromptFeed(Protocol):
    """Typed prompts with their contexts, taken at chunk boundaries; a context manager."""

    switches: list[Switch]  # every prompt typed so far, applied or not

    def take(self, chunk: int) -> tuple[Switch, Tensor] | None: ...

    def __enter__(self) -> PromptFeed: ...

    def __exit__(self, *exc) -> None: ...


class BackgroundPrompts:
    """Polls `source()` every `poll_seconds` on a daemon thread and encodes what it returns with
    `encode(prompt) -> context`; `take()` returns the newest ready (switch, context) or None and
    never waits. Use as a context manager (the thread stops on exit)."""

    def __init__(self, source: Callable[[], str | None], encode: Callable[[str], Tensor],
                 device: torch.device, poll_seconds: float = 0.005):
        self.source, self.encode, self.device = source, encode, device
        self.poll_seconds = poll_seconds
        self.switches: list[Switch] = []
        self._ready: list[tuple[Switch, Tensor, object]] = []  # (switch, context, cuda event)
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="longlive-text-encoder", daemon=True)

    def __enter__(self) -> BackgroundPrompts:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        try:
            while not self._stop.is_set():
                prompt = self.source()
                if not prompt:
                    self._stop.wait(self.poll_seconds)
                    continue
                switch = Switch(prompt, typed_at=time.perf_counter())
                with self._lock:
                    self.switches.append(switch)
                self._encode_one(switch, side)
        except BaseException as err:  # noqa: BLE001 - surfaced on the generation thread by take()
            self._error = err

    def _encode_one(self, switch: Switch, side) -> None:
        event = None
        if side is None:
            context = self.encode(switch.prompt)
        else:
            with torch.cuda.stream(side):
                context = self.encode(switch.prompt)
                event = torch.cuda.Event()
                event.record(side)
        switch.encoded_at = time.perf_counter()
        with self._lock:
            self._ready.append((switch, context, event))
            self._lock.notify_all()

    def wait_ready(self, timeout: float) -> bool:
        """Block until a context is ready to take (scripted runs, tests); False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: bool(self._ready), timeout)

    def take(self, chunk: int) -> tuple[Switch, Tensor] | None:
        """The newest context ready now (older ready ones are marked superseded), or None."""
        if self._error is not None:
            raise self._error
        with self._lock:
            ready, self._ready = self._ready, []
        if not ready:
            return None
        for switch, _, _ in ready[:-1]:
            switch.superseded = True
        switch, context, event = ready[-1]
        if event is not None:  # the consumer's stream waits on the GPU, the host does not
            torch.cuda.current_stream(self.device).wait_event(event)
            context.record_stream(torch.cuda.current_stream(self.device))
        switch.applied_at, switch.chunk = time.perf_counter(), chunk
        return switch, context


class ScriptedPrompts:
    """A `PromptFeed` of prompts "typed" at known chunks (`{chunk: prompt}`), encoded when taken:
    reproducible interactive runs (evaluation suites, tests)."""

    def __init__(self, at_chunk: dict[int, str], encode: Callable[[str], Tensor]):
        self.at_chunk, self.encode = dict(at_chunk), encode
        self.switches: list[Switch] = []

    def __enter__(self) -> ScriptedPrompts:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def take(self, chunk: int) -> tuple[Switch, Tensor] | None:
        prompt = self.at_chunk.get(chunk)
        if prompt is None:
            return None
        now = time.perf_counter()
        context = self.encode(prompt)
        switch = Switch(prompt, typed_at=now, encoded_at=time.perf_counter(), applied_at=time.perf_counter(),
                        chunk=chunk)
        self.switches.append(switch)
        return switch, context


def live_prompts(source: Callable[[], str | None], text, device: torch.device,
                 dtype: torch.dtype) -> BackgroundPrompts:
    """`BackgroundPrompts` encoding typed prompts with `text` (a `core.text.TextEncoder`) in `dtype`.
    Every new prompt makes the encoder's weights visit the GPU, so their host copies are
    page-locked first (`pin_host_memory`: a one-off copy before the video starts)."""
    text.pin_host_memory()
    return BackgroundPrompts(source, lambda prompt: text.encode([prompt]).to(device=device, dtype=dtype), device)


@contextlib.contextmanager
def open_feed(source: Callable[[], str | None] | PromptFeed | None, text, device: torch.device,
              dtype: torch.dtype) -> Iterator[PromptFeed | None]:
    """The open feed of `generate_video`: None without a source, a ready `PromptFeed` as it is,
    else `BackgroundPrompts` encoding with `text` (a `core.text.TextEncoder`) in `dtype`."""
    if source is None:
        yield None
        return
    feed = source if isinstance(source, PromptFeed) else live_prompts(source, text, device, dtype)
    with feed:
        yield feed
