"""AR training step time on N GPUs: Balanced vs naive SP layout, bf16 vs NVFP4 numerics.

    torchrun --standalone --nproc-per-node 4 docs/benchmarks/sp_layouts.py --frames 32

5B with random weights, random latents and contexts (no VAE/text encoder: the DiT step alone),
FSDP2 over all ranks (bf16 compute, fp32 reduce), activation checkpointing, AdamW. One step =
forward + backward + optimizer; CUDA events, warm-up steps first, median of the timed steps;
peak memory per GPU. Every configuration runs in this one process group, so they are compared
in the same call. Rank 0 prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from core.config import ModelConfig  # noqa: E402
from longlive_cli.build import DiTSpec, build_dit  # noqa: E402
from longlive_cli.parallelize import checkpoint_blocks  # noqa: E402
from sp.balanced import BalancedLayout, NaiveLayout  # noqa: E402
from sp.fsdp import shard_model  # noqa: E402
from sp.plan import apply_sequence_parallel, balanced_teacher_forcing, naive_teacher_forcing  # noqa: E402


def build(config: ModelConfig, precision: str, device: torch.device):
    model = build_dit(DiTSpec(config, device, torch.float32, seed=0)).model.train()
    if precision == "nvfp4":
        from quant.linear import ar_training_config, quantize_model

        quantize_model(model, ar_training_config())
    return model


def run_config(spec: str, args, config: ModelConfig, device: torch.device, cuda: bool, rank: int, world: int,
               group, fpb: int, latent_h: int, latent_w: int) -> None:
    """Build, shard and time one `layout:precision` configuration; rank 0 prints its JSON line."""
    layout_name, precision = spec.split(":")
    steps = args.nvfp4_steps if precision == "nvfp4" else args.steps
    model = build(config, precision, device)
    if layout_name == "balanced":
        layout = BalancedLayout(world, rank, args.frames, fpb)
        apply_sequence_parallel(model, group, layout)
    else:
        layout = NaiveLayout(world, rank, args.frames, fpb)
    checkpoint_blocks(model)
    shard_model(model, init_device_mesh(device.type, (world,)), torch.bfloat16 if cuda else torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.0, 0.999))
    # Same random sample on every rank (seeded), as an SP group reads one sample.
    g = torch.Generator(device=device).manual_seed(1)
    shape = (1, config.in_channels, args.frames, latent_h, latent_w)
    dtype = torch.bfloat16 if cuda else torch.float32
    clean = torch.randn(shape, generator=g, device=device, dtype=dtype)
    noisy = torch.randn(shape, generator=g, device=device, dtype=dtype)
    target = torch.randn(shape, generator=g, device=device, dtype=dtype)
    t = (torch.rand(1, args.frames // fpb, generator=g, device=device) * 1000).repeat_interleave(fpb, 1)
    chunks = args.frames // fpb
    context = torch.randn(chunks, config.text_len, config.text_dim, generator=g, device=device, dtype=dtype)

    vae = window = video = None
    if args.vae:
        from core.config import VAEConfig
        from core.vae import random_vae
        from sp.vae_halo import encode_rank_window, halo_windows, raw_window

        vae = random_vae(VAEConfig.preset("tiny" if args.preset == "tiny" else "wan2.2"), 0, device=device,
                         dtype=dtype)
        raw = 4 * (args.frames - 1) + 1
        video = torch.rand(1, 3, raw, args.height, args.width, generator=g, device=device, dtype=dtype) * 2 - 1
        # Balanced: the rank's own frames. Naive: the frames of its piece (clean and noisy pieces of the
        # same frames need the same latents), cut the same way over world/2 pieces.
        pieces, piece = (world, rank) if layout_name == "balanced" else (world // 2, rank % (world // 2))
        window = halo_windows(args.frames, raw, pieces, 28)[piece]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if vae is not None:
            with torch.no_grad():
                encode_rank_window(vae, raw_window(video, window), window)
        if layout_name == "balanced":
            v = balanced_teacher_forcing(model, layout, layout.shard(noisy, 2), layout.shard(t, 1),
                                         layout.prompts(context, chunks), layout.shard(clean, 2), fpb)
            loss = (v.float() - layout.shard(target, 2).float()).square().mean()
        else:
            v = naive_teacher_forcing(model, layout, noisy, t, context, clean, group, prompt_chunks=chunks)
            piece = layout.shard(target, 2) if layout.is_noisy else target[:, :, :0]
            loss = (v.float() - piece.float()).square().sum() / max(piece.numel(), 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(steps):
        dist.barrier()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            step()
            times.append(time.perf_counter() - began)
    # A step ends when the slowest rank ends: take the max over ranks of each step's time.
    per_step = torch.tensor(times, device=device)
    dist.all_reduce(per_step, op=dist.ReduceOp.MAX)
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0], device=device)
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(peaks, peak)
    own = torch.tensor(times, device=device)
    owns = [torch.zeros_like(own) for _ in range(world)]
    dist.all_gather(owns, own)
    if rank == 0:
        print(json.dumps({
            "layout": layout_name, "precision": precision, "vae_in_step": bool(args.vae), "gpus": world,
            "frames": args.frames,
            "tokens_per_rank": 2 * args.frames // world * latent_h // 2 * latent_w // 2,
            "step_seconds_median": statistics.median(per_step.tolist()),
            "step_seconds": [round(x, 3) for x in per_step.tolist()],
            "per_rank_median_seconds": [round(statistics.median(o.tolist()), 3) for o in owns],
            "peak_memory_gib_per_gpu": [round(float(p), 2) for p in peaks],
            "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__}), flush=True)
    if cuda:
        torch.cuda.empty_cache()
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--configs", default="balanced:bf16,naive:bf16,balanced:nvfp4")
    parser.add_argument("--nvfp4-steps", type=int, default=2)
    parser.add_argument("--preset", default="wan2.2-ti2v-5b")
    parser.add_argument("--vae", action="store_true",
                        help="Also encode the clip in the step (Wan2.2 VAE, random weights, no grad): each rank "
                             "encodes the raw window its frames need, with the 28-latent causal halo")
    args = parser.parse_args()

    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available()  # CPU/gloo only to smoke-test this script with --preset tiny
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    config = ModelConfig.preset(args.preset)
    fpb = 8
    latent_h, latent_w = args.height // 16, args.width // 16
    group = dist.group.WORLD
    for spec in args.configs.split(","):
        run_config(spec, args, config, device, cuda, rank, world, group, fpb, latent_h, latent_w)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
