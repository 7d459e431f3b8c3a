"""NVFP4 Triton kernels on the GPU: bit-exactness against the torch reference at the 5B shapes, and
quantise / dequantise throughput next to a plain copy of the same input.

Run from the repo root on the GPU machine:
    python docs/benchmarks/nvfp4_kernels.py [--json OUT.json]

Throughput counts bytes read + written: quantise reads the input (and the noise for stochastic
rounding) and writes codes + scales; dequantise reads codes + scales and writes the output; the
copy reads and writes the input once (`dst.copy_(src)`). Times are CUDA events around 10 back-to-back
calls (host launch latency hidden), after warm-up, median of --iters such samples. The 3072x3072
inputs fit in the 50 MB L2 cache, so both the kernels and the copy run partly from L2 there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cuda_timing import median_ms  # noqa: E402  (this folder is on sys.path when run)

from quant import nvfp4  # noqa: E402
from quant.kernels import dequantize_triton, quantize_triton  # noqa: E402

# 5B shapes: q/k/v/o and FFN weights, one chunk's activations (8 latent frames x 880 tokens), one
# KV-cache slot ([7040 tokens x 24 heads, 128]).
SHAPES = {
    "attn weight [3072,3072]": (3072, 3072),
    "ffn.0 weight [14336,3072]": (14336, 3072),
    "ffn.2 weight [3072,14336]": (3072, 14336),
    "activations [7040,3072]": (7040, 3072),
    "kv slot [168960,128]": (168960, 128),
}


def time_ms(fn, iters: int) -> float:
    """Mean of 10 back-to-back calls, median over `iters` samples, after 5 warm-up calls."""
    return median_ms(fn, iters, warmup=5, calls=10)


def exact(ref: nvfp4.NVFP4Tensor, got: nvfp4.NVFP4Tensor) -> bool:
    return torch.equal(ref.codes, got.codes) and torch.equal(ref.scales.view(torch.uint8), got.scales.view(torch.uint8))


def bench_shape(name: str, shape, iters: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    row_spread = torch.exp(torch.randn(shape[0], 1, generator=gen, device="cuda"))
    x = (torch.randn(shape, generator=gen, device="cuda") * row_spread).bfloat16()
    noise = torch.rand(shape, generator=gen, device="cuda") - 0.5
    amax = x.abs().amax().float()
    n = x.numel()
    packed_bytes = n // 2 + n // 16
    dst = torch.empty_like(x)
    copy_ms = time_ms(lambda: dst.copy_(x), iters)
    copy_gbs = 2 * x.nbytes / copy_ms / 1e6
    rows = []
    for rule, rounding in [("static_6", "nearest"), ("mse", "nearest"), ("mse", "stochastic"), ("abs_max", "nearest")]:
        kw = {"noise": noise} if rounding == "stochastic" else {}
        ref = nvfp4.quantize(x, rule, rounding, **kw)
        got = quantize_triton(x, rule, rounding, amax=amax, **kw)
        ok = exact(ref, got)
        deq_ref = nvfp4.dequantize(ref, torch.bfloat16).view(torch.int16)
        ok_deq = torch.equal(dequantize_triton(got, torch.bfloat16).view(torch.int16), deq_ref)

        def quantize_once(rule=rule, rounding=rounding, kw=kw):
            return quantize_triton(x, rule, rounding, amax=amax, **kw)

        q_ms = time_ms(quantize_once, iters)
        q_bytes = x.nbytes + packed_bytes + (noise.nbytes if rounding == "stochastic" else 0)
        out = torch.empty_like(x)
        d_ms = time_ms(lambda got=got, out=out: dequantize_triton(got, torch.bfloat16, out=out), iters)
        d_bytes = packed_bytes + out.nbytes
        rows.append(
            {
                "shape": name,
                "rule": rule,
                "rounding": rounding,
                "bit_exact": bool(ok and ok_deq),
                "quantize_ms": round(q_ms, 4),
                "quantize_GBps": round(q_bytes / q_ms / 1e6, 1),
                "dequantize_ms": round(d_ms, 4),
                "dequantize_GBps": round(d_bytes / d_ms / 1e6, 1),
                "copy_ms": round(copy_ms, 4),
                "copy_GBps": round(copy_gbs, 1),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    rows = [row for name, shape in SHAPES.items() for row in bench_shape(name, shape, args.iters)]
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    from quant.kernels import triton_available

    if triton_available():
        import triton

        info["triton"] = triton.__version__
    print(json.dumps(info, indent=1))
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))
    print()
    print("| input (bf16) | rule | rounding | bit-exact | quantize GB/s (ms) | dequantize GB/s (ms) | copy GB/s |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['shape']} | {r['rule']} | {r['rounding']} | {r['bit_exact']} | {r['quantize_GBps']} "
            f"({r['quantize_ms']}) | {r['dequantize_GBps']} ({r['dequantize_ms']}) | {r['copy_GBps']} |"
        )
    if not all(r["bit_exact"] for r in rows):
        raise SystemExit("some kernel results differ from the torch reference")


if __name__ == "__main__":
    main()
