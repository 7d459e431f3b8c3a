"""Interactive prompt-switch latency on the 5B (issue 12): Enter to first switched frame.

Random weights of the real shapes: the 5B DiT, the Wan2.2 VAE and umt5-xxl (5.7B, host-resident
as in `generate`, visiting the GPU only while it encodes). A prompt is "typed" when chunk
`--type-at` is about to start; the run decodes synchronously so a chunk's frames are written when
its `on_chunk` fires. Prints one JSON line:

- `encode_on_main_thread_s`: what a switch used to stall the video for (one new prompt encoded on
  the generation thread, median of 3), with the host weights page-locked as a live prompt feed
  holds them on a GPU (`..._pageable_s`: the same from pageable memory; `pin_s`: the one-off page-locking);
- per chunk wall times, the median, and the chunks after the typed prompt (a stall shows there);
- the switch: encode time beside the denoising, the chunk it landed on, and Enter to first
  switched frame written.

    python docs/benchmarks/switch_latency.py --chunks 8 --type-at 3 [--steps 2] [--height 704 --width 1280]
    python docs/benchmarks/switch_latency.py --tiny --height 64 --width 64 --chunks 4 --type-at 2   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from core.config import load_recipe  # noqa: E402
from core.decode import DecodeMode  # noqa: E402
from core.generate import GenerateRequest, Models, Placement, generate_video  # noqa: E402
from core.shots import single_prompt_schedule  # noqa: E402
from core.text import TextEncoder, TextEncoderConfig  # noqa: E402
from core.vae import random_vae  # noqa: E402
from longlive_cli.build import DiTSpec, build_dit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--type-at", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run of this script (tiny preset)")
    args = parser.parse_args()
    tiny = args.tiny
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    recipe = load_recipe(None, [f"video.height={args.height}", f"video.width={args.width}",
                                f"stream.sampling_steps={args.steps}", f"runtime.device={device.type}"],
                         preset="tiny" if tiny else "wan2.2-ti2v-5b")
    started = time.perf_counter()

    def stage(message: str) -> None:  # on stderr as it happens: a run cut off by a timeout shows where it was
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    stage("building the text encoder")
    text = TextEncoder.tiny(device=device) if tiny else TextEncoder.random(
        TextEncoderConfig.preset("umt5-xxl"), init_device=device, init_dtype=torch.bfloat16,
        device=device, dtype=torch.bfloat16)  # drawn on the GPU: CPU sampling of 5.7B values took minutes
    stage("building the DiT and the VAE")
    models = Models(build_dit(DiTSpec.from_recipe(recipe, device, dtype)),
                    random_vae(recipe.vae, 0, device=device, dtype=dtype), text)
    build_s = time.perf_counter() - started
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def encode_seconds(text: TextEncoder, tag: str) -> float:
        times = []
        for i in range(3):
            sync()
            t0 = time.perf_counter()
            text.encode([f"a fresh {tag} prompt number {i}"])
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    stage("encoding from pageable host weights")
    pageable_s = encode_seconds(models.text, "pageable")
    stage("page-locking the host weights")
    t0 = time.perf_counter()  # page-locked, as a live prompt feed holds them (core.interactive.live_prompts)
    models.text.pin_host_memory()
    pin_s = time.perf_counter() - t0
    stage("encoding from page-locked host weights")
    pinned_s = encode_seconds(models.text, "pinned")
    stage(f"generating {args.chunks} chunks, a prompt typed at chunk {args.type_at}")
    fpb = recipe.stream.frames_per_block
    schedule = single_prompt_schedule("a calm sea at dawn", args.chunks, fpb)  # a count of chunks
    with tempfile.TemporaryDirectory() as folder:
        request = GenerateRequest(recipe, schedule, Path(folder) / "switch.mp4", decode=DecodeMode.parse("sync"))
        placement = Placement(device, dtype, device, None, None, None)
        typed: queue.Queue[str] = queue.Queue()
        done_at: dict[int, float] = {}

        def on_chunk(done: int, total: int) -> None:
            done_at[done] = time.perf_counter()
            stage(f"{done}/{total} chunks written")
            if done == args.type_at:
                typed.put("a storm breaks over the sea")

        report = generate_video(request, placement, models, on_chunk,
                                prompt_source=lambda: None if typed.empty() else typed.get(), log=lambda _: None)
    chunk_s = [done_at[i + 1] - done_at[i] for i in range(1, args.chunks) if i + 1 in done_at]
    switch = report.prompt_timings[0] if report.prompt_timings else None
    result = {
        "steps": args.steps, "height": args.height, "width": args.width, "chunks": args.chunks,
        "build_s": round(build_s, 1), "pin_s": round(pin_s, 1), "host_pinned": models.text.host_pinned,
        "encode_on_main_thread_pageable_s": round(pageable_s, 4),
        "encode_on_main_thread_s": round(pinned_s, 4),
        "chunk_s": [round(s, 4) for s in chunk_s], "median_chunk_s": round(statistics.median(chunk_s), 4),
        "chunks_after_typing_s": [round(done_at[i + 1] - done_at[i], 4)
                                  for i in range(args.type_at, args.chunks) if i + 1 in done_at],
        "switch_chunk": None if switch is None else switch.chunk,
        "encode_beside_denoise_s": None if switch is None else round(switch.encode_seconds, 4),
        "enter_to_first_switched_frame_s": None if switch is None or switch.chunk is None
        else round(done_at[switch.chunk + 1] - switch.typed_at, 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
