"""FP8Linear vs bf16 `F.linear` at the 5B shapes (one 720p chunk: M = 7040 tokens), and whether
torch.compile fuses the per-token activation quantization into the kernels that produce it.

    PYTHONPATH=. python docs/benchmarks/fp8_gemm.py [--tokens 7040] [--reps 50] [--no-block]

Per shape [N, K]: median CUDA-event times (after a warm-up) of bf16 `F.linear`, the eager
FP8Linear (Triton row quantizer + `torch._scaled_mm`) with and without fast accumulation, and its
two parts alone; SQNR (dB) of each output against the fp64 product of the bf16 operands; the
largest |scaled_mm - fp64 product of the quantized operands| / sum |a||b| (the accumulation error,
for tests/test_fp8_gpu.py's tolerances).

Block: one 5B DiT block (random weights, bf16, 7040 tokens attending to a 28160-token window, 512
text slots) compiled with torch.compile, bf16 vs FP8 block linears: median time and the CUDA
kernels of one forward from the profiler. With the quantization fused into its producers, the FP8
block launches about as many kernels as the bf16 one (the extra ones are listed).

Progress goes to stderr; stdout gets one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere in the repo

from cuda_timing import log, median_ms  # noqa: E402  (this folder is on sys.path when run)

from core.config import ModelConfig  # noqa: E402
from core.dit import DiTBlock, random_init_  # noqa: E402
from core.rope import Rope3D, frame_positions  # noqa: E402
from quant.fp8 import FP8Config, FP8Linear, dequantize_rows, quantize_fp8, quantize_rows  # noqa: E402

SHAPES = ((3072, 3072), (14336, 3072), (3072, 14336))  # [N, K]: q/k/v/o, ffn.0, ffn.2




def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref = ref.double()
    return 10 * math.log10(ref.pow(2).sum().item() / (ref - approx.double()).pow(2).sum().item())


def activations(tokens: int, width: int, device) -> torch.Tensor:
    """LayerNorm-like activations with 1 channel in 384 scaled by 100 (trained DiTs' outliers)."""
    g = torch.Generator(device=device).manual_seed(width)
    x = torch.randn(tokens, width, generator=g, device=device)
    x[:, torch.randperm(width, generator=g, device=device)[: width // 384]] *= 100
    return x.to(torch.bfloat16)


def gemm_row(n: int, k: int, tokens: int, reps: int) -> dict:
    device = torch.device("cuda")
    linear = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16)
    x = activations(tokens, k, device)
    exact = x.double() @ linear.weight.double().T + linear.bias.double()
    row = {"shape": [n, k]}
    with torch.no_grad():
        row["bf16_ms"] = median_ms(lambda: F.linear(x, linear.weight, linear.bias), reps)
        row["bf16_sqnr_db"] = sqnr_db(exact, F.linear(x, linear.weight, linear.bias))
        codes, scales = quantize_rows(x)
        a = dequantize_rows(codes, scales, torch.float64)
        row["quantize_ms"] = median_ms(lambda: quantize_rows(x), reps)
        for fast in (True, False):
            layer = FP8Linear.from_linear(linear, fast_accum=fast)
            key = "fast" if fast else "exact_accum"
            row[f"fp8_{key}_ms"] = median_ms(lambda: layer(x), reps)  # noqa: B023
            row[f"scaled_mm_{key}_ms"] = median_ms(lambda: layer._scaled_mm(codes, scales), reps)  # noqa: B023
            out = layer(x)
            row[f"fp8_{key}_sqnr_db"] = sqnr_db(exact, out)
            b = layer.dequantized_weight(torch.float64)
            magnitude = a.abs() @ b.abs().T
            product = a @ b.T + layer.bias.double()
            row[f"accum_error_{key}"] = ((out.double() - product).abs() / magnitude).max().item()
    row["speedup_fast"] = row["bf16_ms"] / row["fp8_fast_ms"]
    row["fp8_tflops_fast"] = 2 * tokens * n * k / row["fp8_fast_ms"] / 1e9
    row["bf16_tflops"] = 2 * tokens * n * k / row["bf16_ms"] / 1e9
    return row


def block_inputs(config: ModelConfig, tokens: int, window: int, device):
    """x, e0, text keys/values, a RoPE table (8 frames of 22 x 40 tokens) and a key/value window."""
    g = torch.Generator(device=device).manual_seed(1)
    frames, height, width = 8, 22, 40
    assert frames * height * width == tokens, "the block run uses 720p chunks (7040 tokens)"
    dim, heads = config.dim, config.num_heads

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device).to(torch.bfloat16)

    rope = Rope3D(config.head_dim, config.rope_theta).table(frame_positions(frames, 24, device=device),
                                                             height, width)
    window_k, window_v = randn(1, window, heads, dim // heads), randn(1, window, heads, dim // heads)
    return randn(1, tokens, dim), randn(1, frames, 6, dim) * 0.1, randn(1, config.text_len, dim), rope, \
        window_k, window_v


def kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.name and "Memset" not in e.name]


def block_rows(tokens: int, window: int, reps: int) -> dict:
    from core.attention import sdpa

    device = torch.device("cuda")
    config = ModelConfig.preset("wan2.2-ti2v-5b")
    x, e0, text, rope, window_k, window_v = block_inputs(config, tokens, window, device)
    result = {}
    for precision in ("bf16", "fp8"):
        block = DiTBlock(config).to(device)
        random_init_(block, seed=0)
        block = block.to(torch.bfloat16).eval()
        if precision == "fp8":
            quantize_fp8(block, FP8Config(exclude=()))  # all 10 linears of a block
        text_kv = block.text_kv(text)

        def attend(q, k, v):  # the chunk against a full window (the cache write is left out)
            return sdpa(q, window_k, window_v)  # noqa: B023

        block.compile(dynamic=False)
        with torch.no_grad():
            forward = lambda: block(x, e0, text_kv, rope, attend)  # noqa: B023, E731
            forward()  # compile
            result[f"{precision}_block_ms"] = median_ms(forward, reps, warmup=3)
            result[f"{precision}_kernels"] = kernel_names(forward)
            if precision == "bf16":
                reference = forward().double()
            else:
                result["fp8_block_sqnr_db"] = sqnr_db(reference, forward())
        log(f"block {precision}: {result[f'{precision}_block_ms']:.3f} ms, "
            f"{len(result[f'{precision}_kernels'])} kernels")
    bf16_kernels = set(result["bf16_kernels"])
    result["fp8_only_kernels"] = sorted({k for k in result["fp8_kernels"] if k not in bf16_kernels})
    result["bf16_kernel_count"] = len(result.pop("bf16_kernels"))
    result["fp8_kernel_count"] = len(result.pop("fp8_kernels"))
    result["block_speedup"] = result["bf16_block_ms"] / result["fp8_block_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=7040)
    parser.add_argument("--window", type=int, default=28160)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--no-block", action="store_true", help="skip the compiled-block part")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens,
            "reps": args.reps}
    log(info)
    rows = []
    for n, k in SHAPES:
        rows.append(gemm_row(n, k, args.tokens, args.reps))
        log({key: round(v, 4) if isinstance(v, float) else v for key, v in rows[-1].items()})
    result = {**info, "gemm": rows}
    if not args.no_block:
        result["block"] = block_rows(args.tokens, args.window, max(5, args.reps // 5))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
