"""How fast `core.decode.VideoWriter` (libx264, yuv420p) takes frames at a given size, per content:
`noise` (what a random-weight model decodes to: the worst case for x264) and `smooth` (moving
gradients, closer to a real video), per x264 preset and threading (frame threads: VideoWriter's
default; slice threads: PyAV's). Seconds per 32-frame chunk: the wall time from the first frame
to the closed file over the chunks (the writer encodes on its own thread and x264 buffers frames,
so only the closed file shows the whole cost).

    PYTHONPATH=. python docs/benchmarks/writer_speed.py --height 704 --width 1280 --chunks 4 \
        --preset medium,veryfast --thread-type slice,frame
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from core.decode import VideoWriter


def frames(kind: str, count: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)
    t = np.arange(count)[:, None, None, None] + seed * count
    y = np.arange(height)[None, :, None, None]
    x = np.arange(width)[None, None, :, None]
    c = np.arange(3)[None, None, None, :]
    return (127.5 + 127.5 * np.sin((x + 3 * t) / 40.0 + (y - 2 * t) / 55.0 + c)).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--frames-per-chunk", type=int, default=32)
    parser.add_argument("--content", default="noise,smooth")
    parser.add_argument("--preset", default="medium", help="x264 presets, comma-separated")
    parser.add_argument("--thread-type", default="frame",
                        help="x264's threading, comma-separated: frame (VideoWriter's default) | slice (PyAV's) | auto")
    args = parser.parse_args()
    for kind, preset, thread_type in itertools.product(args.content.split(","), args.preset.split(","),
                                                       args.thread_type.split(",")):
        chunks = [frames(kind, args.frames_per_chunk, args.height, args.width, seed) for seed in range(args.chunks)]
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "w.mp4"
            started = time.perf_counter()
            with VideoWriter(path, args.width, args.height, preset=preset,
                             thread_type=thread_type) as writer:
                for chunk in chunks:
                    writer.write(chunk)
            seconds = (time.perf_counter() - started) / len(chunks)  # to the closed file (x264 buffers frames)
            size = path.stat().st_size
        print(json.dumps({"content": kind, "preset": preset, "thread_type": thread_type,
                          "height": args.height, "width": args.width,
                          "seconds_per_chunk": round(seconds, 4),
                          "fps": round(args.frames_per_chunk / seconds, 1), "bytes": size}),
              flush=True)


if __name__ == "__main__":
    main()
