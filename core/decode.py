"""Decoding that overlaps denoising, and the H.264 writer that receives frames as they come.

Each finished latent chunk goes to a decoder right after its recache pass:

* `SyncDecoder` decodes on the current stream, in line with the denoising.
* `StreamDecoder` decodes on a side CUDA stream of the same GPU: the chunk is handed over with an
  event (the side stream waits for it, the host never does) and finished chunks are collected
  with non-blocking event queries; only a backlog beyond `max_in_flight` makes the host wait.
* `DeviceDecoder` runs the VAE on another GPU in a worker thread fed by a bounded queue; frames
  come back through pinned host memory; an exception in the worker surfaces in the main thread.

Frames leave the GPU as uint8 `[T, H, W, 3]` and go to a `VideoWriter`, which encodes them in a
thread of its own into a temp file renamed at the end: host memory stays bounded by a few chunks
for any video length, and an interrupted run leaves nothing under the final name.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from core.config import VIDEO_FPS
from core.errors import UserError, discard_partial, os_error_of, write_failed

FrameSink = Callable[[np.ndarray], None]  # uint8 [T, H, W, 3]


def to_uint8_frames(pixels_BCTHW: Tensor) -> Tensor:
    """VAE output in [-1, 1] (batch 1) -> uint8 `[T, H, W, 3]` on the same device, rounding as
    the official writer does: clamp, map to [0, 1], scale by 255, truncate."""
    if pixels_BCTHW.shape[0] != 1:
        raise ValueError(f"one video at a time (got a batch of {pixels_BCTHW.shape[0]})")
    unit = (pixels_BCTHW[0].float().clamp(-1, 1) * 0.5 + 0.5).clamp(0, 1)
    return (unit * 255).to(torch.uint8).permute(1, 2, 3, 0)


def _host_buffer(like: Tensor) -> Tensor:
    return torch.empty(like.shape, dtype=like.dtype, pin_memory=torch.cuda.is_available())


def _vae_input(latents_BfCHW: Tensor, vae) -> Tensor:
    """Pipeline layout `[B, f, C, h, w]` -> the VAE's `[B, C, f, h, w]` in its dtype."""
    return latents_BfCHW.permute(0, 2, 1, 3, 4).to(dtype=next(vae.parameters()).dtype).contiguous()


class SyncDecoder:
    """Decode each chunk when it is submitted (the simple, serial mode)."""

    def __init__(self, vae, sink: FrameSink):
        self.decoder = vae.streaming_decoder()
        self.vae = vae
        self.sink = sink

    def submit(self, latents_BfCHW: Tensor) -> None:
        frames = to_uint8_frames(self.decoder.decode(_vae_input(latents_BfCHW, self.vae)))
        self.sink(frames.cpu().numpy())

    def finish(self) -> None:
        """Nothing is pending: every chunk was decoded when it was submitted."""


class StreamDecoder:
    """Decode on a side CUDA stream of the VAE's GPU while the main stream keeps denoising."""

    def __init__(self, vae, sink: FrameSink, max_in_flight: int = 2):
        self.device = next(vae.parameters()).device
        if self.device.type != "cuda":
            raise UserError("--decode stream needs the VAE on a CUDA GPU; use --decode sync on a CPU")
        self.vae = vae
        self.sink = sink
        self.max_in_flight = max_in_flight
        self.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self.stream):  # its feature cache lives on the side stream
            self.decoder = vae.streaming_decoder()
        self.pending: deque[tuple[torch.cuda.Event, Tensor]] = deque()

    def submit(self, latents_BfCHW: Tensor) -> None:
        ready = torch.cuda.Event()
        ready.record()  # on the main stream, after the chunk's recache
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            frames = to_uint8_frames(self.decoder.decode(_vae_input(latents_BfCHW, self.vae)))
            host = _host_buffer(frames)
            host.copy_(frames, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        # The side stream reads a main-stream tensor: keep the allocator from reusing it early.
        latents_BfCHW.record_stream(self.stream)
        self.pending.append((done, host))
        self._collect(wait=False)

    def _collect(self, wait: bool) -> None:
        while self.pending:
            done, host = self.pending[0]
            backlog = len(self.pending) > self.max_in_flight
            if not (wait or backlog or done.query()):
                return
            done.synchronize()
            self.pending.popleft()
            self.sink(host.numpy())

    def finish(self) -> None:
        self._collect(wait=True)


class DeviceDecoder:
    """The VAE on another GPU: a worker thread decodes chunks from a bounded queue."""

    _STOP = object()

    def __init__(self, vae, sink: FrameSink, queue_size: int = 2):
        self.device = next(vae.parameters()).device
        self.vae = vae
        self.sink = sink
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="longlive-vae", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            with torch.no_grad(), (torch.cuda.stream(stream) if stream else contextlib.nullcontext()):
                decoder = self.vae.streaming_decoder()
                while (item := self.queue.get()) is not self._STOP:
                    latents, ready = item
                    if ready is not None:
                        stream.wait_event(ready)
                    frames = to_uint8_frames(decoder.decode(latents))
                    host = _host_buffer(frames)
                    host.copy_(frames, non_blocking=stream is not None)
                    if stream is not None:
                        stream.synchronize()
                    self.sink(host.numpy())
        except BaseException as err:  # surfaced in the main thread by submit()/finish()
            self.error = err
            while True:  # unblock a producer waiting on a full queue
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"VAE decode on {self.device} failed: {self.error}") from self.error

    def _put(self, item) -> None:
        while True:
            self._raise_if_failed()
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def submit(self, latents_BfCHW: Tensor) -> None:
        self._raise_if_failed()
        latents = _vae_input(latents_BfCHW, self.vae)
        # Peer copy, asynchronous for the host; the worker's stream waits for it with an event.
        latents = latents.to(self.device, non_blocking=True)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        self._put((latents, ready))

    def finish(self) -> None:
        if self.thread.is_alive():
            self._put(self._STOP)
            self.thread.join()
        self._raise_if_failed()

    def close(self) -> None:
        """Stop the worker without waiting for queued work (error or interrupt paths)."""
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        if self.thread.is_alive():
            self.queue.put(self._STOP)
            self.thread.join(timeout=60)


