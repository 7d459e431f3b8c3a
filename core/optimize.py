"""Speed transforms applied to a built model from outside (the model code stays eager)."""

from __future__ import annotations

import torch

from core.dit import CausalWanDiT

# Measured on an H200 at 720p (docs/BENCHMARKS.md): compiling the DiT blocks takes ~12 s and
# saves ~0.29 s per chunk; compiling the VAE decoder takes ~55 s and saves ~0.31 s per chunk.
DIT_BREAK_EVEN_CHUNKS = 40
VAE_BREAK_EVEN_CHUNKS = 180


def wants_compile(setting: str, device: torch.device, chunks: int | None = None,
                  break_even_chunks: int = 0) -> bool:
    """RuntimeConfig.compile ("auto" | "always" | "never") on a device. "auto" compiles on a GPU
    when the run is long enough to win back the compile time (`chunks` None: steady-state
    measurements, which exclude it)."""
    if setting != "auto":
        return setting == "always"
    return device.type == "cuda" and (chunks is None or chunks >= break_even_chunks)


def compile_blocks(model: CausalWanDiT, mode: str | None = None) -> CausalWanDiT:
    """torch.compile every transformer block: fuses the norms, adaLN modulation, RoPE and gates
    around the matmuls. Cache writes and attention stay eager (see core/kv_cache.py)."""
    for block in model.blocks:
        block.compile(dynamic=False, mode=mode)
    return model


def compile_vae_decoder(vae) -> None:
    """torch.compile the VAE decoder step (measured 1.30 -> 0.98 s per 720p chunk on an H200,
    docs/BENCHMARKS.md). The feature cache and the first-step rule stay Python-side state; the
    two step kinds (first, later) compile once each."""
    vae.decoder.compile()


def warm_up_vae_decoder(vae, latent_height: int, latent_width: int, frames_per_block: int) -> None:
    """Compile both decoder step kinds ahead of a timed or latency-sensitive run."""
    param = next(vae.parameters())
    generator = torch.Generator(device=param.device).manual_seed(0)
    latents = torch.randn(1, vae.config.z_dim, 2 * frames_per_block, latent_height, latent_width,
                          generator=generator, device=param.device, dtype=param.dtype)
    decoder = vae.streaming_decoder()
    with torch.no_grad():
        decoder.decode(latents[:, :, :frames_per_block])
        decoder.decode(latents[:, :, frames_per_block:])
