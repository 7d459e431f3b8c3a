"""Wan2.2 VAE streaming decode, old path vs new path, in one run: seconds per 8-latent (32-frame)
chunk at 720p in bf16, peak memory, and how far the new outputs are from the old ones.

    PYTHONPATH=. python docs/benchmarks/vae_decode.py --profile    # old,new,new-512M,new-512M-cl,new-compiled
    PYTHONPATH=. python docs/benchmarks/vae_decode.py --flops --variants old,new,new-nosub   # FLOPs per stage, no GPU
    PYTHONPATH=. python docs/benchmarks/vae_decode.py --variants old,new-compiled-512M-cl,new-compiled-cl
    PYTHONPATH=. python docs/benchmarks/vae_decode.py --device cpu --preset tiny --height 128 --width 128 \\
        --chunks 2 --variants old,new                                   # CPU smoke run / the README demo's VAE

Variants (name = path[-option...]):
  old            the official per-latent loop, op for op (`PER_LATENT_PLAN`), eager
  new            the cell decoder, `DecodePlan()` defaults (4-latent cells, 64 MiB slices, sub-pixel
                 upsampling), eager
  ...-compiled   `core.optimize.compile_vae_decoder` (inductor); compiling happens in the first chunk;
                 channels-first here unless -cl (`generate` / `bench` compile channels-last on a GPU)
  ...-maxat      with -compiled: mode "max-autotune-no-cudagraphs" (as the official LLV2_COMPILE_VAE; slow to compile)
  ...-cl         `core.optimize.channels_last_vae_decoder` (channels-last weights and activations)
  ...-cudnnbench torch.backends.cudnn.benchmark = True
  ...-taps       `core.optimize.frame_taps_vae_decoder` (each temporal conv as per-tap 2-D convs)
  ...-stack      the same with `stacked=True` (one 2-D conv over the taps stacked into channels)
  ...-k8 / -32M / -64M / -128M / -256M / -512M / -1G / -nocap / -nosub   latents_per_cell=8 / slice_bytes 32 MiB, 64 MiB
                 (the default), 128 MiB, 256 MiB (the default before 2026-12-06), 512 MiB, 1 GiB, None /
                 subpixel_upsample=False
  ...-noring     ring_past=False (compiled one-frame steps build a padded input per step, as before 2026-12-07)
  ...-convhead   with -compiled-cl: the head stays cuDNN's conv (`tap_products=False`; before 2026-12-07's
                 `TapProductsConv3d` head)
  ...-sdpa       with -compiled-cl: the middle attention stays SDPA (`matmul_attention=False`; before
                 2026-12-07's `MatmulAttentionBlock`)
  ...-gathertaps with -compiled: ring steps gather their rotation of the taps every step (`ring_taps_max_bytes=0`,
                 no `CausalConv3d.freeze_ring_taps`; before 2026-12-08)
One JSON line per variant (after a line of text): the first chunk (includes compilation and cuDNN
set-up) and the median of the later ones, timed with CUDA events; `peak_gib` is
torch.cuda.max_memory_allocated over the variant's whole run (weights included: `weights_gib`), and
`steady_peak_gib` over the chunks after the first (no compilation);
`max_abs_diff_vs_old` / `rms_diff_vs_old` compare every decoded frame with the `old` variant's (bf16
outputs, so the bf16 rounding of two different op orders: compare with `max_abs_old`). Random weights and latents
(times do not depend on the values); each variant builds its own model, so settings do not leak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.benchmark import cuda_kernel_events, kernel_table
from core.optimize import RING_TAPS_MAX_BYTES, channels_last_vae_decoder, compile_vae_decoder, frame_taps_vae_decoder
from core.vae import PER_LATENT_PLAN, DecodePlan, VAEConfig, WanVAE, random_vae

DEFAULT_VARIANTS = "old,new,new-512M,new-512M-cl,new-compiled"
PLAN_OPTIONS = {"k8": {"latents_per_cell": 8}, "32M": {"slice_bytes": 2**25}, "64M": {"slice_bytes": 2**26},
                "128M": {"slice_bytes": 2**27},
                "256M": {"slice_bytes": 2**28}, "512M": {"slice_bytes": 2**29}, "1G": {"slice_bytes": 2**30},
                "nocap": {"slice_bytes": None}, "nosub": {"subpixel_upsample": False},
                "noring": {"ring_past": False}}
OPTIONS = {"compiled", "maxat", "cl", "cudnnbench", "taps", "stack", "convhead", "sdpa", "gathertaps", *PLAN_OPTIONS}


def parse_variant(name: str) -> tuple[DecodePlan, set[str]]:
    path, *options = name.split("-")
    unknown = [o for o in options if o not in OPTIONS]
    if path not in ("old", "new") or unknown:
        raise SystemExit(f"unknown variant {name!r}: old|new followed by -option, options {sorted(OPTIONS)}")
    if path == "old":
        return PER_LATENT_PLAN, set(options)
    fields: dict = {}
    for option in options:
        fields.update(PLAN_OPTIONS.get(option, {}))
    return DecodePlan(**fields), set(options)


def chunk_flops(config: VAEConfig, plan: DecodePlan, latents_per_chunk: int, h: int, w: int) -> tuple[float, dict]:
    """TFLOP of one later chunk and TFLOP per decoder stage (conv1, middle.i, upsamples.i; what is
    left is the head), counted on `meta` (no memory, no device time)."""
    with torch.device("meta"):
        model = WanVAE(config).to(torch.bfloat16).requires_grad_(False)
    latents = torch.empty(1, config.z_dim, 2 * latents_per_chunk, h, w, device="meta", dtype=torch.bfloat16)
    decoder = model.streaming_decoder(plan)
    with torch.no_grad():
        decoder.decode(latents[:, :, :latents_per_chunk])
        with FlopCounterMode(display=False, depth=3) as counter:
            decoder.decode(latents[:, :, latents_per_chunk:])
    total = counter.get_total_flops() / 1e12
    stages = {name.removeprefix("Decoder."): round(sum(c.values()) / 1e12, 2)
              for name, c in counter.get_flop_counts().items()
              if name.startswith("Decoder.") and name not in ("Decoder.middle", "Decoder.upsamples")
              and name.count(".") <= 2}
    stages["rest (head)"] = round(total - sum(stages.values()), 2)
    return total, stages


class Timer:
    """CUDA events on a GPU, the host clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def measure(self, into: list[float]):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            end.synchronize()
            into.append(start.elapsed_time(end) / 1000)
        else:
            started = time.perf_counter()
            yield
            into.append(time.perf_counter() - started)


