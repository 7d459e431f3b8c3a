"""Write a progressive student as one LoRA file for `--lora`: the adapters of a chain of
distillations (e.g. a 2-step LoRA distilled on the shipped generator with a 4-step LoRA merged,
`distill ... --set checkpoints.generator=MERGED`) stacked along the rank, which adds up to the
same weights exactly (`core.train.lora.stack_loras`). The file records the last LoRA's sampling
steps (and timestep shift, where recorded), so it samples as that student was distilled.

    PYTHONPATH=. python docs/benchmarks/stack_loras.py OUT.safetensors FIRST.safetensors SECOND.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

from core.checkpoint import read_lora_sampling, read_lora_state_dict
from core.train.lora import save_lora_file, stack_loras


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("loras", type=Path, nargs="+", help="in the order they were trained")
    parser.add_argument("--timestep-shift", type=float, default=None,
                        help="record this shift (the last LoRA's stream.timestep_shift) where its file does not: "
                             "files exported before 2026-12-06's eighth session record only the steps")
    args = parser.parse_args()
    recorded = read_lora_sampling(args.loras[-1])
    if "sampling_steps" not in recorded:
        raise SystemExit(f"{args.loras[-1]} records no sampling steps: give the last LoRA a distill export")
    stacked = stack_loras(*(read_lora_state_dict(path) for path in args.loras))
    rank = next(v.shape[0] for k, v in stacked.items() if ".lora_A." in k)
    if args.timestep_shift is not None:
        recorded["timestep_shift"] = args.timestep_shift
    metadata = {"source": "stack_loras: " + " + ".join(path.name for path in args.loras), "rank": rank, **recorded}
    save_lora_file(stacked, args.out, step=0, metadata=metadata)
    print(args.out, rank, metadata)


if __name__ == "__main__":
    main()
