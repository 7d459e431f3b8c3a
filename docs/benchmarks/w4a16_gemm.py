"""bf16 `F.linear` vs the w4a16 NVFP4 linear at the 5B shapes (one 720p chunk: M = 7040 tokens).

    python docs/benchmarks/w4a16_gemm.py [--tokens 7040] [--reps 50] [--rule mse] [--w4a4]

w4a16 = the Triton dequantize of the packed weight into the model's shared scratch buffer, then
the same cuBLAS bf16 GEMM. Times are medians of CUDA-event spans after a warm-up; "dequant" is
the dequantize kernel alone, "overhead" is w4a16 / bf16 - 1. `--w4a4` adds the emulated NVFP4
GEMM (activation quantization + fp32 matmul of dequantized operands; a numerics reference, not
a fast path).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere in the repo

from cuda_timing import median_ms  # noqa: E402  (this folder is on sys.path when run)

from quant.kernels import dequantize_triton  # noqa: E402
from quant.nvfp4_linear import DequantScratch, NVFP4Linear  # noqa: E402

SHAPES = ((3072, 3072), (14336, 3072), (3072, 14336))  # [N, K]: q/k/v/o, ffn.0, ffn.2



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=7040)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--rule", default="mse")
    parser.add_argument("--w4a4", action="store_true")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.version.__version__}, M = {args.tokens} tokens, "
          f"bf16, rule {args.rule}, median of {args.reps}")
    header = f"{'[N, K]':>14} {'bf16 ms':>9} {'dequant ms':>11} {'w4a16 ms':>9} {'overhead':>9} " \
             f"{'bf16 TFLOP/s':>13} {'weight MB bf16 -> nvfp4':>24}"
    if args.w4a4:
        header += f" {'w4a4-emul ms':>13}"
    print(header)
    scratch = DequantScratch()
    for n, k in SHAPES:
        linear = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16)
        layer = NVFP4Linear.from_linear(linear, rule=args.rule, scratch=scratch)
        x = torch.randn(args.tokens, k, device=device, dtype=torch.bfloat16)
        out = torch.empty(n, k, device=device, dtype=torch.bfloat16)
        packed = layer.packed_weight()
        with torch.no_grad():
            bf16 = median_ms(lambda: F.linear(x, linear.weight, linear.bias), args.reps)  # noqa: B023
            dequant = median_ms(lambda: dequantize_triton(packed, torch.bfloat16, out=out), args.reps)  # noqa: B023
            w4a16 = median_ms(lambda: layer(x), args.reps)  # noqa: B023
            row = (f"{str([n, k]):>14} {bf16:9.3f} {dequant:11.3f} {w4a16:9.3f} {w4a16 / bf16 - 1:9.1%} "
                   f"{2 * args.tokens * n * k / bf16 / 1e9:13.0f} "
                   f"{n * k * 2 / 1e6:10.1f} -> {layer.packed_nbytes / 1e6:9.1f}")
            if args.w4a4:
                layer.mode = "w4a4"
                row += f" {median_ms(lambda: layer(x), max(5, args.reps // 5)):13.3f}"  # noqa: B023
        print(row)


if __name__ == "__main__":
    main()