def check_crf(crf: int) -> None:
    if not 0 <= crf <= 51:
        raise UserError(f"--crf {crf}: x264 quality must be between 0 (lossless) and 51")


@dataclass(frozen=True)
class DecodeMode:
    """Where the VAE decodes finished chunks: `sync` (in line), `stream` (a side CUDA stream of the
    generating GPU), `device` (its own GPU, `gpu`) or `split` (in line, each rank of a parallel run
    decoding a spatial band, `sp/vae_split.py`; in one process the band is the whole frame: sync).
    Parsed once from the `--decode` text."""

    kind: Literal["sync", "stream", "device", "split"] = "sync"
    gpu: int | None = None

    @classmethod
    def parse(cls, text: str | DecodeMode) -> DecodeMode:
        """`sync` | `stream` | `device:N` | `split`, or a one-line UserError."""
        if isinstance(text, DecodeMode):
            return text
        if text in ("sync", "stream", "split"):
            return cls(text)
        if text.startswith("device:") and text[7:].isdigit():
            return cls("device", int(text[7:]))
        raise UserError(f"--decode {text!r}: use sync, stream or device:N (N = the GPU for the VAE), "
                        f"or split (parallel runs)")

    def __str__(self) -> str:
        return f"device:{self.gpu}" if self.kind == "device" else self.kind

    def vae_device(self, main_device: torch.device) -> torch.device:
        """The device the VAE must live on; a UserError when this machine cannot decode this way."""
        if self.kind in ("sync", "split"):
            return main_device
        if not torch.cuda.is_available():
            raise UserError(f"--decode {self} needs a CUDA GPU, and none is visible: use --decode sync")
        if self.kind == "stream":
            if main_device.type != "cuda":
                raise UserError("--decode stream overlaps decoding on the generating GPU: it needs "
                                "--device cuda; use --decode sync on a CPU")
            return main_device
        if self.gpu >= torch.cuda.device_count():
            raise UserError(f"--decode {self}: only {torch.cuda.device_count()} CUDA device(s) are "
                            f"visible; pick device:0..device:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", self.gpu)


def make_decoder(mode: DecodeMode, vae, sink: FrameSink):
    # split: the VAE a parallel run hands in decodes its band (sp/replica.py); in line like sync
    return {"sync": SyncDecoder, "stream": StreamDecoder, "device": DeviceDecoder,
            "split": SyncDecoder}[mode.kind](vae, sink)


# ----------------------------------------------------------------------------------------------
# Writing.


