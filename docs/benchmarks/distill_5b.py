"""One DMD distillation iteration of the 5B on ONE GPU, random weights: s/iteration and peak memory,
bf16 and NVFP4, one JSON line each.

    python docs/benchmarks/distill_5b.py                       # 704x1280, 32 latent frames, bf16 + nvfp4
    python docs/benchmarks/distill_5b.py --precision bf16 --height 480 --width 832
    python docs/benchmarks/distill_5b.py --device cpu --set preset=tiny --height 64 --width 64   # smoke

An iteration is step 0 of a run, the expensive kind: the generator step (rollout with grad, teacher
with CFG + critic, DMD loss, backward into the LoRA) and the critic step (a second rollout without
grad, the critic's flow loss, backward), then both AdamW steps (`DistillTrainer.iteration`, the
code `longlive distill` runs). The networks are built and prepared as the CLI does
(`build_dit` -> `parallelize_network`: NVFP4 swaps, LoRA r 128 on student and critic, activation
checkpointing), the recipe is `recipes/distill.yaml` / `distill_nvfp4.yaml` with random weights and
random text contexts (no text encoder), batch 1. The exit step is fixed at the last sampler step
(3 no-grad steps, the exit forward and the recache per chunk: the costliest rollout; the official
draws it uniformly). One warm-up iteration (FlexAttention compile, allocator), then `--iterations`
timed ones.

Memory estimate for 704x1280 (44x80 latents, 880 tokens per frame, 28,160 per 32-frame clip), bf16:
three 5.0 B-parameter networks 3 x 10.0 GB = 30 GB; two LoRAs of 322 M parameters with fp32
weights, gradients and AdamW moments 2 x 5.2 GB = 10.3 GB; the generator rollout keeps per chunk
the block inputs of its exit forward (30 x 43 MB, activation checkpointing) and the K/V history of
every layer (2 x 30 x 43 MB per chunk, the recache values plus the exit-step gradient route):
~16 GB for 4 chunks; the score forwards on 28,160 tokens add ~3-5 GB of transients (FFN 807 MB,
FlexAttention block-sparse), the critic's backward its 30 x 173 MB block inputs (5.2 GB). About
65-75 GB: 720p fits on one 141 GB H200 with room to spare, so no smaller resolution is needed.
NVFP4: the student keeps its bf16 master plus W and W^T quantized once (+5.5 GB), the teacher
drops to 2.8 GB of packed weights (-7 GB); the emulated FP4 GEMMs dequantize one weight at a time
(<= 176 MB fp32). Off Blackwell the NVFP4 GEMMs are emulated (dequantize to fp32, fp32 matmul), so
its time is an upper bound, not a Blackwell figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from core.train.ar import TrainPlan  # noqa: E402
from core.train.distill import DistillOptions, DistillTrainer, Networks  # noqa: E402
from core.train.distill_config import load_distill_recipe  # noqa: E402
from longlive_cli.build import build_dit  # noqa: E402
from longlive_cli.distill import network_specs  # noqa: E402
from longlive_cli.parallelize import parallelize_network  # noqa: E402

RECIPES = {"bf16": "distill", "nvfp4": "distill_nvfp4"}
PROMPTS = ["a corgi surfs a wave at sunset", "The scene transitions. the corgi shakes off water on the beach"]


def measure(precision: str, height: int, width: int, frames: int, iterations: int, device: torch.device,
            overrides: list[str]) -> dict:
    recipe = load_distill_recipe(RECIPES[precision], [
        "checkpoints.random_init=true", "data.text_encoder=random", "data.batch_size=1", f"runtime.device={device}",
        f"data.height={height}", f"data.width={width}", f"data.latent_frames={frames}", "dmd.exit_step=3",
        *overrides])
    plan = TrainPlan(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    nets = Networks(**{role.value: parallelize_network(build_dit(spec).model.eval(), role, recipe, plan)
                       for role, spec in network_specs(recipe, device).items()})
    if cuda:
        torch.cuda.synchronize(device)
    build_seconds = time.perf_counter() - started
    weights_gb = torch.cuda.memory_allocated(device) / 1e9 if cuda else None
    with tempfile.TemporaryDirectory() as logdir:
        trainer = DistillTrainer(recipe, DistillOptions(Path(logdir)), plan, lambda: nets)
        trainer.start()
        optimizers = trainer.optimizers(nets)
        chunks = recipe.num_chunks
        items = [[PROMPTS[0]] * (chunks // 2) + [PROMPTS[1]] * (chunks - chunks // 2)]
        warm = time.perf_counter()
        trainer.iteration(0, nets, optimizers, items)  # step 0: generator + critic
        warmup_seconds = time.perf_counter() - warm
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times, record = [], {}
        for _ in range(iterations):
            record = trainer.iteration(0, nets, optimizers, items)
            times.append(record["step_seconds"])
    memory = {"weights_gb": round(weights_gb, 2),
              "peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2),
              "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 1e9, 2),
              "gpu": torch.cuda.get_device_name(device)} if cuda else {"device": str(device)}
    return {"precision": precision, "height": height, "width": width, "latent_frames": frames,
            "tokens": frames * (height // 32) * (width // 32), "exit_step": 3,
            "s_per_iteration": round(min(times), 3), "s_per_iteration_all": [round(t, 3) for t in times],
            "warmup_s": round(warmup_seconds, 1), "build_s": round(build_seconds, 1), **memory,
            "critic_loss": record.get("critic_loss"), "generator_loss": record.get("generator_loss"),
            "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=["bf16", "nvfp4", "both"], default="both")
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--frames", type=int, default=32, help="latent frames of a rollout (a multiple of 8)")
    parser.add_argument("--iterations", type=int, default=1, help="timed iterations after the warm-up")
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="recipe override, e.g. preset=tiny for a smoke run")
    args = parser.parse_args()
    device = torch.device(args.device)
    for precision in (["bf16", "nvfp4"] if args.precision == "both" else [args.precision]):
        try:
            result = measure(precision, args.height, args.width, args.frames, args.iterations, device,
                             args.overrides)
        except torch.cuda.OutOfMemoryError as err:  # reported as a result: the next size down is the answer
            result = {"precision": precision, "height": args.height, "width": args.width,
                      "latent_frames": args.frames, "error": f"out of memory: {str(err).splitlines()[0]}"}
        print(json.dumps(result), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
