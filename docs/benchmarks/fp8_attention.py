"""FP8 attention backends vs bf16 SDPA at the 5B shapes on one GPU: error and speed.

    ../shared/tools/gpu-prep.sh nvidia-cudnn-frontend==1.23.0 fa3-fwd==0.0.3        (here, once)
    source .whl/env.sh && python docs/benchmarks/fp8_attention.py [--reps 20] [--error-queries 1024]

One 720p chunk: 7040 query tokens (8 frames of 880) against the 28160-token window (32 frames),
24 heads of 128, batch 1 (4 · 7040 · 28160 · 128 · 24 = 2.44 TFLOP per call). Inputs from
`quant.fp8_attention.attention_inputs`: random, sink-heavy (90 % of each query's mass on the first
8 frames), sink-heavy with logit std 2.5.

Per input kind:
  bf16     `core.attention.sdpa` under each SDPA backend (auto, cudnn, flash): median ms, TFLOP/s,
           SQNR (dB) against fp64 attention on the first `--error-queries` queries (all keys)
  cudnn    (nvidia-cudnn-frontend, per-tensor scales, FP8 output) with scale_s 448 and 64
  fa3      (fa3-fwd, per-head descales, bf16 output)
           FP8 backends: median ms of the kernel on pre-quantized inputs ("kernel_ms") and with the
           Q/K/V quantization of every call ("call_ms"); SQNR against fp64; SQNR against
           `fp8_attention_reference` with the backend's numerics ("model_sqnr_db": how well the
           CPU study's model describes the kernel; high = the model's error figures carry over).
A backend whose package is missing is reported with its one-line error and skipped. Progress on
stderr, one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere in the repo

from cuda_timing import log, median_ms  # noqa: E402  (this folder is on sys.path when run)

from core.attention import sdpa, sdpa_backend  # noqa: E402
from core.errors import UserError  # noqa: E402
from quant.fp8_attention import (  # noqa: E402
    BACKENDS,
    FP8AttentionNumerics,
    attention_inputs,
    exact_attention,
    fp8_attention,
    fp8_attention_reference,
    quantize_qkv,
    sqnr_db,
)

TOKENS_PER_FRAME, HEADS, HEAD_DIM = 880, 24, 128
QUERIES, KEYS, SINK = 8 * TOKENS_PER_FRAME, 32 * TOKENS_PER_FRAME, 8 * TOKENS_PER_FRAME
FLOP = 4 * QUERIES * KEYS * HEAD_DIM * HEADS
INPUTS = {
    "random": dict(),
    "sink 90%": dict(sink_tokens=SINK, sink_mass=0.9),
    "sink 90%, std 2.5": dict(logit_std=2.5, sink_tokens=SINK, sink_mass=0.9),
}




def exact_subset(q, k, v, queries: int) -> torch.Tensor:
    """fp64 attention of the first `queries` queries, one head at a time (memory)."""
    return torch.cat([exact_attention(q[:, :queries, h:h + 1], k[:, :, h:h + 1], v[:, :, h:h + 1])
                      for h in range(q.shape[2])], dim=2)


def bf16_rows(q, k, v, exact, queries: int, reps: int) -> dict:
    rows = {}
    for name in ("auto", "cudnn", "flash"):
        try:
            with sdpa_backend(name), torch.no_grad():
                ms = median_ms(lambda: sdpa(q, k, v), reps, warmup=3)
                error = sqnr_db(exact, sdpa(q[:, :queries], k, v))
            rows[name] = {"ms": ms, "tflops": FLOP / ms / 1e9, "sqnr_db": error}
        except RuntimeError as err:  # a backend that rejects the shapes
            rows[name] = {"error": str(err).splitlines()[0]}
        log(f"  bf16 {name}: {rows[name]}")
    return rows


def fp8_row(attention, numerics: FP8AttentionNumerics, q, k, v, exact, queries: int, reps: int) -> dict:
    quantized = [quantize_qkv(t, attention.scaling) for t in (q, k, v)]
    with torch.no_grad():
        kernel_ms = median_ms(lambda: attention.attend_quantized(*quantized), reps, warmup=3)
        call_ms = median_ms(lambda: attention(q, k, v), reps, warmup=3)
        out = attention(q[:, :queries], k, v)
        model = fp8_attention_reference(q[:, :queries], k, v, numerics)
    return {"kernel_ms": kernel_ms, "call_ms": call_ms, "tflops": FLOP / kernel_ms / 1e9,
            "sqnr_db": sqnr_db(exact, out), "model_sqnr_db": sqnr_db(model, out),
            "model_vs_exact_db": sqnr_db(exact, model)}


def backends() -> dict:
    """name -> (attention, numerics) for every loadable backend, or name -> error line."""
    found = {}
    for name, scale in (("cudnn", 448.0), ("cudnn", 64.0), ("fa3", None)):
        label = f"{name} scale_s {scale:g}" if scale else name
        try:
            attention = fp8_attention(name, scale_s=scale) if scale else fp8_attention(name)
            numerics = BACKENDS[name].numerics
            if scale:
                numerics = FP8AttentionNumerics(numerics.qkv_scaling, "fixed", scale)
            found[label] = (attention, numerics)
        except (UserError, RuntimeError) as err:
            found[label] = str(err).splitlines()[0]
        log(f"{label}: {'ready' if isinstance(found[label], tuple) else found[label]}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--error-queries", type=int, default=1024)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    device = torch.device("cuda")
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cudnn_backend": torch.backends.cudnn.version(), "shape": [1, QUERIES, KEYS, HEADS, HEAD_DIM],
            "tflop_per_call": FLOP / 1e12}
    log(info)
    available = backends()
    results = {}
    for kind, options in INPUTS.items():
        log(f"== {kind}")
        q, k, v = attention_inputs(QUERIES, KEYS, HEADS, HEAD_DIM, seed=0, device=device, **options)
        exact = exact_subset(q, k, v, args.error_queries)
        row = {"bf16": bf16_rows(q, k, v, exact, args.error_queries, args.reps)}
        for label, backend in available.items():
            if isinstance(backend, str):
                row[label] = {"error": backend}
                continue
            try:
                row[label] = fp8_row(*backend, q, k, v, exact, args.error_queries, args.reps)
            except Exception as err:  # noqa: BLE001 (a benchmark reports every backend's failure and goes on)
                row[label] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
            log(f"  {label}: {row[label]}")
        results[kind] = row
        del q, k, v, exact
        torch.cuda.empty_cache()
    print(json.dumps({**info, "results": results, "notes": {
        "sqnr": "dB against fp64 attention of the same bf16 inputs, first error-queries queries",
        "nvfp4_kv_cpu_study": "see docs/fp8.md for the NVFP4 KV cache on the same input kinds"}}))


if __name__ == "__main__":
    main()