class VideoWriter:
    """H.264 (libx264, yuv420p) mp4 at 24 fps, written by a background thread.

    Use as a context manager: frames written inside the block end up in `path` only if the block
    completes; on any exception (Ctrl-C included) the temp file is removed, and the first error is
    the one raised (a failing cleanup never hides it). A write the operating system refuses (disk
    full, read-only folder, file too large) is an `OutputError` naming `path` and the cause. `crf`
    is x264's quality (0 lossless .. 51 worst; 18 is visually lossless). `metadata` (title,
    comment, ...) may change until the block ends (`update_metadata`); a change made after the
    first packet costs a remux at the end (packets copied, nothing re-encoded). `thread_type` is
    how x264 spreads over the cores: "frame" (the ffmpeg command's default; for throughput),
    "slice" (PyAV's default; for latency) or "auto"."""

    def __init__(self, path: str | os.PathLike, width: int, height: int, *, fps: int = VIDEO_FPS,
                 crf: int = 18, preset: str = "medium", metadata: Mapping[str, str] | None = None,
                 max_queued_chunks: int = 2, thread_type: str = "frame"):
        check_crf(crf)
        if thread_type not in ("frame", "slice", "auto"):  # before any file exists: no stray temp file
            raise ValueError(f"thread_type must be frame, slice or auto (got {thread_type!r})")
        self.path = Path(path)
        self.width, self.height, self.fps = width, height, fps
        self.crf, self.preset, self.thread_type = crf, preset, thread_type
        self.metadata = dict(metadata or {})
        self.frames_written = 0
        # wall seconds the writer thread spent encoding each chunk: at steady state this is the
        # rate x264 sustains (it buffers about a chunk of frames, so a median over chunks)
        self.encode_seconds: list[float] = []
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued_chunks)
        self._error: BaseException | None = None
        self._temp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.part")
        self._thread: threading.Thread | None = None

    def __enter__(self) -> VideoWriter:
        import av

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(self._temp), mode="w", format="mp4")
        except OSError as err:
            discard_partial(self._temp)
            raise write_failed(self.path, err) from err
        self._container.metadata.update(self.metadata)
        self._header_metadata = dict(self.metadata)
        stream = self._container.add_stream("libx264", rate=self.fps)
        stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
        stream.options = {"crf": str(self.crf), "preset": self.preset}
        stream.codec_context.thread_type = self.thread_type.upper()
        self._stream = stream
        self._thread = threading.Thread(target=self._encode_loop, name="longlive-writer", daemon=True)
        self._thread.start()
        return self

    def update_metadata(self, values: Mapping[str, str]) -> None:
        """Change container metadata before the block ends (facts known only at the end, e.g. the
        interactive prompt switches). The mp4 muxer takes the metadata with its header, which goes
        out with the first packet: a change after that is written by a remux at the end."""
        self.metadata.update(values)

    def _remux_with_metadata(self) -> None:
        """Copy the closed temp file's packets (no re-encoding) into a new temp file that carries
        the current metadata, and put it in the temp file's place."""
        import av

        remuxed = self._temp.with_name(self._temp.name + ".remux")
        try:
            with av.open(str(self._temp)) as source, av.open(str(remuxed), mode="w", format="mp4") as target:
                target.metadata.update(self.metadata)
                video = source.streams.video[0]
                copy = target.add_stream_from_template(video)
                for packet in source.demux(video):
                    if packet.dts is not None:  # the demuxer's final flush packet carries no data
                        packet.stream = copy
                        target.mux(packet)
            os.replace(remuxed, self._temp)
        except BaseException:
            discard_partial(remuxed)
            raise

    def _encode(self, frames_THWC: np.ndarray) -> None:
        import av

        for frame in frames_THWC:
            self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))

    def _encode_loop(self) -> None:
        try:
            while (frames := self._queue.get()) is not None:
                started = time.perf_counter()
                self._encode(frames)
                self.encode_seconds.append(time.perf_counter() - started)
        except BaseException as err:
            self._error = err
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break

    def _failure(self, err: BaseException) -> BaseException:
        """What to raise for an encoder or container error: an OutputError when the operating
        system refused the write, else a RuntimeError chained to it."""
        cause = os_error_of(err)
        if cause is not None:
            return write_failed(self.path, cause)
        return RuntimeError(f"video encoding failed: {err}")

    def write(self, frames_THWC: np.ndarray) -> None:
        """Queue uint8 `[T, H, W, 3]` frames (a copy is kept; the caller may reuse its buffer)."""
        if frames_THWC.dtype != np.uint8 or frames_THWC.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames must be uint8 [T, {self.height}, {self.width}, 3] "
                             f"(got {frames_THWC.dtype} {frames_THWC.shape})")
        frames = np.array(frames_THWC, copy=True)
        while True:
            if self._error is not None:
                raise self._failure(self._error) from self._error
            try:
                self._queue.put(frames, timeout=0.1)
                break
            except queue.Full:
                continue
        self.frames_written += len(frames)

    def _stop_encoder(self) -> None:
        """Let the encoder thread finish what is queued and end (idempotent)."""
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:  # a failed thread drains the queue; a working one makes room
                continue
        self._thread.join()

    def _close(self, complete: bool) -> None:
        """Stop the encoder thread, flush (if `complete`) and close the container."""
        self._stop_encoder()
        if complete:
            self._container.mux(self._stream.encode())  # flush delayed frames
        self._container.close()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop_encoder()  # first: the last queued frames may still fail to encode
        complete = exc_type is None and self._error is None
        try:
            self._close(complete)
            if complete:
                if self.metadata != self._header_metadata:
                    self._remux_with_metadata()
                os.replace(self._temp, self.path)
                return False
        except Exception as err:  # closing failed: report it unless an earlier error is on its way
            discard_partial(self._temp)
            if exc_type is not None:
                return False
            first = self._error or err
            raise self._failure(first) from first
        except BaseException:
            discard_partial(self._temp)
            raise
        discard_partial(self._temp)
        if exc_type is None:  # the encoder thread failed and nothing else was raised
            raise self._failure(self._error) from self._error
        return False
