"""FP8 attention numerics on the CPU: which Q/K/V and probability scaling to use, and whether any
beats the NVFP4 KV cache's error (the bar for making `--attention fp8` a default, issue 12).

    PYTHONPATH=. python docs/benchmarks/fp8_attention_study.py [--queries 128] [--heads 2] [--seeds 0]

The 5B's streaming self-attention at 720p: a chunk's queries against a 32-frame window of 28160
keys (880 per frame), the first 8 frames (7040 keys) the sink, head size 128; a subset of the
chunk's queries (errors are per-element statistics). Inputs from `quant.fp8_attention.
attention_inputs`: random, peakier (logit std 2.5), sink-heavy (90 % / 99 % of each query's mass
on the sink), and keys with a +6 offset on 2 of 128 channels. Every figure is the SQNR (dB) of
the output against fp64 attention of the same bf16 inputs. Columns:
  bf16 sdpa      torch SDPA on the bf16 inputs (the CPU kernel; the GPU script measures cuDNN/flash)
  nvfp4 kv       the NVFP4 KV cache (quant.kv.FrameSlots, rule mse, keys centred per frame slot):
                 history keys/values quantized, the current chunk's (last 7040) exact, fp32 math
  qkv only       E4M3 Q/K/V per head, P exact           (the operand part of the error)
  cudnn          per-tensor Q/K/V, P · 448 fixed
  fa3            per-head Q/K/V, P · 256 fixed (FA3's max offset 8)
  head+blockP    per-head Q/K/V, P scaled per (row, 128-key block)
  block+blockP   Q/K/V per 128-token block of a head, P per (row, key block)

Second table: whole streaming runs of the tiny model (random weights, 4 chunks of 2 frames, 4
steps), latents SQNR against the fp32 run, for the NVFP4 KV cache and for FP8 self-attention
(the reference above in place of the cache's SDPA; cross-attention stays exact).

Prints the two markdown tables (means over seeds) and one JSON line with every value.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere in the repo

from quant.fp8_attention import (  # noqa: E402
    FP8AttentionNumerics,
    attention_inputs,
    exact_attention,
    fp8_attention_reference,
    sqnr_db,
)
from quant.kv import FrameSlots, WindowBuffer, nvfp4_storage  # noqa: E402

TOKENS_PER_FRAME = 880
WINDOW = 32 * TOKENS_PER_FRAME
SINK = 8 * TOKENS_PER_FRAME
CHUNK = 8 * TOKENS_PER_FRAME
INPUTS = {
    "random": dict(logit_std=1.0),
    "peaky (std 2.5)": dict(logit_std=2.5),
    "sink 90%": dict(sink_tokens=SINK, sink_mass=0.9),
    "sink 90%, std 2.5": dict(logit_std=2.5, sink_tokens=SINK, sink_mass=0.9),
    "sink 99%": dict(sink_tokens=SINK, sink_mass=0.99),
    "key offsets 6σ": dict(key_offset=6.0),
}
RECIPES = {
    "qkv only": FP8AttentionNumerics("head", "none"),
    "cudnn": FP8AttentionNumerics("tensor", "fixed", 448.0),
    "fa3": FP8AttentionNumerics("head", "fixed", 256.0),
    "head+blockP": FP8AttentionNumerics("head", "block"),
    "block+blockP": FP8AttentionNumerics("block", "block"),
}


def nvfp4_kv(x_BLND: torch.Tensor, centred: bool) -> torch.Tensor:
    """The cache's view of keys or values: history through NVFP4 frame slots, the chunk exact."""
    batch, length, heads, head_dim = x_BLND.shape
    history = length - CHUNK
    slots = FrameSlots(batch, history, heads, head_dim, TOKENS_PER_FRAME, "mse", centred, x_BLND.device)
    slots.write(x_BLND[:, :history], 0)
    out = x_BLND.float().clone()
    slots.dequantize_into(out, history)
    return out


def measure(queries: int, heads: int, seed: int, inputs: dict) -> dict:
    q, k, v = attention_inputs(queries, WINDOW, heads, seed=seed, **inputs)
    exact = exact_attention(q, k, v)
    row = {"bf16 sdpa": sqnr_db(exact, F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2))}
    row["nvfp4 kv"] = sqnr_db(exact, exact_attention(q.float(), nvfp4_kv(k, True), nvfp4_kv(v, False)))
    for name, numerics in RECIPES.items():
        row[name] = sqnr_db(exact, fp8_attention_reference(q, k, v, numerics))
    weights = torch.softmax(q.double().transpose(1, 2) @ k.double().transpose(1, 2).transpose(-1, -2)
                            / 128**0.5, dim=-1)
    row["sink mass"] = weights[..., :SINK].sum(-1).mean().item()
    return row


@contextlib.contextmanager
def cache_attention(numerics: FP8AttentionNumerics):
    """The KV cache's SDPA replaced by the FP8 reference (core has no attention hook yet)."""
    import core.kv_cache

    original = core.kv_cache.sdpa
    core.kv_cache.sdpa = lambda q, k, v, mask=None: fp8_attention_reference(q, k, v, numerics).to(q.dtype)
    try:
        yield
    finally:
        core.kv_cache.sdpa = original


def streaming(seed: int) -> dict:
    from core.config import StreamConfig
    from core.pipeline import generate_latents
    from tests.conftest import SMALL_STREAM, tiny_model
    from tests.test_pipeline import inputs

    noise, contexts = inputs(frames=8, seed=seed)
    stream = StreamConfig(**SMALL_STREAM)
    reference = generate_latents(tiny_model(seed), noise, contexts, stream)
    window = WindowBuffer()
    nvfp4 = generate_latents(tiny_model(seed), noise, contexts, stream,
                             kv_storage=nvfp4_storage("mse", window))
    row = {"nvfp4 kv": sqnr_db(reference, nvfp4)}
    for name in ("cudnn", "fa3", "head+blockP"):
        with cache_attention(RECIPES[name]):
            row[name] = sqnr_db(reference, generate_latents(tiny_model(seed), noise, contexts, stream))
    return row


def print_table(results: dict) -> None:
    columns = list(next(iter(results.values()))[0])
    print("| inputs | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for name, rows in results.items():
        means = [sum(r[c] for r in rows) / len(rows) for c in columns]
        print(f"| {name} | " + " | ".join(f"{m:.2f}" for m in means) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {name: [measure(args.queries, args.heads, seed, inputs) for seed in args.seeds]
               for name, inputs in INPUTS.items()}
    print_table(results)
    print()
    runs = {"tiny streaming run": [streaming(seed) for seed in args.seeds]}
    print_table(runs)
    print(json.dumps({"queries": args.queries, "heads": args.heads, "seeds": args.seeds, "keys": WINDOW,
                      "results": results, "streaming": runs["tiny streaming run"]}))


if __name__ == "__main__":
    main()
