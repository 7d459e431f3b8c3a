"""The 5B VAE's streaming decode at 704x1280: one GPU decoding whole frames against the decode split
into spatial bands over the ranks of a torchrun job (`sp/vae_split.py`, exact; the gather of the
bands to rank 0 included). Random bf16 weights, eager (neither path compiled), chunks of 8 latents,
CUDA events on rank 0, one warm-up chunk, median of the rest.

Run from the repo root on the GPU machine (W = 1, 2, 4, 8):
    torchrun --standalone --nproc-per-node W docs/benchmarks/sp_decode.py [--chunks 5]
With W = 1 only the whole-frame decode is timed.
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
from core.vae import random_vae  # noqa: E402
from sp.vae_split import GatheredBandDecoder, band_plans  # noqa: E402

HEIGHT, WIDTH, FRAMES_PER_BLOCK = 44, 80, 8  # latents of 704x1280, one chunk


def timed(decoder, latents: torch.Tensor, chunks: int, collective: bool) -> list[float]:
    """Seconds per chunk; a collective decoder starts every chunk on all ranks together."""
    seconds = []
    with torch.no_grad():
        for c in range(chunks):
            if collective:
                dist.barrier()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            decoder.decode(latents[:, :, c * FRAMES_PER_BLOCK:(c + 1) * FRAMES_PER_BLOCK])
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    vae = random_vae(VAEConfig.preset("wan2.2"), seed=0, device=device, dtype=torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(1, 48, FRAMES_PER_BLOCK * args.chunks, HEIGHT, WIDTH, generator=g, device=device,
                          dtype=torch.bfloat16)
    result = {"ranks": world, "gpu": torch.cuda.get_device_name(device)}
    if rank == 0:
        torch.cuda.reset_peak_memory_stats(device)
    whole = timed(vae.streaming_decoder(), latents, args.chunks, collective=False) if rank == 0 else None
    if rank == 0:
        result["whole_s_per_chunk"] = statistics.median(whole[1:])
        result["whole_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    dist.barrier()
    if world > 1:
        torch.cuda.reset_peak_memory_stats(device)
        split = timed(GatheredBandDecoder(vae, dist.group.WORLD, 0), latents, args.chunks, collective=True)
        plans = band_plans(vae, HEIGHT, WIDTH, world)
        result.update(split_s_per_chunk=statistics.median(split[1:]),
                      split_peak_gib_rank0=torch.cuda.max_memory_allocated(device) / 2**30,
                      bands=[(p.start, p.end) for p in plans], margins=list(plans[0].margins))
        if rank == 0:
            result["speedup"] = result["whole_s_per_chunk"] / result["split_s_per_chunk"]
    if rank == 0:
        print(json.dumps(result, indent=2), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
