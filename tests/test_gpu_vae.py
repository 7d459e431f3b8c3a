"""The cell VAE decoder on CUDA: the same function as the official per-latent loop (fp32 within
rounding with TF32 off, bf16 no further from an fp32 decode than the loop itself), any chunking
bit for bit, compiled and channels-last variants equal to eager, and the 720p memory cap."""

import pytest
import torch

from core.optimize import TapProductsConv3d, channels_last_vae_decoder, compile_vae_decoder
from core.vae import PER_LATENT_PLAN, DecodePlan, VAEConfig, random_vae
from tests.test_vae import ReferenceDecoder, assert_fp32_close

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

# Up stages 1-3 at 2 x 3 latents: the widest tensor per input frame is 98304 B (tiny) and
# 786432 B (wan2.2) in fp32: caps of two frames per slice.
SLICED = {"tiny": DecodePlan(slice_bytes=2 * 98304), "wan2.2": DecodePlan(slice_bytes=2 * 786432)}


@pytest.fixture(autouse=True)
def full_fp32():
    """fp32 comparisons: cuDNN and cuBLAS off TF32, which rounds inputs to 10 mantissa bits."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _latents(frames: int, seed: int, h: int = 2, w: int = 3, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(1, 48, frames, h, w, generator=generator, device="cuda").to(dtype)


@pytest.mark.parametrize("preset", ["tiny", "wan2.2"])
def test_per_latent_plan_is_the_official_loop_on_cuda(preset: str) -> None:
    vae = random_vae(VAEConfig.preset(preset), seed=1, device="cuda")
    latents = _latents(5, seed=2)
    with torch.no_grad():
        assert torch.equal(vae.decode(latents, PER_LATENT_PLAN), ReferenceDecoder(vae).decode(latents))


@pytest.mark.parametrize("preset", ["tiny", "wan2.2"])
@pytest.mark.parametrize("plan_name", ["default", "sliced", "cells_of_3"])
def test_cell_decoder_equals_the_loop_in_fp32(preset: str, plan_name: str) -> None:
    plan = {"default": DecodePlan(), "sliced": SLICED[preset], "cells_of_3": DecodePlan(latents_per_cell=3)}[plan_name]
    vae = random_vae(VAEConfig.preset(preset), seed=3, device="cuda")
    latents = _latents(9, seed=4)
    with torch.no_grad():
        assert_fp32_close(vae.decode(latents, plan), vae.decode(latents, PER_LATENT_PLAN), rel=2e-5)


def test_cell_decoder_in_bf16_is_as_close_to_fp32_as_the_loop() -> None:
    config = VAEConfig.preset("wan2.2")
    latents = _latents(9, seed=5)
    with torch.no_grad():
        exact = random_vae(config, seed=6, device="cuda").decode(latents, PER_LATENT_PLAN).float()
        vae = random_vae(config, seed=6, device="cuda", dtype=torch.bfloat16)
        errors = {name: vae.decode(latents.bfloat16(), plan).float() - exact
                  for name, plan in (("loop", PER_LATENT_PLAN), ("cells", DecodePlan()))}
    rms = {name: error.pow(2).mean().sqrt().item() for name, error in errors.items()}
    worst = {name: error.abs().max().item() for name, error in errors.items()}
    # the sub-pixel kernels round their summed weights to bf16 once more: ~1% more error measured
    assert rms["cells"] <= 1.2 * rms["loop"] and worst["cells"] <= 2 * worst["loop"], (rms, worst)
    assert worst["loop"] < 0.05 * exact.abs().max().item(), worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("plan_name, split", [("default", [1, 3, 4]), ("default", [5, 3]), ("sliced", [2, 6]),
                                              ("sliced", [1] * 8)])
def test_any_chunking_concatenates_bit_for_bit_on_cuda(dtype: torch.dtype, plan_name: str, split: list[int]) -> None:
    plan = DecodePlan() if plan_name == "default" else SLICED["wan2.2"]
    vae = random_vae(VAEConfig.preset("wan2.2"), seed=7, device="cuda", dtype=dtype)
    latents = _latents(8, seed=8, dtype=dtype)
    with torch.no_grad():
        full = vae.decode(latents, plan)
        decoder = vae.streaming_decoder(plan)
        pieces = torch.cat([decoder.decode(chunk) for chunk in latents.split(split, dim=2)], dim=2)
    assert torch.equal(pieces, full)


def test_compiled_cell_decoder_matches_eager_and_streams_exactly() -> None:
    from torch._dynamo.utils import counters

    vae = random_vae(VAEConfig.preset("tiny"), seed=9, device="cuda")
    latents = _latents(10, seed=10, h=4, w=6)
    plan = DecodePlan(slice_bytes=2 * 4 * 98304)  # 4 x the latent area of SLICED: two frames per slice
    with torch.no_grad():
        eager = vae.decode(latents, plan)
        torch._dynamo.reset()
        counters.clear()
        compile_vae_decoder(vae)
        full = vae.decode(latents, plan)
        decoder = vae.streaming_decoder(plan)
        pieces = torch.cat([decoder.decode(chunk) for chunk in latents.split([3, 5, 2], dim=2)], dim=2)
    assert torch.equal(full, pieces)
    assert_fp32_close(full, eager, rel=1e-4)  # inductor's fused norms round differently
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] <= 3 * 6  # start, first-cell rest, steady per unit
    torch._dynamo.reset()


def test_channels_last_cell_decoder_equals_default() -> None:
    vae = random_vae(VAEConfig.preset("wan2.2"), seed=11, device="cuda")
    latents = _latents(6, seed=12)
    with torch.no_grad():
        expected = vae.decode(latents)
        channels_last_vae_decoder(vae)
        actual = vae.decode(latents)
    assert_fp32_close(actual, expected, rel=2e-5)


def test_compiled_decoder_runs_channels_last_on_a_gpu() -> None:
    """`compile_vae_decoder` on a GPU: every up stage receives channels-last activations (cuDNN
    follows the weights' layout, so no transposes around the convs) and decodes what eager does."""
    vae = random_vae(VAEConfig.preset("tiny"), seed=15, device="cuda")
    latents = _latents(6, seed=16, h=4, w=6)
    layouts = []
    with torch.no_grad():
        expected = vae.decode(latents)
        torch._dynamo.reset()
        compile_vae_decoder(vae)
        hooks = [stage.register_forward_pre_hook(lambda m, args: layouts.append(
            args[0].is_contiguous(memory_format=torch.channels_last_3d))) for stage in vae.decoder.upsamples]
        try:
            stream = vae.streaming_decoder()
            actual = torch.cat([stream.decode(chunk) for chunk in latents.split([2, 4], dim=2)], dim=2)
        finally:
            for hook in hooks:
                hook.remove()
            torch._dynamo.reset()
    assert layouts and all(layouts), layouts
    # the causal cache stays channels-last out of inductor's graphs: each padded conv input is built
    # channels-last, not built channels-first and transposed whole (docs/BENCHMARKS.md, 2026-12-07)
    cached = [t[0] if isinstance(t, tuple) else t for t in stream.cache._frames.values() if t is not None]
    assert len(cached) > 20 and all(t.is_contiguous(memory_format=torch.channels_last_3d) for t in cached)
    assert_fp32_close(actual, expected, rel=1e-4)


def test_compiled_decoder_with_rings_decodes_what_eager_does() -> None:
    """`DecodePlan(ring_past=True)` compiled by inductor on a GPU (one-frame slices, as at 720p):
    the rings stay in the weights' layout and in place from chunk to chunk, and the decode is
    eager's."""
    vae = random_vae(VAEConfig.preset("tiny"), seed=17, device="cuda")
    latents = _latents(9, seed=18, h=8, w=8)
    plan = DecodePlan(slice_bytes=2**14, ring_past=True)
    with torch.no_grad():
        expected = vae.decode(latents, plan)
        torch._dynamo.reset()
        compile_vae_decoder(vae)
        try:
            stream = vae.streaming_decoder(plan)
            pieces = [stream.decode(latents[:, :, :4])]
            rings = {id(e[0]): e[0].data_ptr() for e in stream.cache._frames.values() if isinstance(e, tuple)}
            pieces += [stream.decode(latents[:, :, 4:8]), stream.decode(latents[:, :, 8:])]  # the last one
            # ends inside a cell: decoded on a copy of the cache
        finally:
            torch._dynamo.reset()
    after = [e[0] for e in stream.cache._frames.values() if isinstance(e, tuple)]
    assert len(after) >= 5 and all(r.is_contiguous(memory_format=torch.channels_last_3d) for r in after)
    assert all(rings.get(id(r)) == r.data_ptr() for r in after)  # the same tensors, written in place
    assert_fp32_close(torch.cat(pieces, dim=2), expected, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decoder_with_the_tap_products_head_decodes_what_eager_does(dtype: torch.dtype,
                                                                            monkeypatch) -> None:
    """The head as `TapProductsConv3d` (the 5B VAE's, forced here onto the tiny one) under inductor
    with rings and one-frame slices: the decode is eager's (fp32 within rounding; bf16 no further
    from an fp32 decode than cuDNN's head), and chunks concatenate bit for bit to the whole decode."""
    monkeypatch.setattr(TapProductsConv3d, "pays", staticmethod(lambda conv: True))
    vae = random_vae(VAEConfig.preset("tiny"), seed=19, device="cuda", dtype=dtype)
    latents = _latents(9, seed=20, h=8, w=8, dtype=dtype)
    plan = DecodePlan(slice_bytes=2**14, ring_past=True)
    with torch.no_grad():
        exact = random_vae(VAEConfig.preset("tiny"), seed=19, device="cuda").decode(latents.float(), plan)
        eager = vae.decode(latents, plan)
        torch._dynamo.reset()
        compile_vae_decoder(vae)
        try:
            whole = vae.decode(latents, plan)
            stream = vae.streaming_decoder(plan)
            pieces = torch.cat([stream.decode(c) for c in latents.split([4, 3, 2], dim=2)], dim=2)
        finally:
            torch._dynamo.reset()
    assert type(vae.decoder.head[-1]) is TapProductsConv3d
    assert torch.equal(pieces, whole)
    if dtype == torch.float32:
        assert_fp32_close(whole, eager, rel=1e-4)
    else:
        scale = exact.abs().max()
        assert (whole.float() - exact).abs().max() <= 1.5 * (eager.float() - exact).abs().max() + 1e-3 * scale


def test_720p_decode_peak_memory_is_capped() -> None:
    """bf16, two 8-latent chunks at 704 x 1280: peak allocated memory (weights included) <= 8 GiB,
    against ~10 GiB for the per-latent loop (docs/BENCHMARKS.md)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    vae = random_vae(VAEConfig.preset("wan2.2"), seed=13, device="cuda", dtype=torch.bfloat16)
    latents = _latents(16, seed=14, h=44, w=80, dtype=torch.bfloat16)
    decoder = vae.streaming_decoder()
    with torch.no_grad():
        frames = [decoder.decode(chunk).shape[2] for chunk in latents.split(8, dim=2)]
    assert frames == [29, 32]
    assert torch.cuda.max_memory_allocated() / 2**30 <= 8.0
