"""Merge a LoRA into a generator file (fp32 merge, saved in the base file's dtype): the warm start
of a progressive distillation (`distill ... --set checkpoints.generator=OUT`, docs/models/shapes.md 5l).

    PYTHONPATH=. python docs/benchmarks/merge_lora.py core/assets/shapes/dit.safetensors \\
        docs/models/shapes/distill_2026-12-06g/lora4_shift1.safetensors gpu_in/dit_s4.safetensors --preset shapes
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from core.checkpoint import read_state_dict, save_generator
from core.config import Recipe
from longlive_cli.build import DiTSpec, build_dit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("lora", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="shapes")
    args = parser.parse_args()
    dtype = next(iter(read_state_dict(args.base).values())).dtype
    recipe = Recipe.preset_recipe(args.preset)
    spec = DiTSpec(recipe.model, torch.device("cpu"), torch.float32, checkpoint=args.base, lora=args.lora)
    model = build_dit(spec).model.to(dtype)
    save_generator(model, args.out, metadata={"source": f"{args.base.name} + {args.lora.name} merged",
                                              "preset": args.preset})
    print(args.out, dtype)


if __name__ == "__main__":
    main()