def run_variant(name: str, args, latents: torch.Tensor, reference: list[torch.Tensor] | None) -> tuple[dict, list]:
    plan, options = parse_variant(name)
    device = latents.device
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = "cudnnbench" in options
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    vae = random_vae(VAEConfig.preset(args.preset), seed=0, device=device, dtype=latents.dtype)
    weights_gib = sum(p.numel() * p.element_size() for p in vae.parameters()) / 2**30
    if "cl" in options:  # (compiled: compile_vae_decoder below applies it)
        channels_last_vae_decoder(vae)
    if "taps" in options or "stack" in options:
        frame_taps_vae_decoder(vae, stacked="stack" in options)
    if "compiled" in options:
        torch._dynamo.reset()  # each compiled variant compiles from scratch (and within the recompile limit)
        compile_vae_decoder(vae, mode="max-autotune-no-cudagraphs" if "maxat" in options else None,
                            channels_last="cl" in options,  # -cl explicit, as for the eager variants
                            tap_products=None if "convhead" not in options else False,  # -convhead: cuDNN's head
                            matmul_attention=None if "sdpa" not in options else False,  # -sdpa: SDPA's kernel
                            ring_taps_max_bytes=0 if "gathertaps" in options else RING_TAPS_MAX_BYTES)
    decoder, timer = vae.streaming_decoder(plan), Timer(device)
    seconds: list[float] = []
    outputs = []
    with torch.no_grad():
        for chunk in latents.split(args.latents_per_chunk, dim=2):
            with timer.measure(seconds):
                frames = decoder.decode(chunk)
            outputs.append(frames.cpu())  # off the device: the next chunks' peak stays the decoder's own
            del frames
            if cuda and len(seconds) == 1:  # the first chunk compiles (and inductor benchmarks its choices)
                first_peak = torch.cuda.max_memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
    result = {
        "variant": name, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": str(latents.dtype).split(".")[-1], "height": args.height, "width": args.width,
        "latents_per_chunk": args.latents_per_chunk, "frames_per_chunk": outputs[-1].shape[2],
        "plan": {"latents_per_cell": plan.latents_per_cell, "slice_bytes": plan.slice_bytes,
                 "subpixel_upsample": plan.subpixel_upsample, "ring_past": plan.ring_past},
        "compiled": ("max-autotune" if "maxat" in options else True) if "compiled" in options else False,
        "channels_last": "cl" in options, "frame_taps": "stack" if "stack" in options else "taps" in options,
        "head": type(vae.decoder.head[-1]).__name__, "attention": type(vae.decoder.middle[1]).__name__,
        "cudnn_benchmark": "cudnnbench" in options,
        "first_chunk_s": round(seconds[0], 4),
        "seconds_per_chunk": round(statistics.median(seconds[1:]), 4),
        "min_s": round(min(seconds[1:]), 4), "max_s": round(max(seconds[1:]), 4), "chunks_timed": len(seconds) - 1,
        "peak_gib": round(max(first_peak, torch.cuda.max_memory_allocated(device)) / 2**30, 3) if cuda else None,
        "steady_peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None,
        "weights_gib": round(weights_gib, 3),
    }
    result["fps"] = round(result["frames_per_chunk"] / result["seconds_per_chunk"], 2)
    if reference is not None:
        result.update(compare(outputs, reference, device))
    if args.profile and name == args.profile_variant and cuda:
        profile_chunk(decoder, latents[:, :, -args.latents_per_chunk:], args.profile_rows)
    del decoder, vae
    torch.backends.cudnn.benchmark = False
    return result, outputs


