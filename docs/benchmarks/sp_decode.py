"""The 5B VAE's streaming decode at 704x1280: one GPU decoding whole frames against the decode split
into spatial bands over the ranks of a torchrun job (`sp/vae_split.py`, exact; the gather of the
bands to rank 0 included). Random bf16 weights, eager (neither path compiled), chunks of 8 latents,
CUDA events on rank 0, one warm-up chunk, median of the rest.

Run from the repo root on the GPU machine (W = 1, 2, 4, 8):
    torchrun --standalone --nproc-per-node W docs/benchmarks/sp_decode.py [--chunks 5]
With W = 1 only the whole-frame decode is timed. A CPU check that the script runs (a small random
VAE, gloo, fp32; the timings mean nothing):
    torchrun --standalone --nproc-per-node 2 docs/benchmarks/sp_decode.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

from core.config import VAEConfig  # noqa: E402
from core.runtime import SpanTimer  # noqa: E402
from core.vae import random_vae  # noqa: E402
from sp.vae_split import GatheredBandDecoder, band_plans  # noqa: E402

HEIGHT, WIDTH, FRAMES_PER_BLOCK = 44, 80, 8  # latents of 704x1280, one chunk
SMOKE_VAE, SMOKE_HEIGHT, SMOKE_WIDTH = VAEConfig(base_dim=8, decoder_base_dim=8), 8, 8  # --device cpu


def timed(decoder, latents: torch.Tensor, chunks: int, collective: bool) -> list[float]:
    """Seconds per chunk; a collective decoder starts every chunk on all ranks together."""
    timer = SpanTimer(latents.device)
    with torch.no_grad():
        for c in range(chunks):
            if collective:
                dist.barrier()
            timer.start()
            decoder.decode(latents[:, :, c * FRAMES_PER_BLOCK:(c + 1) * FRAMES_PER_BLOCK])
            timer.stop()
            timer.durations()  # waits for the chunk: the next one starts together on every rank
    return timer.durations()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=5)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        config, height, width, dtype = VAEConfig.preset("wan2.2"), HEIGHT, WIDTH, torch.bfloat16
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        config, height, width, dtype = SMOKE_VAE, SMOKE_HEIGHT, SMOKE_WIDTH, torch.float32
    vae = random_vae(config, seed=0, device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(1, 48, FRAMES_PER_BLOCK * args.chunks, height, width, generator=g, device=device,
                          dtype=dtype)
    result = measure(vae, latents, args.chunks, height, width)
    if dist.get_rank() == 0:
        result["device"] = torch.cuda.get_device_name(device) if cuda else "cpu"
        print(json.dumps(result, indent=2), flush=True)
    dist.destroy_process_group()


def peak_gib(device: torch.device, reset: bool = False) -> float | None:
    if device.type != "cuda":
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def measure(vae, latents: torch.Tensor, chunks: int, height: int, width: int) -> dict:
    """Rank 0 decodes whole frames alone; then every rank decodes its band (gathered on rank 0)."""
    rank, world, device = dist.get_rank(), dist.get_world_size(), latents.device
    result = {"ranks": world}
    if rank == 0:
        peak_gib(device, reset=True)
        result["whole_s_per_chunk"] = statistics.median(timed(vae.streaming_decoder(), latents, chunks, False)[1:])
        result["whole_peak_gib"] = peak_gib(device)
    dist.barrier()
    if world > 1:
        peak_gib(device, reset=True)
        split = timed(GatheredBandDecoder(vae, dist.group.WORLD, 0), latents, chunks, collective=True)
        plans = band_plans(vae, height, width, world)
        result.update(split_s_per_chunk=statistics.median(split[1:]), split_peak_gib_rank0=peak_gib(device),
                      bands=[(p.start, p.end) for p in plans], margins=list(plans[0].margins))
        if rank == 0:
            result["speedup"] = result["whole_s_per_chunk"] / result["split_s_per_chunk"]
    return result


if __name__ == "__main__":
    main()
