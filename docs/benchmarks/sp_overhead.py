"""The SP inference code path at sp = 1 against the plain path, one GPU, one call (issue 13).

Both paths stream the same 5B (random bf16 weights, compiled blocks as `longlive bench` does) at
704x1280 through `core.benchmark.run_benchmark` (CUDA events at chunk boundaries, median s/block
over the steady chunks). The SP path is the plan a parallel run applies (`sp.inference.
apply_inference_sp` over a one-rank NCCL group: the `chunk_frames` seam, the head-sharded cache
storage); the plain path is the same model with the plan removed. The paths alternate for
`--rounds` rounds after one discarded warm-up round of each (compilation); the verdict is the
ratio of the medians of the per-round medians, which must be <= 1.02.

Run from the repo root on the GPU machine (one GPU, about 10 minutes with compilation):
    python docs/benchmarks/sp_overhead.py [--frames 96] [--rounds 3] [--steps 4] [--no-compile]
A CPU check that the script runs (tiny model, gloo; the timings mean nothing):
    python docs/benchmarks/sp_overhead.py --device cpu --preset tiny --height 64 --width 64 --frames 48 \
        --rounds 1 --steps 2 --no-compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

from core.benchmark import run_benchmark  # noqa: E402
from core.config import Recipe, overlay  # noqa: E402
from longlive_cli.build import DiTSpec, build_dit  # noqa: E402
from sp.inference import apply_inference_sp, remove_inference_sp  # noqa: E402
from sp.mesh import InferenceMesh  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=96, help="latent frames per run (window fill + 8 chunks)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--preset", default="wan2.2-ti2v-5b")
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run (gloo, fp32)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{Path(folder) / 'store'}", rank=0,
                                world_size=1, device_id=device if cuda else None)
        try:
            run(args, device)
        finally:
            dist.destroy_process_group()


def run(args, device: torch.device) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    recipe = overlay(Recipe.preset_recipe(args.preset), {
        "video": {"height": args.height, "width": args.width}, "stream": {"sampling_steps": args.steps},
        "runtime": {"device": device.type, "dtype": str(dtype).removeprefix("torch.")}})
    plain = build_dit(DiTSpec.from_recipe(recipe, device, dtype, compile=not args.no_compile))
    mesh = InferenceMesh.build(sp=1)
    timings: dict[str, list[float]] = {"plain": [], "sp1": []}
    for round_index in range(args.rounds + 1):
        for path in ("plain", "sp1"):
            remove_inference_sp(plain.model)
            dit = plain if path == "plain" else apply_inference_sp(plain, mesh.sp_group)
            result = run_benchmark(recipe, dit, args.frames)
            if round_index > 0:  # round 0 compiles both paths
                timings[path].append(result.seconds_per_block)
            print(f"round {round_index} {path}: {result.seconds_per_block:.4f} s/block "
                  f"({result.steady_chunks} steady chunks)", flush=True)
    medians = {path: statistics.median(values) for path, values in timings.items()}
    ratio = medians["sp1"] / medians["plain"]
    print(json.dumps({"plain_s_per_block": medians["plain"], "sp1_s_per_block": medians["sp1"], "ratio": ratio,
                      "rounds": timings, "frames": args.frames, "steps": args.steps,
                      "compiled": not args.no_compile, "preset": args.preset, "size": [args.height, args.width],
                      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
                     indent=2))
    print(f"SP path at sp = 1 costs {100 * (ratio - 1):+.2f} % over the plain path: "
          f"{'PASS' if ratio <= 1.02 else 'FAIL'} (limit +2 %)")


if __name__ == "__main__":
    main()
