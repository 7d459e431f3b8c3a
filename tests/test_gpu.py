"""GPU checks (skipped without CUDA; results recorded in docs/BENCHMARKS.md): FlexAttention
masks == dense masks, GPU streaming == CPU streaming, SDPA kernels and compiled blocks agree."""

from __future__ import annotations

import pytest
import torch

from core.attention import (
    BlockCausalMask,
    TeacherForcingMask,
    dense_mask,
    masked_attention,
    sdpa,
    sdpa_backend,
)
from core.config import StreamConfig
from core.optimize import compile_blocks
from core.pipeline import generate_latents
from tests.conftest import SMALL_STREAM, text_context, tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("mask", [BlockCausalMask(12, 40, 4), TeacherForcingMask(8, 40, 2)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_flex_equals_dense(mask, dtype, tol):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, mask.length, 4, 64, device="cuda", dtype=dtype, generator=g)
               for _ in range(3))
    flex = masked_attention(q, k, v, mask, use_flex=True)
    ref = sdpa(q.double(), k.double(), v.double(), dense_mask(mask, "cuda"))
    assert (flex.double() - ref).abs().max().item() < tol


def streaming_inputs(device, dtype):
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, 48, 8, 8, generator=g)
    contexts = [text_context(1, 10 + int(c >= 4)) for c in range(8)]
    cuts = [c == 4 for c in range(8)]
    return noise.to(device, dtype), [c.to(device, dtype) for c in contexts], cuts


def test_gpu_streaming_matches_cpu_fp32(monkeypatch):
    # fp32 means fp32: cuDNN would otherwise run the patch-embedding conv in TF32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    stream = StreamConfig(**SMALL_STREAM)
    cpu_out = generate_latents(tiny_model(), *streaming_inputs("cpu", torch.float32)[:2], stream,
                               streaming_inputs("cpu", torch.float32)[2])
    noise, contexts, cuts = streaming_inputs("cuda", torch.float32)
    with sdpa_backend("math"):
        gpu_out = generate_latents(tiny_model().cuda(), noise, contexts, stream, cuts)
    assert (gpu_out.cpu() - cpu_out).abs().max().item() < 1e-4


@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient"])
def test_sdpa_kernels_agree_in_bf16(backend):
    stream = StreamConfig(**SMALL_STREAM)
    model = tiny_model(dtype=torch.bfloat16).cuda()
    noise, contexts, cuts = streaming_inputs("cuda", torch.bfloat16)
    with sdpa_backend("math"):
        ref = generate_latents(model, noise, contexts, stream, cuts).float()
    with sdpa_backend(backend):
        out = generate_latents(model, noise, contexts, stream, cuts).float()
    assert (out - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_compiled_blocks_match_eager():
    stream = StreamConfig(**SMALL_STREAM)
    noise, contexts, cuts = streaming_inputs("cuda", torch.float32)
    eager = generate_latents(tiny_model().cuda(), noise, contexts, stream, cuts)
    compiled = generate_latents(compile_blocks(tiny_model().cuda()), noise, contexts, stream, cuts)
    assert (compiled - eager).abs().max().item() < 1e-3


def _decoded_frames(mode: str, vae, chunks) -> list:
    from core.decode import DecodeMode, make_decoder

    got = []
    decoder = make_decoder(DecodeMode.parse(mode), vae, lambda frames: got.append(frames.copy()))
    for latents in chunks:
        decoder.submit(latents)
    decoder.finish()
    return got


@pytest.mark.parametrize("mode", ["stream", "device:0"] + (["device:1"] if torch.cuda.device_count() > 1 else []))
def test_async_decoders_equal_sync(mode):
    import numpy as np

    from core.vae import VAEConfig, random_vae

    target = "cuda:1" if mode == "device:1" else "cuda:0"
    g = torch.Generator(device="cuda").manual_seed(3)
    chunks = [torch.randn(1, 2, 48, 8, 8, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    vae_main = random_vae(VAEConfig.preset("tiny"), 1, device="cuda:0", dtype=torch.bfloat16)
    vae_target = random_vae(VAEConfig.preset("tiny"), 1, device=target, dtype=torch.bfloat16)
    reference = _decoded_frames("sync", vae_main, chunks)
    other = _decoded_frames(mode, vae_target, chunks)
    assert len(other) == len(reference) == 4
    assert all(np.array_equal(a, b) for a, b in zip(reference, other, strict=True))


def test_compiled_vae_decoder_matches_eager_and_streams_exactly(monkeypatch):
    from core.optimize import compile_vae_decoder

    # fp32 comparison: keep cuDNN off TF32, or the eager and inductor conv paths round differently.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    from core.vae import VAEConfig, random_vae

    g = torch.Generator(device="cuda").manual_seed(5)
    latents = torch.randn(1, 48, 6, 8, 8, generator=g, device="cuda")
    eager = random_vae(VAEConfig.preset("tiny"), 2, device="cuda").decode(latents)
    vae = random_vae(VAEConfig.preset("tiny"), 2, device="cuda")
    compile_vae_decoder(vae)
    with torch.no_grad():
        full = vae.decode(latents)
        stream = vae.streaming_decoder()
        pieces = torch.cat([stream.decode(latents[:, :, :2]), stream.decode(latents[:, :, 2:])], dim=2)
    assert torch.equal(full, pieces)
    assert (full - eager).abs().max().item() < 1e-4 * max(1.0, eager.abs().max().item())
