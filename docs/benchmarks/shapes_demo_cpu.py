"""CPU time budget of the shapes-world README demo (4 s of 128x128 video), stage by stage, with
random weights at the shipped widths (timings do not depend on the values). Run from the repo root:
    /usr/bin/time -f "%e s wall" python docs/benchmarks/shapes_demo_cpu.py [--threads N]
Stages: imports, text encoder (tiny umt5, one prompt), DiT (the `shapes` preset, 3 chunks of
8 latent frames, 4 steps, the tiny recipe's stream), VAE decode (the `shapes` preset, chunk by
chunk), H.264 write. Prints one line per stage and the total of the stages. The whole command with
trained-shape files: `time longlive generate PROMPT --preset shapes --model-dir DIR`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

started = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from core.config import ModelConfig, StreamConfig, VAEConfig  # noqa: E402
from core.decode import VideoWriter, to_uint8_frames  # noqa: E402
from core.pipeline import generate_latents  # noqa: E402
from core.text import TextEncoder  # noqa: E402
from core.vae import random_vae  # noqa: E402
from longlive_cli.build import DiTSpec, build_dit  # noqa: E402

PROMPT = "a red circle moves left to right on a blue background"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="/tmp/shapes_demo_timing.mp4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times = {"imports": time.perf_counter() - started}

    t = time.perf_counter()
    text = TextEncoder.tiny(seed=0)
    context = text.encode([PROMPT])
    times["text encoder"] = time.perf_counter() - t

    t = time.perf_counter()
    dit = build_dit(DiTSpec(ModelConfig.preset("shapes"), torch.device("cpu"), torch.float32)).model
    stream = StreamConfig(frames_per_block=8, local_window_frames=32, sink_frames=8, sampling_steps=4)
    chunks = 3
    noise = torch.randn(1, chunks * stream.frames_per_block, 48, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = generate_latents(dit, noise, [context] * chunks, stream, [False] * chunks)
    times["DiT (3 chunks x 4 steps)"] = time.perf_counter() - t

    t = time.perf_counter()
    vae = random_vae(VAEConfig.preset("shapes"), 0)
    decoder = vae.streaming_decoder()
    with torch.no_grad():
        pieces = [decoder.decode(latents[:, c * 8:(c + 1) * 8].permute(0, 2, 1, 3, 4)) for c in range(chunks)]
    frames = to_uint8_frames(torch.cat(pieces, dim=2))
    times[f"VAE decode ({frames.shape[0]} frames)"] = time.perf_counter() - t

    t = time.perf_counter()
    with VideoWriter(Path(args.out), 128, 128, fps=24) as writer:
        writer.write(frames.numpy())
    times["H.264 write"] = time.perf_counter() - t

    for name, seconds in times.items():
        print(f"{name:28s} {seconds:6.2f} s")
    print(f"{'total (stages)':28s} {sum(times.values()):6.2f} s with {args.threads} thread(s)")


if __name__ == "__main__":
    main()
