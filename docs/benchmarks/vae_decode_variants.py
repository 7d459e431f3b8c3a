"""VAE streaming-decode speed at 720p on one GPU: s per 8-latent (32-frame) chunk, for a few
execution variants of the per-latent decoder (`PER_LATENT_PLAN`, the official loop; the figures
of docs/BENCHMARKS.md of 2026-11-21). The cell decoder and its variants: vae_decode.py. Run from
the repo root:
    python docs/benchmarks/vae_decode_variants.py [variant ...]
Random bf16 weights (timings do not depend on values); CUDA events, 1 warm-up chunk, median."""

import statistics
import sys

import torch

from core.vae import PER_LATENT_PLAN, VAEConfig, random_vae


def channels_last(vae):
    for param in vae.parameters():
        if param.dim() == 5:
            param.data = param.data.contiguous(memory_format=torch.channels_last_3d)
    return vae


def time_variant(name: str, chunks: int = 4) -> None:
    torch.backends.cudnn.benchmark = "cudnn_benchmark" in name
    vae = random_vae(VAEConfig.preset("wan2.2"), seed=0, device="cuda", dtype=torch.bfloat16)
    if "channels_last" in name:
        vae = channels_last(vae)
    if "compiled" in name:
        vae.decoder.compile()
    g = torch.Generator(device="cuda").manual_seed(0)
    latents = torch.randn(1, 48, 8 * (chunks + 1), 44, 80, generator=g, device="cuda", dtype=torch.bfloat16)
    decoder = vae.streaming_decoder(PER_LATENT_PLAN)
    times = []
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for c in range(chunks + 1):
            chunk = latents[:, :, 8 * c:8 * (c + 1)]
            if "channels_last" in name:
                chunk = chunk.contiguous(memory_format=torch.channels_last_3d)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = decoder.decode(chunk)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
    steady = times[1:]
    print(f"{name:16s} first chunk {times[0]:.3f} s ({out.shape[2]} frames/chunk later), steady "
          f"median {statistics.median(steady):.3f} s (min {min(steady):.3f}, max {max(steady):.3f}), "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    for variant in sys.argv[1:] or ["eager", "channels_last", "cudnn_benchmark", "compiled",
                                    "channels_last+compiled"]:
        time_variant(variant)