def compare(outputs: list[torch.Tensor], reference: list[torch.Tensor], device: torch.device) -> dict:
    """max and RMS |difference| over every frame, and the largest reference value."""
    worst = squares = count = largest = 0.0
    for out, ref in zip(outputs, reference, strict=True):
        diff = out.to(device).float() - ref.to(device).float()
        worst, largest = max(worst, diff.abs().max().item()), max(largest, ref.abs().max().item())
        squares, count = squares + diff.pow(2).sum().item(), count + diff.numel()
    return {"max_abs_diff_vs_old": worst, "rms_diff_vs_old": (squares / count) ** 0.5, "max_abs_old": largest}


def profile_chunk(decoder, chunk: torch.Tensor, rows: int = 25) -> None:
    """The kernels of one more (steady-state) chunk, by total device time."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.no_grad(), torch.profiler.profile(activities=activities) as prof:
        decoder.decode(chunk)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=90),
          flush=True)
    events = cuda_kernel_events(prof)
    kernels = kernel_table(events, top=len(events))
    print(json.dumps({"kernel_classes": kernel_classes(kernels), "kernels": kernels[:rows]}), flush=True)


KERNEL_CLASSES = (  # (class, substrings of the kernel name), first match wins
    ("cudnn convolution", ("fprop", "implicit_gemm", "conv2d", "conv3d", "winograd")),
    ("cudnn layout transpose", ("nchwToNhwc", "nhwcToNchw")),
    ("inductor bias / layout pass around a conv", ("triton_poi_fused_convolution_",)),
    ("inductor causal-cache / slice copy", ("clone_slice",)),
    ("inductor norm + SiLU (+ cache concat)", ("vector_norm", "silu")),
    ("inductor residual add", ("triton_poi_fused_add",)),
    ("GEMM / attention (the middle block)", ("gemm", "gemv", "nvjet", "fmha", "attention")),
    ("other inductor", ("triton_",)),
)


def kernel_classes(kernels: list[dict]) -> dict[str, dict]:
    """`kernel_table` rows summed by `KERNEL_CLASSES` (milliseconds, calls), the rest as "other"."""
    out: dict[str, dict] = {}
    for row in kernels:
        name = next((cls for cls, keys in KERNEL_CLASSES if any(k in row["name"] for k in keys)), "other")
        entry = out.setdefault(name, {"ms": 0.0, "calls": 0})
        entry["ms"] += row["ms"]
        entry["calls"] += row["calls"]
    return dict(sorted(out.items(), key=lambda item: -item[1]["ms"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated (default {DEFAULT_VARIANTS})")
    parser.add_argument("--chunks", type=int, default=4, help="timed chunks after the first (default 4)")
    parser.add_argument("--latents-per-chunk", type=int, default=8)
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--preset", default="wan2.2", help="VAE preset: wan2.2 | tiny")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--profile", action="store_true", help="print the kernel table of one chunk")
    parser.add_argument("--profile-variant", default="new", help="the variant --profile profiles")
    parser.add_argument("--profile-rows", type=int, default=25, help="kernels in the --profile table (default 25)")
    parser.add_argument("--flops", action="store_true",
                        help="print each variant's FLOPs per decoder stage (counted on meta) and stop")
    args = parser.parse_args()
    variants = args.variants.split(",")
    for name in variants:
        parse_variant(name)  # fail fast on a typo, before any device work
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    stride = VAEConfig.preset(args.preset).spatial_stride
    h, w = args.height // stride, args.width // stride
    config = VAEConfig.preset(args.preset)
    print(f"# VAE decode, {args.preset} at {args.height}x{args.width}, {args.dtype}, {args.latents_per_chunk}-latent "
          f"chunks: 1 first + {args.chunks} timed. TFLOP per later chunk: old "
          f"{chunk_flops(config, PER_LATENT_PLAN, args.latents_per_chunk, h, w)[0]:.4g}, new "
          f"{chunk_flops(config, DecodePlan(), args.latents_per_chunk, h, w)[0]:.4g}", flush=True)
    if args.flops:  # per plan and stage, then stop: no device work
        for name in variants:
            total, stages = chunk_flops(config, parse_variant(name)[0], args.latents_per_chunk, h, w)
            print(json.dumps({"variant": name, "tflop": round(total, 2), "stages": stages}), flush=True)
        return
    generator = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(1, config.z_dim, args.latents_per_chunk * (args.chunks + 1), h, w,
                          generator=generator, device=device, dtype=dtype)
    reference = None
    for name in (["old"] if "old" in variants else []) + [v for v in variants if v != "old"]:
        result, outputs = run_variant(name, args, latents, reference)
        if name == "old":
            reference = outputs
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
