"""Wan2.2 VAE: checkpoint layout, building blocks against slow references, the first-step rules,
streaming decode == one-shot decode bit for bit, encode causality, loading."""

from __future__ import annotations

import dataclasses
import math
import re
import weakref

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from core.errors import UserError
from core.optimize import (
    RING_TAPS_MAX_BYTES,
    VAE_RECOMPILE_LIMIT,
    FrameTapsConv3d,
    MatmulAttentionBlock,
    StackedTapsConv3d,
    TapProductsConv3d,
    channels_last_vae_decoder,
    compile_vae_decoder,
    compile_vae_encoder,
    conv3d_by_frame_taps,
    conv3d_by_stacked_taps,
    frame_taps_vae_decoder,
    matmul_attention_vae_decoder,
    tap_products_vae_head,
)
from core.vae import (
    LATENT_MEAN,
    LATENT_STD,
    PER_LATENT_PLAN,
    AttentionBlock,
    AvgDown3D,
    CausalCache,
    CausalConv3d,
    DecodePlan,
    Decoder,
    Downsample,
    DupUp3D,
    ResidualBlock,
    RMSNorm,
    Upsample,
    UpStage,
    VAEConfig,
    WanVAE,
    load_vae,
    patchify,
    random_vae,
    subpixel_weight,
    unpatchify,
)

TINY = VAEConfig.preset("tiny")
MID = VAEConfig(base_dim=16, decoder_base_dim=64)  # decoder widths 256, 256, 256, 128, 64
# For the traced (torch.compile) checks: the same units and graphs with one residual block fewer per
# stage (dynamo's tracing time grows with the ops traced, not with the tensors).
TRACED = dataclasses.replace(TINY, num_res_blocks=1)


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            fan_in = param[0].numel() if param.dim() > 1 else 1
            param.copy_(torch.randn(param.shape, generator=g) / math.sqrt(fan_in))
    return module


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return random_vae(TINY, seed=0)


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return randn(2, 48, 8, 2, 3, seed=1)


@pytest.fixture(scope="module")
def full_pixels(vae: WanVAE, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents)


# ----------------------------------------------------------------------------------------------
# Config and checkpoint layout (reference-systems.md §1.1, §1.4).


def test_presets() -> None:
    wan = VAEConfig.preset("wan2.2")
    assert (wan.base_dim, wan.decoder_base_dim, wan.z_dim, wan.dim_mult, wan.num_res_blocks,
            wan.temporal_downsample) == (160, 256, 48, (1, 2, 4, 4), 2, (False, True, True))
    assert wan.spatial_stride == 16
    assert (TINY.z_dim, TINY.dim_mult, TINY.temporal_downsample) == (48, wan.dim_mult, wan.temporal_downsample)
    assert VAEConfig.preset("tiny") is not VAEConfig.preset("tiny")  # presets are copies
    with pytest.raises(ValueError, match="allowed: wan2.2, tiny"):
        VAEConfig.preset("wan2.1")


@pytest.mark.parametrize("field, value, message", [
    ("base_dim", 0, "base_dim must be a positive integer"),
    ("num_res_blocks", 1.5, "bad value for 'num_res_blocks': expected an integer"),
    ("z_dim", 16, "z_dim must be 48"),
    ("dim_mult", (4,), "dim_mult must be at least two"),
    ("temporal_downsample", (True, True), "temporal_downsample must be 3 booleans"),
    ("temporal_downsample", (True, True, True), "exactly two True"),
    ("dim_mult", (1, 3, 4, 4), "cannot be regrouped"),
])
def test_config_rejects(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VAEConfig(**{field: value})


def _residual(prefix: str, c_in: int, c_out: int) -> list[tuple[str, tuple[int, ...]]]:
    rows = [(f"{prefix}.residual.0.gamma", (c_in, 1, 1, 1)), (f"{prefix}.residual.2.weight", (c_out, c_in, 3, 3, 3)),
            (f"{prefix}.residual.2.bias", (c_out,)), (f"{prefix}.residual.3.gamma", (c_out, 1, 1, 1)),
            (f"{prefix}.residual.6.weight", (c_out, c_out, 3, 3, 3)), (f"{prefix}.residual.6.bias", (c_out,))]
    if c_in != c_out:
        rows += [(f"{prefix}.shortcut.weight", (c_out, c_in, 1, 1, 1)), (f"{prefix}.shortcut.bias", (c_out,))]
    return rows


def _attention(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.norm.gamma", (c, 1, 1)), (f"{prefix}.to_qkv.weight", (3 * c, c, 1, 1)),
            (f"{prefix}.to_qkv.bias", (3 * c,)), (f"{prefix}.proj.weight", (c, c, 1, 1)), (f"{prefix}.proj.bias", (c,))]


def _conv(prefix: str, *shape: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", tuple(shape)), (f"{prefix}.bias", (shape[0],))]


def _wan22_layout() -> list[tuple[str, tuple[int, ...]]]:
    """Every row of reference-systems.md §1.4, in the official registration order."""
    rows = _conv("encoder.conv1", 160, 12, 3, 3, 3)
    enc = "encoder.downsamples"
    rows += _residual(f"{enc}.0.downsamples.0", 160, 160) + _residual(f"{enc}.0.downsamples.1", 160, 160)
    rows += _conv(f"{enc}.0.downsamples.2.resample.1", 160, 160, 3, 3)
    rows += _residual(f"{enc}.1.downsamples.0", 160, 320) + _residual(f"{enc}.1.downsamples.1", 320, 320)
    rows += _conv(f"{enc}.1.downsamples.2.resample.1", 320, 320, 3, 3)
    rows += _conv(f"{enc}.1.downsamples.2.time_conv", 320, 320, 3, 1, 1)
    rows += _residual(f"{enc}.2.downsamples.0", 320, 640) + _residual(f"{enc}.2.downsamples.1", 640, 640)
    rows += _conv(f"{enc}.2.downsamples.2.resample.1", 640, 640, 3, 3)
    rows += _conv(f"{enc}.2.downsamples.2.time_conv", 640, 640, 3, 1, 1)
    rows += _residual(f"{enc}.3.downsamples.0", 640, 640) + _residual(f"{enc}.3.downsamples.1", 640, 640)
    rows += _residual("encoder.middle.0", 640, 640) + _attention("encoder.middle.1", 640)
    rows += _residual("encoder.middle.2", 640, 640)
    rows += [("encoder.head.0.gamma", (640, 1, 1, 1))] + _conv("encoder.head.2", 96, 640, 3, 3, 3)
    rows += _conv("conv1", 96, 96, 1, 1, 1) + _conv("conv2", 48, 48, 1, 1, 1)
    rows += _conv("decoder.conv1", 1024, 48, 3, 3, 3)
    rows += _residual("decoder.middle.0", 1024, 1024) + _attention("decoder.middle.1", 1024)
    rows += _residual("decoder.middle.2", 1024, 1024)
    dec = "decoder.upsamples"
    for stage in (0, 1):
        for block in (0, 1, 2):
            rows += _residual(f"{dec}.{stage}.upsamples.{block}", 1024, 1024)
        rows += _conv(f"{dec}.{stage}.upsamples.3.resample.1", 1024, 1024, 3, 3)
        rows += _conv(f"{dec}.{stage}.upsamples.3.time_conv", 2048, 1024, 3, 1, 1)
    rows += _residual(f"{dec}.2.upsamples.0", 1024, 512)
    rows += _residual(f"{dec}.2.upsamples.1", 512, 512) + _residual(f"{dec}.2.upsamples.2", 512, 512)
    rows += _conv(f"{dec}.2.upsamples.3.resample.1", 512, 512, 3, 3)
    rows += _residual(f"{dec}.3.upsamples.0", 512, 256)
    rows += _residual(f"{dec}.3.upsamples.1", 256, 256) + _residual(f"{dec}.3.upsamples.2", 256, 256)
    rows += [("decoder.head.0.gamma", (256, 1, 1, 1))] + _conv("decoder.head.2", 12, 256, 3, 3, 3)
    return rows


def test_wan22_state_dict_layout() -> None:
    with torch.device("meta"):
        model = WanVAE(VAEConfig.preset("wan2.2"))
    state = model.state_dict()
    assert [(name, tuple(t.shape)) for name, t in state.items()] == _wan22_layout()
    assert len(state) == 196

    def count(prefix: str) -> int:
        return sum(t.numel() for name, t in state.items() if name.startswith(prefix))

    assert count("") == 704_688_668
    assert count("encoder.") == 149_627_776
    assert count("decoder.") == 555_049_228
    assert count("conv1.") + count("conv2.") == 9_312 + 2_352
    # the normalisation constants are fp32 data, outside the state dict, kept when built on meta
    assert model.latent_mean.tolist() == torch.tensor(LATENT_MEAN).tolist()
    assert model.latent_std.dtype == torch.float32 and not model.latent_std.is_meta


# ----------------------------------------------------------------------------------------------
# Building blocks against slow references.


@pytest.mark.parametrize("shape", [(2, 3, 2, 6, 4), (1, 5, 1, 2, 8)])
def test_patchify_channel_order(shape: tuple[int, ...]) -> None:
    x = randn(*shape)
    B, C, T, H, W = shape
    expected = torch.empty(B, 4 * C, T, H // 2, W // 2)
    for c in range(C):
        for r in range(2):  # column offset
            for q in range(2):  # row offset
                for i in range(H // 2):
                    for j in range(W // 2):
                        expected[:, c * 4 + r * 2 + q, :, i, j] = x[:, c, :, 2 * i + q, 2 * j + r]
    assert torch.equal(patchify(x), expected)
    assert torch.equal(unpatchify(patchify(x)), x)


@pytest.mark.parametrize("kernel", [(3, 3, 3), (3, 1, 1), (1, 3, 3), (1, 1, 1)])
def test_causal_conv_pads_in_front_only(kernel: tuple[int, int, int]) -> None:
    conv = randomize_(CausalConv3d(4, 5, kernel), seed=1)
    x = randn(2, 4, 5, 6, 7, seed=2)
    kt, kh, kw = kernel
    padded = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0))  # zero frames in front only
    expected = F.conv3d(padded, conv.weight, conv.bias)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    assert conv(x).shape == x.shape[:1] + (5,) + x.shape[2:]


@pytest.mark.parametrize("split", [[1, 1, 1, 1, 1, 1], [1, 2, 3], [2, 4], [6]])
def test_causal_conv_cache_continues_the_stream(split: list[int]) -> None:
    conv = randomize_(CausalConv3d(3, 4, 3), seed=3)
    x = randn(1, 3, sum(split), 5, 4, seed=4)
    cache = CausalCache()
    stream = F.pad(x, (0, 0, 0, 0, 2, 0))  # the stream with its two zero frames in front
    outputs, end = [], 2
    for chunk in x.split(split, dim=2):
        outputs.append(conv(chunk, cache))
        end += chunk.shape[2]
        # the cache holds the last two frames of the stream so far
        assert torch.equal(cache.get(conv), stream[:, :, end - 2:end])
    torch.testing.assert_close(torch.cat(outputs, dim=2), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [(3, 3, 3), (3, 1, 1), (2, 3, 3)])
@pytest.mark.parametrize("split", [[1, 1, 1, 1, 1, 1, 1], [1, 1, 3, 1, 1], [2, 1, 1, 1, 2]])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("frozen", [False, True], ids=["gathered-taps", "frozen-taps"])
def test_ring_steps_continue_the_stream(kernel: tuple[int, int, int], split: list[int], channels_last: bool,
                                        frozen: bool, monkeypatch) -> None:
    """`CausalConv3d.ring_step` (one-frame steps of a compiled decoder), run eagerly here: the ring
    written in place and the taps rotated (gathered per step, or frozen by `freeze_ring_taps`)
    give the causal convolution of the whole stream, also when one-frame steps and wider steps
    alternate (ring -> padded past -> ring), and a cache copy continues on its own frames without
    touching the original's."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # rings are for compiled steps
    conv = randomize_(CausalConv3d(3, 4, kernel), seed=5).double().requires_grad_(False)  # frozen, as the VAE
    if channels_last:
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    if frozen:
        conv.freeze_ring_taps()
        # the rotations are kept (not derived per step), each its own buffer, outside the state dict
        rotations = [conv.ring_taps(newest) for newest in range(kernel[0])]
        assert all(r is getattr(conv, f"ring_taps_{n}") for n, r in enumerate(rotations))
        assert len({r.data_ptr() for r in rotations} | {conv.weight.data_ptr()}) == kernel[0] + 1
        assert set(conv.state_dict()) == {"weight", "bias"}
    x = randn(1, 3, sum(split), 12, 10, seed=6).double()  # a frame (360 values) outweighs the weights (<= 324)
    kt, kh, kw = kernel
    expected = F.conv3d(F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)), conv.weight, conv.bias)
    cache, outputs, rings = CausalCache(rings=True), [], 0
    for index, chunk in enumerate(x.split(split, dim=2)):
        if index == 2:  # a copy steps ahead on its own; the original must not see it
            side = cache.copy()
            for _ in range(2):  # two steps: the second overwrites a frame the original still needs
                conv(torch.zeros_like(chunk[:, :, :1]), side)
        before = cache.get(conv)
        outputs.append(conv(chunk, cache))
        after = cache.get(conv)
        if isinstance(before, tuple) and isinstance(after, tuple):
            assert after[0] is before[0]  # the same ring, written in place
        rings += isinstance(after, tuple)
    assert rings == sum(n == 1 for n in split)
    torch.testing.assert_close(torch.cat(outputs, dim=2), expected, rtol=1e-12, atol=1e-12)
    entry = cache.get(conv)
    ring = entry[0] if isinstance(entry, tuple) else None
    if ring is not None and channels_last:
        assert ring.is_contiguous(memory_format=torch.channels_last_3d)


def test_rings_need_a_compiled_one_frame_step_and_frames_larger_than_weights(monkeypatch) -> None:
    conv = CausalConv3d(8, 8, 3).requires_grad_(False)  # 1,728 weights
    cache = CausalCache(rings=True)
    small, large = torch.zeros(1, 8, 1, 4, 4), torch.zeros(1, 8, 1, 16, 16)  # 128 / 2,048 values a frame
    assert not conv._rings_pay(large, cache)  # eager
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert conv._rings_pay(large, cache)
    assert not conv._rings_pay(small, cache)
    assert not conv._rings_pay(torch.zeros(1, 8, 2, 16, 16), cache)
    assert not conv._rings_pay(large, CausalCache())  # the plan's `ring_past=False`
    assert not conv._rings_pay(large, None)
    # a step autograd records keeps the padded input (a ring written in place would corrupt it)
    assert not conv._rings_pay(large.requires_grad_(True), cache)
    with torch.no_grad():
        assert conv._rings_pay(large, cache)
    conv.requires_grad_(True)
    assert not conv._rings_pay(torch.zeros(1, 8, 1, 16, 16), cache)


def _ring_step_code(write: str) -> tuple[str, torch.Tensor, torch.Tensor, bool]:
    """Inductor's CPU code for a steady one-frame step of RMSNorm -> SiLU -> causal conv in bf16,
    channels-last, with the ring written as `CausalConv3d.ring_step` does (`write="put"`) or with
    `index_copy_` (what the twelfth session measured, `write="copy"`). Returns the code, the
    step's output and eager's, and whether the ring kept its storage."""
    from torch._inductor.utils import run_and_get_code

    norm, conv = randomize_(RMSNorm(16), seed=50), randomize_(CausalConv3d(16, 16, 3), seed=51)
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    norm, conv = norm.bfloat16().requires_grad_(False), conv.bfloat16().requires_grad_(False)  # frozen, as the VAE
    frames = [randn(1, 16, 1, 24, 24, seed=52 + t).bfloat16().contiguous(memory_format=torch.channels_last_3d)
              for t in range(3)]

    def step(x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return conv(F.silu(norm(x)), cache)

    expected, eager_cache = [], CausalCache()
    for x in frames:
        expected.append(step(x, eager_cache))
    original = CausalConv3d.ring_step
    if write == "copy":
        def ring_step(self, x, cache):  # the old write: index_copy_ at the oldest slot
            ring, oldest_slot, oldest = cache.get(self)
            ring.index_copy_(2, oldest_slot, x)
            cache.put(self, (ring, (oldest_slot + 1) % 3, (oldest + 1) % 3))
            return ring, oldest
    torch._dynamo.reset()
    try:
        compiled = torch.compile(torch.no_grad()(step), backend="inductor", dynamic=False)
        cache = CausalCache(rings=True)
        outputs = [compiled(frames[0], cache)]  # starts the ring
        ring = cache.get(conv)[0]
        pointer = ring.data_ptr()
        if write == "copy":
            CausalConv3d.ring_step = ring_step
        out, code = run_and_get_code(compiled, frames[1], cache)
        outputs.append(out)
    finally:
        CausalConv3d.ring_step = original
        torch._dynamo.reset()
    kept = cache.get(conv)[0] is ring and ring.data_ptr() == pointer
    return "\n".join(code), torch.cat(outputs, dim=2), torch.cat(expected[:2], dim=2), kept


@pytest.mark.parametrize("frozen", [False, True], ids=["gathered-taps", "frozen-taps"])
def test_ring_steps_of_every_slot_share_one_compiled_code(frozen: bool, monkeypatch, tmp_path) -> None:
    """Compiled one-frame ring steps (CPU inductor, bf16, channels-last, as on the GPU) capture one
    graph per ring slot (the slot picks the rotation of the taps). With frozen rotations
    (`freeze_ring_taps`, what `compile_vae_decoder` does) those graphs differ only in the buffer
    they are given: inductor compiles the steady step once and finds the other slots in its cache,
    and the code gathers no weights. Gathered per step, every slot compiles on its own and copies
    the weights in its code."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cold cache: hits are this test's
    norm, conv = randomize_(RMSNorm(16), seed=50), randomize_(CausalConv3d(16, 16, 3), seed=51)
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    norm, conv = norm.bfloat16().requires_grad_(False), conv.bfloat16().requires_grad_(False)
    if frozen:
        conv.freeze_ring_taps()
    frames = [randn(1, 16, 1, 24, 24, seed=52 + t).bfloat16().contiguous(memory_format=torch.channels_last_3d)
              for t in range(5)]

    def step(x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return conv(F.silu(norm(x)), cache)

    eager_cache = CausalCache()
    expected = torch.cat([step(x, eager_cache) for x in frames], dim=2)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(torch.no_grad()(step), backend="inductor", dynamic=False)
        cache = CausalCache(rings=True)
        outputs = [compiled(frames[0], cache)]  # the start
        out, code = run_and_get_code(compiled, frames[1], cache)  # slot 0
        outputs += [out] + [compiled(x, cache) for x in frames[2:]]  # slots 1, 2, then slot 0 again
        graphs, cached = counters["stats"]["unique_graphs"], dict(counters["inductor"])
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(torch.cat(outputs, dim=2).float(), expected.float(), rtol=0.02, atol=0.02)
    assert graphs == 4  # the start and one per slot; the fifth step reuses slot 0's
    weight_copy = re.compile(r"empty_strided_cpu\(\(16, 16, 3, 3, 3\)")
    if frozen:
        assert (cached.get("fxgraph_cache_miss"), cached.get("fxgraph_cache_hit")) == (2, 2), cached
        assert code and not weight_copy.search(code[0]), code
    else:
        assert cached.get("fxgraph_cache_miss") == 4 and not cached.get("fxgraph_cache_hit"), cached
        assert weight_copy.search(code[0]), code


def test_inductor_writes_the_ring_in_place_and_convolves_it_where_it_lies() -> None:
    """The generated code of a compiled one-frame step (CPU, bf16, channels-last, as on the GPU):
    the new frame is written into the cache's ring inside the fused norm + SiLU kernel and the conv
    reads the ring itself (a graph input), in its layout; no ring-sized buffer is allocated. The
    same check flags the `index_copy_` write that inductor turned into a copy of the whole ring per
    step (1.17x slower decoder on an H100, docs/BENCHMARKS.md)."""
    import re

    ring_buffer = re.compile(r"empty_strided_cpu\(\(1, 16, 3, 24, 24\)")
    conv_on_input = re.compile(r"extern_kernels\.convolution\(arg\d+_1, ")
    code, actual, expected, kept = _ring_step_code("put")
    assert kept and conv_on_input.search(code) and not ring_buffer.search(code), code
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0.02, atol=0.02)
    code, _, _, _ = _ring_step_code("copy")
    assert ring_buffer.search(code) and not conv_on_input.search(code)


@pytest.mark.parametrize("kernel", [(3, 3, 3), (2, 3, 3), (3, 1, 1), (1, 3, 3), (3, 1, 3)])
@pytest.mark.parametrize("split", [[1, 1, 1, 1, 1, 1, 1], [2, 1, 3, 1], [7]])
@pytest.mark.parametrize("channels_last", [False, True])
def test_tap_products_continue_the_stream(kernel: tuple[int, int, int], split: list[int],
                                          channels_last: bool) -> None:
    """`TapProductsConv3d` (the 720p head: one GEMM per frame over all taps, partial sums of the next
    outputs in the cache) stepped through a stream in any pieces is the causal convolution of the
    whole stream (float64), keeps the parameter names, and a cache copy steps on its own."""
    conv = randomize_(CausalConv3d(6, 3, kernel), seed=60).double().requires_grad_(False)
    if channels_last:
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    x = randn(2, 6, sum(split), 5, 4, seed=61).double()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    kt, kh, kw = kernel
    expected = F.conv3d(F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)), conv.weight, conv.bias)
    names = list(conv.state_dict())
    conv.__class__ = TapProductsConv3d
    assert list(conv.state_dict()) == names
    torch.testing.assert_close(conv(x), expected, rtol=1e-12, atol=1e-12)  # a whole clip, no cache
    cache, outputs = CausalCache(), []
    for index, chunk in enumerate(x.split(split, dim=2)):
        if index == 1:  # a copy steps ahead on its own; the original must not see it
            side = cache.copy()
            conv(torch.ones_like(chunk[:, :, :1]), side)
        outputs.append(conv(chunk, cache))
        partial = cache.get(conv)
        assert partial is None if kt == 1 else partial.shape == (kt - 1, 2, 5, 4, 3)
    torch.testing.assert_close(torch.cat(outputs, dim=2), expected, rtol=1e-12, atol=1e-12)


def test_tap_products_replace_only_a_head_with_few_output_channels() -> None:
    """The 5B VAE's head (256 -> 12: products of 324 values a pixel against 256 inputs) is swapped;
    the tiny presets' heads (32 or 16 -> 12) are not: there the products outweigh the frame."""
    with torch.device("meta"):
        big, tiny = WanVAE(VAEConfig.preset("wan2.2")), WanVAE(VAEConfig.preset("tiny"))
    names = list(big.state_dict())
    assert tap_products_vae_head(big) and type(big.decoder.head[-1]) is TapProductsConv3d
    assert list(big.state_dict()) == names
    assert not tap_products_vae_head(big)  # once
    assert not tap_products_vae_head(tiny) and type(tiny.decoder.head[-1]) is CausalConv3d
    others = [m for m in big.modules() if isinstance(m, CausalConv3d) and m is not big.decoder.head[-1]]
    assert others and all(type(m) is CausalConv3d for m in others)


def _traced_decode(model: WanVAE, latents: torch.Tensor, plan: DecodePlan, **options):
    """Eager decode, then `compile_vae_decoder(channels_last=True, **options)` traced without code
    generation (asserting no graph breaks): the whole decode and the stream of two 3-latent chunks.
    Returns (eager, whole, the streaming decoder, its chunks concatenated)."""
    from torch._dynamo.utils import counters

    expected = model.decode(latents, plan)
    torch._dynamo.reset()
    counters.clear()
    try:
        compile_vae_decoder(model, backend="eager", channels_last=True, **options)
        whole = model.decode(latents, plan)
        stream = model.streaming_decoder(plan)
        pieces = torch.cat([stream.decode(chunk) for chunk in latents.split([3, 3], dim=2)], dim=2)
        assert not counters["graph_break"]
    finally:
        torch._dynamo.reset()
    return expected, whole, stream, pieces


@pytest.mark.parametrize("plan", [DecodePlan(latents_per_cell=2, slice_bytes=None),
                                  DecodePlan(slice_bytes=2**12, ring_past=True)], ids=["cells", "one-frame-rings"])
def test_compiled_decoder_with_tap_products_head(plan: DecodePlan, monkeypatch) -> None:
    """`compile_vae_decoder(tap_products=True)` traced on the CPU (forced onto the tiny head): no
    graph breaks, the decode is eager's up to fp32 rounding, chunks concatenate bit for bit to the
    whole decode (also chunks ending inside a cell, decoded on cache copies), and the head's cache
    entry is its partial sums."""
    monkeypatch.setattr(TapProductsConv3d, "pays", staticmethod(lambda conv: True))
    model = random_vae(TRACED, seed=11)
    expected, whole, stream, pieces = _traced_decode(model, randn(1, 48, 6, 2, 3, seed=46), plan, tap_products=True)
    head = model.decoder.head[-1]
    assert type(head) is TapProductsConv3d and stream.cache.get(head).dtype == torch.float32
    assert torch.equal(pieces, whole)
    assert_fp32_close(whole, expected)


def test_inductor_runs_tap_products_as_one_gemm_and_one_sum() -> None:
    """A compiled one-frame head step (CPU inductor, bf16, channels-last, as on the GPU): SiLU, one
    GEMM, and one fused kernel that pads, sums the shifted products with the cached partial sums and
    writes the output and the next partial sums; its error against float64 is the bf16 conv's."""
    import re

    from torch._inductor.utils import run_and_get_code

    conv = randomize_(CausalConv3d(64, 12, 3), seed=62).bfloat16().requires_grad_(False)
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    x = randn(1, 64, 4, 16, 24, seed=63).bfloat16().contiguous(memory_format=torch.channels_last_3d)
    silu = F.silu(x.double())
    reference = F.conv3d(F.pad(silu, (1, 1, 1, 1, 2, 0)), conv.weight.double(), conv.bias.double())
    cudnn_like = F.conv3d(F.pad(F.silu(x), (1, 1, 1, 1, 2, 0)), conv.weight, conv.bias).double()
    conv.__class__ = TapProductsConv3d
    torch._dynamo.reset()
    try:
        step = torch.compile(lambda frame, cache: conv(F.silu(frame), cache), dynamic=False)
        cache = CausalCache()
        outputs = [step(x[:, :, t:t + 1], cache) for t in range(3)]
        out, code = run_and_get_code(step, x[:, :, 3:], cache)
        outputs.append(out)
    finally:
        torch._dynamo.reset()
    code = "\n".join(code)
    kernels = set(re.findall(r"\b(cpp_fused_\w+) = ", code))
    assert code.count("extern_kernels.mm(") == 1 and len(kernels) == 2, code
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    scale = reference.abs().max()
    error = (torch.cat(outputs, dim=2).double() - reference).abs().max() / scale
    assert error <= 2 * (cudnn_like - reference).abs().max() / scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_matmul_attention_is_the_attention_block(dtype: torch.dtype) -> None:
    """`MatmulAttentionBlock` (GEMMs around an fp32 softmax) computes `AttentionBlock` (SDPA): equal
    in float64; in bf16 no further from the float64 result than SDPA's bf16 is (plus a little)."""
    block = randomize_(AttentionBlock(32), seed=64).requires_grad_(False)
    x = randn(2, 32, 3, 5, 6, seed=65) * 3
    exact = block.double()(x.double())
    block = block.to(dtype)
    sdpa = block(x.to(dtype)).double()
    names = list(block.state_dict())
    block.__class__ = MatmulAttentionBlock
    assert list(block.state_dict()) == names
    actual = block(x.to(dtype)).double()
    if dtype == torch.float64:
        torch.testing.assert_close(actual, exact, rtol=1e-12, atol=1e-12)
    else:
        assert (actual - exact).abs().max() <= 1.5 * (sdpa - exact).abs().max() + 1e-3 * exact.abs().max()


def test_compiled_decoder_with_matmul_attention() -> None:
    """`compile_vae_decoder(matmul_attention=True)` traced on the CPU: the middle attention swapped,
    no graph breaks, eager's decode up to fp32 rounding, chunks bit for bit the whole decode."""
    model = random_vae(TRACED, seed=12)
    plan = DecodePlan(latents_per_cell=2, slice_bytes=None)
    expected, whole, _, pieces = _traced_decode(model, randn(1, 48, 6, 2, 3, seed=47), plan, matmul_attention=True)
    assert [type(m) for m in model.decoder.middle] == [ResidualBlock, MatmulAttentionBlock, ResidualBlock]
    assert all(type(m) is AttentionBlock for m in model.encoder.middle if not isinstance(m, ResidualBlock))
    assert matmul_attention_vae_decoder(model) == 0  # once
    assert torch.equal(pieces, whole)
    assert_fp32_close(whole, expected)


def _cell(index: int, fs: int) -> tuple[int, int, int]:
    """Channel offset inside a (t, s, s) cell -> (dt, row, column)."""
    dt, rest = divmod(index, fs * fs)
    return dt, rest // fs, rest % fs


@pytest.mark.parametrize("c_in, c_out, ft, fs, frames", [
    (4, 8, 2, 2, 1), (4, 8, 2, 2, 4), (4, 16, 2, 2, 3), (4, 4, 1, 2, 3), (6, 6, 1, 1, 2)])
def test_avg_down(c_in: int, c_out: int, ft: int, fs: int, frames: int) -> None:
    x = randn(2, c_in, frames, 4, 6, seed=5)
    x_padded = torch.cat([torch.zeros(2, c_in, -frames % ft, 4, 6), x], dim=2)  # zeros in front
    cells = ft * fs * fs
    group = c_in * cells // c_out
    expected = torch.zeros(2, c_out, x_padded.shape[2] // ft, 4 // fs, 6 // fs)
    for o in range(c_out):
        for g in range(group):
            c, offset = divmod(o * group + g, cells)
            dt, row, col = _cell(offset, fs)
            expected[:, o] += x_padded[:, c, dt::ft, row::fs, col::fs] / group
    torch.testing.assert_close(AvgDown3D(c_in, c_out, ft, fs)(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("c_in, c_out, ft, fs", [(8, 8, 2, 2), (8, 4, 1, 2), (8, 16, 2, 2), (4, 2, 2, 2)])
def test_dup_up(c_in: int, c_out: int, ft: int, fs: int, first_step: bool) -> None:
    x = randn(2, c_in, 2, 3, 2, seed=6)
    cells = ft * fs * fs
    repeats = c_out * cells // c_in
    expected = torch.empty(2, c_out, 2 * ft, 3 * fs, 2 * fs)
    for o in range(c_out):
        for offset in range(cells):
            dt, row, col = _cell(offset, fs)
            expected[:, o, dt::ft, row::fs, col::fs] = x[:, (o * cells + offset) // repeats]
    if first_step:  # the first step drops factor_t - 1 leading frames
        expected = expected[:, :, ft - 1:]
    assert torch.equal(DupUp3D(c_in, c_out, ft, fs)(x, first_step), expected)


def test_rms_norm() -> None:
    norm = randomize_(RMSNorm(6), seed=7)
    x = randn(2, 6, 3, 4, 5, seed=8)
    expected = x / x.pow(2).sum(dim=1, keepdim=True).sqrt() * math.sqrt(6) * norm.gamma
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)
    # the official primitive (F.normalize, kept off the CPU where it is ~100x slower): within fp32 rounding
    official = F.normalize(x, dim=1) * math.sqrt(6) * norm.gamma.view(-1, 1, 1, 1)
    torch.testing.assert_close(norm(x), official, rtol=2e-7, atol=2e-7)


def test_attention_is_per_frame_single_head() -> None:
    block = randomize_(AttentionBlock(8), seed=9)
    x = randn(2, 8, 3, 4, 5, seed=10)
    expected = torch.empty_like(x)
    for b in range(2):
        for t in range(3):
            frame = x[b, :, t]  # [C, H, W]
            h = frame / frame.pow(2).sum(0, keepdim=True).sqrt() * math.sqrt(8) * block.norm.gamma
            qkv = torch.einsum("oc,chw->ohw", block.to_qkv.weight[:, :, 0, 0], h) + block.to_qkv.bias[:, None, None]
            q, k, v = qkv.reshape(24, 20).split(8)  # [C, tokens] each
            attn = torch.softmax(q.T @ k / math.sqrt(8), dim=-1)  # [tokens, tokens]
            out = (attn @ v.T).T.reshape(8, 4, 5)
            out = torch.einsum("oc,chw->ohw", block.proj.weight[:, :, 0, 0], out) + block.proj.bias[:, None, None]
            expected[b, :, t] = frame + out
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The first-step rules (reference-systems.md §1.3, pitfall 2).


def test_downsample_first_step_skips_the_temporal_conv() -> None:
    down = randomize_(Downsample(4, temporal=True), seed=11)
    conv2d, time_conv = down.resample[1], down.time_conv

    def spatial(x: torch.Tensor) -> torch.Tensor:  # pad right/bottom, 3x3 stride 2, per frame
        frames = [F.conv2d(F.pad(x[:, :, t], (0, 1, 0, 1)), conv2d.weight, conv2d.bias, stride=2)
                  for t in range(x.shape[2])]
        return torch.stack(frames, dim=2)

    x0, x1, x2 = randn(1, 4, 1, 6, 8, seed=12), randn(1, 4, 4, 6, 8, seed=13), randn(1, 4, 4, 6, 8, seed=14)
    cache = CausalCache()
    y0 = down(x0, cache)
    cache.first_step = False
    y1, y2 = down(x1, cache), down(x2, cache)
    torch.testing.assert_close(y0, spatial(x0), rtol=1e-5, atol=1e-5)  # passed through
    for y, previous, x in ((y1, x0, x1), (y2, x1, x2)):  # previous step's last frame in front, stride 2
        window = torch.cat([spatial(previous)[:, :, -1:], spatial(x)], dim=2)
        expected = F.conv3d(window, time_conv.weight, time_conv.bias, stride=(2, 1, 1))
        assert y.shape[2] == 2
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_upsample_first_step_skips_the_temporal_conv() -> None:
    up = randomize_(Upsample(4, temporal=True), seed=15)
    conv2d, time_conv = up.resample[1], up.time_conv

    def spatial(x: torch.Tensor) -> torch.Tensor:  # nearest 2x, 3x3 conv, per frame
        x = x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
        return torch.stack([F.conv2d(x[:, :, t], conv2d.weight, conv2d.bias, padding=1)
                            for t in range(x.shape[2])], dim=2)

    def doubled(window: torch.Tensor) -> torch.Tensor:  # one frame -> two frames (channel halves)
        pair = F.conv3d(window, time_conv.weight, time_conv.bias)[:, :, -1]
        return torch.stack([pair[:, :4], pair[:, 4:]], dim=2)

    x0, x1, x2 = (randn(1, 4, 1, 3, 5, seed=s) for s in (16, 17, 18))
    zero = torch.zeros_like(x0)
    cache = CausalCache()
    y0 = up(x0, cache, starts_video=True)
    y1, y2 = up(x1, cache, starts_video=False), up(x2, cache, starts_video=False)
    torch.testing.assert_close(y0, spatial(x0), rtol=1e-5, atol=1e-5)
    # step 2 sees zero padding, not x0; step 3 sees x1 (x0 never enters the temporal conv)
    torch.testing.assert_close(y1, spatial(doubled(torch.cat([zero, zero, x1], 2))), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, spatial(doubled(torch.cat([zero, x1, x2], 2))), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Streaming decode.


@pytest.mark.parametrize("split", [[1] * 8, [2, 2, 2], [3, 1, 4], [8], [5, 2]])
def test_streaming_decode_equals_full_decode(vae: WanVAE, latents: torch.Tensor, full_pixels: torch.Tensor,
                                             split: list[int]) -> None:
    decoder = vae.streaming_decoder()
    pieces = [decoder.decode(chunk) for chunk in latents[:, :, :sum(split)].split(split, dim=2)]
    # first chunk of n latents: 1 + 4(n - 1) frames, later chunks 4n
    assert [p.shape[2] for p in pieces] == [4 * split[0] - 3] + [4 * n for n in split[1:]]
    # decoding is causal, so a prefix of the latents gives a prefix of the frames
    assert torch.equal(torch.cat(pieces, dim=2), full_pixels[:, :, :4 * sum(split) - 3])


def test_full_decode_shape_and_range(full_pixels: torch.Tensor, latents: torch.Tensor) -> None:
    B, _, F_, h, w = latents.shape
    assert full_pixels.shape == (B, 3, 4 * F_ - 3, 16 * h, 16 * w)
    assert full_pixels.dtype == torch.float32 and torch.isfinite(full_pixels).all()
    assert 0.05 < full_pixels.std() < 2  # random weights give a non-trivial, unclamped image


def test_streaming_decoders_are_independent(vae: WanVAE, latents: torch.Tensor, full_pixels: torch.Tensor) -> None:
    other = randn(2, 48, 4, 2, 3, seed=20)
    a, b = vae.streaming_decoder(), vae.streaming_decoder()
    pieces_a, pieces_b = [], []
    for chunk_a, chunk_b in zip(latents[:, :, :4].split(2, dim=2), other.split(2, dim=2), strict=True):
        pieces_a.append(a.decode(chunk_a))
        pieces_b.append(b.decode(chunk_b))
    assert torch.equal(torch.cat(pieces_a, dim=2), full_pixels[:, :, :13])
    assert torch.equal(torch.cat(pieces_b, dim=2), vae.decode(other))
    # reset() starts a new video
    a.reset()
    assert torch.equal(a.decode(latents[:, :, :2]), full_pixels[:, :, :5])


def test_streaming_decoder_rejects_a_different_video(vae: WanVAE, latents: torch.Tensor) -> None:
    decoder = vae.streaming_decoder()
    decoder.decode(latents[:1, :, :1])
    with pytest.raises(ValueError, match="reset"):
        decoder.decode(latents[:, :, 1:2])
    with pytest.raises(ValueError, match=r"latents must be \[B, 48, F, h, w\]"):
        vae.decode(latents[:, :16])


def test_decode_in_bfloat16(latents: torch.Tensor, full_pixels: torch.Tensor) -> None:
    vae_bf16 = random_vae(TINY, seed=0, dtype=torch.bfloat16)
    pixels = vae_bf16.decode(latents[:1, :, :2])  # fp32 latents into a bf16 model
    assert pixels.dtype == torch.bfloat16 and vae_bf16.latent_mean.dtype == torch.float32
    torch.testing.assert_close(pixels.float(), full_pixels[:1, :, :5], rtol=0, atol=0.1)


# ----------------------------------------------------------------------------------------------
# The cell decoder against the official per-latent loop (reference-systems.md §1.3, §1.6).


class ReferenceDecoder:
    """The official streaming loop, slow and spelled out from the module's parameters: one latent
    per step; each causal conv keeps the last frames of its input in a slot of a cache list (the
    slot index restarts every step); the first step skips the temporal upsample convs (which then
    see zero padding at the second step) and the shortcuts drop their first frames. The same
    primitives as the model (F.conv3d with the same arguments), so the per-latent plan must equal
    it bit for bit when both take PyTorch's default CPU conv kernels."""

    def __init__(self, vae: WanVAE) -> None:
        self.vae, self.slots, self.first = vae, [], True

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.vae.denormalize(latents).to(self.vae.dtype)
        frames = [self.step(x[:, :, i:i + 1]) for i in range(x.shape[2])]
        return unpatchify(torch.cat(frames, dim=2))

    def step(self, latent: torch.Tensor) -> torch.Tensor:
        self.slot = 0
        dec = self.vae.decoder
        x = self.causal(F.conv3d(latent, self.vae.conv2.weight, self.vae.conv2.bias), dec.conv1)
        x = self.residual(self.attention(self.residual(x, dec.middle[0]), dec.middle[1]), dec.middle[2])
        for stage in dec.upsamples:
            stage_input = x
            for block in stage.upsamples:
                x = self.upsample(x, block) if isinstance(block, Upsample) else self.residual(x, block)
            if stage.shortcut is not None:
                x = x + self.dup_up(stage_input, stage.shortcut)
        x = self.causal(F.silu(self.rms(x, dec.head[0])), dec.head[2])
        self.first = False
        return x

    def causal(self, x: torch.Tensor, conv: nn.Conv3d, zero_past: bool = False) -> torch.Tensor:
        kt, kh, kw = conv.weight.shape[2:]
        if self.slot == len(self.slots):
            self.slots.append(None)
        past = self.slots[self.slot]
        if past is None or zero_past:
            past = torch.zeros_like(x[:, :, :1]).repeat(1, 1, kt - 1, 1, 1)
        window = torch.cat([past, x], dim=2)
        self.slots[self.slot] = window[:, :, -(kt - 1):]
        self.slot += 1
        return F.conv3d(window, conv.weight, conv.bias, padding=(0, kh // 2, kw // 2))

    @staticmethod
    def rms(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        # the model's primitive on each device: F.normalize on a GPU, on the CPU the same math spelled
        # out (equal to F.normalize within an ulp: test_rms_norm; an ulp breaks the bitwise tests)
        if x.device.type == "cpu":
            normed = x / x.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
        else:
            normed = F.normalize(x, dim=1)
        return normed * (math.sqrt(x.shape[1]) * norm.gamma.view(-1, 1, 1, 1))

    def residual(self, x: torch.Tensor, block: nn.Module) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = block.residual
        h = self.causal(F.silu(self.rms(x, norm1)), conv1)
        h = self.causal(F.silu(self.rms(h, norm2)), conv2)
        shortcut = x if isinstance(block.shortcut, nn.Identity) else F.conv3d(x, block.shortcut.weight,
                                                                              block.shortcut.bias)
        return h + shortcut

    def attention(self, x: torch.Tensor, block: AttentionBlock) -> torch.Tensor:
        B, C, T, H, W = x.shape
        qkv = F.conv3d(self.rms(x, block.norm), block.to_qkv.weight.unsqueeze(2), block.to_qkv.bias)
        q, k, v = qkv.permute(0, 2, 3, 4, 1).reshape(B * T, 1, H * W, 3 * C).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v).reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3)
        return x + F.conv3d(out, block.proj.weight.unsqueeze(2), block.proj.bias)

    def upsample(self, x: torch.Tensor, up: Upsample) -> torch.Tensor:
        if up.time_conv is not None:
            if self.first:  # skipped; its slot stays empty, so the next step pads with zeros
                if self.slot == len(self.slots):
                    self.slots.append(None)
                self.slot += 1
            else:
                pair = self.causal(x, up.time_conv)
                B, C2, T, H, W = pair.shape
                x = torch.stack([pair[:, :C2 // 2], pair[:, C2 // 2:]], dim=3).reshape(B, C2 // 2, 2 * T, H, W)
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact")
        conv = up.resample[1]
        return F.conv3d(x, conv.weight.unsqueeze(2), conv.bias, padding=(0, 1, 1))

    def dup_up(self, x: torch.Tensor, dup: DupUp3D) -> torch.Tensor:
        ft, fs = dup.factor_t, dup.factor_s
        B, _, T, H, W = x.shape
        x = x.repeat_interleave(dup.repeats, dim=1).reshape(B, dup.out_channels, ft, fs, fs, T, H, W)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(B, dup.out_channels, T * ft, H * fs, W * fs)
        return x[:, :, ft - 1:] if self.first else x


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to fp32 rounding: max |difference| within `rel` of the largest value."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    error, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert error <= rel * scale, f"max |diff| {error:.3g} > {rel} x max |value| {scale:.3g}"


# Up stages 1-3 of the tiny VAE at 2 x 3 latents have 98304 B per input frame: 2-frame slices.
SLICED = DecodePlan(slice_bytes=2 * 98304)


def test_per_latent_plan_is_the_official_loop_bit_for_bit(vae: WanVAE, latents: torch.Tensor) -> None:
    # PyTorch's default CPU conv kernels on both sides (our oneDNN routing is a kernel choice)
    with torch.backends.mkldnn.flags(enabled=False):
        expected = ReferenceDecoder(vae).decode(latents[:, :, :5])
        assert torch.equal(vae.decode(latents[:, :, :5], PER_LATENT_PLAN), expected)


@pytest.fixture(scope="module")
def mid_vae() -> WanVAE:
    return random_vae(MID, seed=3)


@pytest.mark.parametrize("config, plan", [
    ("tiny", DecodePlan()), ("tiny", SLICED), ("tiny", DecodePlan(latents_per_cell=3, subpixel_upsample=False)),
    ("mid", DecodePlan()),
], ids=["tiny-default", "tiny-sliced", "tiny-cells_of_3", "mid-default"])
def test_cell_decoder_equals_the_official_loop(vae: WanVAE, mid_vae: WanVAE, config: str, plan: DecodePlan) -> None:
    model = vae if config == "tiny" else mid_vae
    latents = randn(1, 48, 7, 2, 3, seed=30) if config == "tiny" else randn(1, 48, 6, 3, 4, seed=31)
    expected = ReferenceDecoder(model).decode(latents)
    assert_fp32_close(model.decode(latents, plan), expected)


@pytest.mark.parametrize("plan, split", [
    (DecodePlan(), [1] * 8), (SLICED, [1, 3, 4]), (SLICED, [5, 3]), (DecodePlan(latents_per_cell=3), [2, 2, 4]),
], ids=["default-ones", "sliced-1_3_4", "sliced-5_3", "cells_of_3-2_2_4"])
def test_any_chunking_concatenates_bit_for_bit(vae: WanVAE, plan: DecodePlan, split: list[int]) -> None:
    """Chunks ending inside cells (padded, then recomputed) give the same bits as one call."""
    latents = randn(1, 48, 8, 2, 3, seed=32)
    full = vae.decode(latents, plan)
    decoder = vae.streaming_decoder(plan)
    pieces = [decoder.decode(chunk) for chunk in latents.split(split, dim=2)]
    assert [p.shape[2] for p in pieces] == [4 * split[0] - 3] + [4 * n for n in split[1:]]
    assert torch.equal(torch.cat(pieces, dim=2), full)


def test_slicing_caps_the_frames_per_call_and_changes_only_rounding(mid_vae: WanVAE) -> None:
    latents = randn(1, 48, 8, 3, 4, seed=33)
    seen: list[tuple[int, int]] = []
    hooks = [stage.register_forward_pre_hook(lambda m, args, i=i: seen.append((i, args[0].shape[2])))
             for i, stage in enumerate(mid_vae.decoder.upsamples)]
    try:
        whole = mid_vae.decode(latents, DecodePlan(slice_bytes=None))
        assert sorted(set(seen)) == [(0, 4), (1, 7), (1, 8), (2, 13), (2, 16), (3, 13), (3, 16)]
        seen.clear()
        # the widest tensor per input frame of stages 1-3 is 393216 B here: 2 frames per slice
        sliced = mid_vae.decode(latents, DecodePlan(slice_bytes=800_000))
    finally:
        for hook in hooks:
            hook.remove()
    assert max(frames for stage, frames in seen if stage == 3) == 2
    assert sum(frames for stage, frames in seen if stage == 3) == 29
    assert_fp32_close(sliced, whole)


def test_slices_sit_on_the_later_cells_grid(vae: WanVAE) -> None:
    """The first cell's slices end where a later cell's slices would: its first slice is short
    by the frames the video's first latent does not have, every other slice is full."""
    sizes: dict[int, list[int]] = {0: [], 1: [], 2: [], 3: []}
    hooks = [stage.register_forward_pre_hook(lambda m, args, i=i: sizes[i].append(args[0].shape[2]))
             for i, stage in enumerate(vae.decoder.upsamples)]
    try:  # the widest tensor per input frame of stages 1-3 here is 98304 B: 4 frames per slice
        vae.decode(randn(1, 48, 8, 2, 3, seed=34), DecodePlan(slice_bytes=4 * 98304))
    finally:
        for hook in hooks:
            hook.remove()
    assert sizes[0] == [4, 4]  # whole cells at latent resolution
    assert sizes[1] == [3, 4, 4, 4]  # 7 frames (a later cell's 8 less 1), then 8, 4 per slice
    assert sizes[2] == sizes[3] == [1, 4, 4, 4] + [4] * 4  # 13 frames (16 less 3), then 16


@pytest.mark.parametrize("temporal", [True, False])
def test_subpixel_upsample_equals_nearest_then_conv(temporal: bool) -> None:
    up = randomize_(Upsample(6, temporal=temporal), seed=35)
    x = randn(2, 6, 3, 5, 7, seed=36)
    expected = up(x, CausalCache(), starts_video=True)
    assert_fp32_close(up(x, CausalCache(), starts_video=True, subpixel=True), expected, rel=1e-6)
    weight = up.resample[1].weight  # phase (a, b) kernel entry (r, s) sums the 3x3 taps it covers
    phases = subpixel_weight(weight).view(2, 2, 6, 6, 2, 2)
    torch.testing.assert_close(phases[0, 0, :, :, 0, 0], weight[:, :, 0, 0], rtol=0, atol=0)
    torch.testing.assert_close(phases[0, 1, :, :, 1, 0], weight[:, :, 1:, :2].sum((-1, -2)), rtol=0, atol=1e-6)
    torch.testing.assert_close(phases[1, 1, :, :, 0, 1], weight[:, :, :2, 2].sum(-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_subpixel_interleave_is_eagers_copy_in_the_weights_layout(channels_last: bool, monkeypatch) -> None:
    """The expression `torch.compile` traces for the phase interleave moves the same values as
    eager's writes into a buffer (a pure copy: bit for bit), and comes out in the weights' layout
    without a conversion of its own (channels-last: a permuted view of the stacked result)."""
    up = randomize_(Upsample(6, temporal=False), seed=46)
    if channels_last:
        up.resample[1].to(memory_format=torch.channels_last)
    x = randn(2, 6, 3, 5, 7, seed=47)
    expected = up(x, CausalCache(), starts_video=True, subpixel=True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = up(x, CausalCache(), starts_video=True, subpixel=True)
    assert torch.equal(traced, expected)
    assert traced.is_contiguous(memory_format=torch.channels_last_3d) == channels_last
    assert traced.is_contiguous() != channels_last


def test_upsample_on_a_slice_equals_frame_steps() -> None:
    """The first-frame rule inside a multi-frame slice: frame 0 passes, frame 1 sees zeros."""
    up = randomize_(Upsample(4, temporal=True), seed=37)
    x = randn(1, 4, 4, 3, 5, seed=38)
    stepped, cache = [], CausalCache()
    for t in range(4):
        stepped.append(up(x[:, :, t:t + 1], cache, starts_video=t == 0))
    assert_fp32_close(up(x, CausalCache(), starts_video=True), torch.cat(stepped, dim=2), rel=1e-6)


def test_decode_plan_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="latents_per_cell must be a positive integer"):
        DecodePlan(latents_per_cell=0)
    with pytest.raises(ValueError, match="slice_bytes must be a positive integer or None"):
        DecodePlan(slice_bytes=0)
    with pytest.raises(ValueError, match="ring_past must be True or False"):
        DecodePlan(ring_past="yes")


def test_cell_decoder_in_bfloat16(latents: torch.Tensor) -> None:
    # the shapes widths (decoder 64 .. 16): bf16 convs are slow on a CPU (tiny's took 27 s, this 7 s)
    vae_bf16 = random_vae(VAEConfig.preset("shapes"), seed=0, dtype=torch.bfloat16)
    new, old = vae_bf16.decode(latents[:1, :, :6]), vae_bf16.decode(latents[:1, :, :6], PER_LATENT_PLAN)
    assert new.dtype == torch.bfloat16
    torch.testing.assert_close(new.float(), old.float(), rtol=0, atol=0.05)


def test_channels_last_decoder_keeps_its_layout_and_values() -> None:
    model = random_vae(TINY, seed=4)
    latents = randn(1, 48, 5, 2, 3, seed=39)
    expected = model.decode(latents)
    channels_last_vae_decoder(model)
    layouts = []
    hook = model.decoder.upsamples[3].register_forward_pre_hook(
        lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last_3d)))
    try:
        actual = model.decode(latents)
    finally:
        hook.remove()
    assert layouts and all(layouts)  # every up stage output stayed channels-last
    assert_fp32_close(actual, expected)
    # the causal cache too, whatever layout a conv's input came in (the latents, a one-frame slice):
    # inductor builds each padded input in its past's layout (docs/BENCHMARKS.md, 2026-12-07)
    stream = model.streaming_decoder(DecodePlan(slice_bytes=2**14))
    pieces = [stream.decode(chunk) for chunk in latents.split([2, 3], dim=2)]
    cached = [t for t in stream.cache._frames.values() if t is not None]
    assert len(cached) > 20
    assert all(t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous() for t in cached)
    assert_fp32_close(torch.cat(pieces, dim=2), expected)


def test_frozen_subpixel_kernels_decode_the_same_bits() -> None:
    """`Upsample.freeze_subpixel` (what `compile_vae_decoder` does): the phase kernels computed
    once give the bits of computing them per call, and stay out of the state dict."""
    model = random_vae(TINY, seed=8)
    latents = randn(1, 48, 5, 2, 3, seed=44)
    names = list(model.state_dict())
    expected = model.decode(latents)
    upsamples = [m for m in model.decoder.modules() if isinstance(m, Upsample)]
    for module in upsamples:
        module.freeze_subpixel()
    assert len(upsamples) == 3 and list(model.state_dict()) == names
    assert torch.equal(model.decode(latents), expected)
    with torch.no_grad():  # frozen means frozen: a later weight change is not seen
        upsamples[0].resample[1].weight.mul_(2)
    assert torch.equal(model.decode(latents), expected)


@pytest.mark.parametrize("by_taps", [conv3d_by_frame_taps, conv3d_by_stacked_taps])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch, frames, kernel", [(1, 3, (3, 3, 3)), (2, 5, (3, 3, 3)), (1, 4, (2, 1, 3))])
def test_conv3d_by_frame_taps_equals_conv3d(by_taps, channels_last: bool, batch: int, frames: int,
                                            kernel: tuple[int, int, int]) -> None:
    kt, kh, kw = kernel
    x, weight, bias = randn(batch, 6, frames + kt - 1, 5, 7, seed=40), randn(4, 6, *kernel, seed=41), randn(4, seed=42)
    padding = (0, kh // 2, kw // 2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
        weight = weight.contiguous(memory_format=torch.channels_last_3d)
    expected = F.conv3d(x.double(), weight.double(), bias.double(), padding=padding)
    actual = by_taps(x, weight, bias, padding)
    assert actual.is_contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    assert_fp32_close(actual, expected.float())


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_frame_taps_decoder_keeps_names_and_values(channels_last: bool, stacked: bool) -> None:
    model = random_vae(TINY, seed=5)
    latents = randn(1, 48, 6, 2, 3, seed=43)
    expected = model.decode(latents)
    names = list(model.state_dict())
    if channels_last:
        channels_last_vae_decoder(model)
    frame_taps_vae_decoder(model, stacked=stacked)
    kind = StackedTapsConv3d if stacked else FrameTapsConv3d
    swapped = [m for m in model.decoder.modules() if isinstance(m, (FrameTapsConv3d, StackedTapsConv3d))]
    assert swapped and all(type(m) is kind and m.kernel_size[0] == 3 for m in swapped)
    assert not any(isinstance(m, (FrameTapsConv3d, StackedTapsConv3d)) for m in model.encoder.modules())
    assert list(model.state_dict()) == names
    assert_fp32_close(model.decode(latents), expected)
    stream = model.streaming_decoder()  # the causal cache goes through the swapped convolutions too
    assert_fp32_close(torch.cat([stream.decode(c) for c in latents.split([1, 3, 2], dim=2)], dim=2), expected)


@pytest.mark.parametrize("frame_taps", [None, "per-tap", "stacked"])
def test_compiled_decoder_captures_each_unit_once_per_kind(frame_taps: str | None) -> None:
    """The GPU path's torch.compile, traced on the CPU without code generation: no graph breaks,
    two graphs per unit (start of the video, steady state), the same bits as eager."""
    from torch._dynamo.utils import counters

    model = random_vae(TRACED, seed=5)
    if frame_taps:
        frame_taps_vae_decoder(model, stacked=frame_taps == "stacked")
    latents = randn(1, 48, 4, 2, 3, seed=40)
    plan = DecodePlan(latents_per_cell=2, slice_bytes=None)
    torch._dynamo.reset()
    counters.clear()
    with torch.backends.mkldnn.flags(enabled=False):  # the same CPU conv kernels traced and eager
        expected = model.decode(latents, plan)
        compile_vae_decoder(model, backend="eager")
        decoder = model.streaming_decoder(plan)
        pieces = [decoder.decode(chunk) for chunk in latents.split([1, 3], dim=2)]
    assert torch.equal(torch.cat(pieces, dim=2), expected)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 2 * 6  # low_res, 4 stages, head
    torch._dynamo.reset()


def test_compiled_one_frame_steps_keep_rings() -> None:
    """The 720p plan's shape on the tiny VAE: one-frame slices in every stage, traced on the CPU
    without code generation. With `DecodePlan.ring_past` the widest layers keep rings, there are no
    graph breaks, the decode is eager's up to fp32 rounding (the taps sum in another order), and
    chunks that end inside a cell (cache copies) concatenate bit for bit to the whole decode."""
    model = random_vae(TRACED, seed=9)
    plan = DecodePlan(slice_bytes=2**12, ring_past=True)
    expected, whole, stream, pieces = _traced_decode(model, randn(1, 48, 6, 4, 4, seed=45), plan)
    rings = [entry[0] for entry in stream.cache._frames.values() if isinstance(entry, tuple)]
    assert len(rings) >= 3 and all(r.is_contiguous(memory_format=torch.channels_last_3d) for r in rings)
    assert torch.equal(pieces, whole)
    assert_fp32_close(whole, expected)


@pytest.mark.parametrize("channels_last", [None, False, True])
def test_compiled_decoder_layout(channels_last: bool | None) -> None:
    """`compile_vae_decoder` stores the conv weights channels-last when asked (None: on a GPU
    only, so never here), and channels-last it decodes what eager channels-first does. (Traced here
    the CPU's reference conv3d returns channels-first activations; cuDNN follows the weights'
    layout: tests/test_gpu_vae.py.) The compiled channels-first decode (False, and None here) is
    checked bit for bit by test_compiled_decoder_captures_each_unit_once_per_kind."""
    model = random_vae(TRACED, seed=7)
    latents = randn(1, 48, 4, 2, 3, seed=42)
    plan = DecodePlan(latents_per_cell=2, slice_bytes=None)
    expected = model.decode(latents, plan) if channels_last else None
    torch._dynamo.reset()
    compile_vae_decoder(model, backend="eager", channels_last=channels_last)
    convs = [m.weight for m in model.decoder.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(convs) > 10
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    assert all(w.is_contiguous(memory_format=layout) for w in convs)
    assert any(not w.is_contiguous() for w in convs) == bool(channels_last)
    if not channels_last:
        torch._dynamo.reset()
        return
    try:
        actual = model.decode(latents, plan)
    finally:
        torch._dynamo.reset()
    assert_fp32_close(actual, expected)


@pytest.mark.parametrize("frames", [1, 9])
def test_compiled_encoder_captures_the_first_and_the_steady_step(frames: int) -> None:
    """train-ar's `runtime.compile: always` path, traced on the CPU without code generation: the
    whole encoder step is one graph (no breaks), one for frame 0 and one for the 4-frame steps,
    and the latents are the eager ones bit for bit."""
    from torch._dynamo.utils import counters

    model = random_vae(TRACED, seed=6)
    video = randn(2, 3, frames, 32, 48, seed=41).clamp(-1, 1)
    torch._dynamo.reset()
    counters.clear()
    with torch.backends.mkldnn.flags(enabled=False):
        expected = model.encode(video)
        compile_vae_encoder(model, backend="eager")
        got = model.encode(video)
    assert torch.equal(got, expected)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == (1 if frames == 1 else 2)
    torch._dynamo.reset()


def test_compiled_720p_decoder_captures_few_graphs_once() -> None:
    """The 5B decoder compiled for 720p (`compile_vae_decoder`, channels-last, traced on `meta`
    without code generation): ring steps capture one graph per ring slot, so the up stages' shared
    code holds the most graphs; they stay well inside `VAE_RECOMPILE_LIMIT` (past it dynamo would
    run a unit eagerly), all are captured in the first chunk, and every ring rotation is frozen."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    with torch.device("meta"):
        model = WanVAE(VAEConfig.preset("wan2.2")).to(torch.bfloat16).requires_grad_(False)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    try:
        compile_vae_decoder(model, backend="eager", channels_last=True)
        decoder = model.streaming_decoder()
        with torch.no_grad():
            for _ in range(3):
                decoder.decode(torch.empty(1, 48, 8, 44, 80, device="meta", dtype=torch.bfloat16))
                graphs.append(counters["stats"]["unique_graphs"])
        entries = {fn.__qualname__: len(_debug_get_cache_entry_list(fn.__code__))
                   for fn in (UpStage.forward, Decoder.low_res, Decoder.head_out)}
    finally:
        torch._dynamo.reset()
    assert not counters["graph_break"]
    assert graphs[0] == graphs[-1], graphs  # the steady chunks capture nothing new
    assert entries["UpStage.forward"] > 4 * 2 and max(entries.values()) <= VAE_RECOMPILE_LIMIT // 2, entries
    convs = [m for m in model.decoder.modules() if type(m) is CausalConv3d and m.context]
    frozen = [hasattr(m, "ring_taps_0") for m in convs]
    assert frozen == [m.weight.nbytes <= RING_TAPS_MAX_BYTES for m in convs] and sum(frozen) == 15


@pytest.mark.parametrize("cap", [0, 2**19, None])
def test_compile_freezes_the_ring_rotations_of_the_convolutions_under_the_cap(cap: int | None) -> None:
    """`compile_vae_decoder(ring_taps_max_bytes=)` (None here: the default `RING_TAPS_MAX_BYTES`)
    keeps the rotations of exactly the causal convolutions whose weights fit the cap; 0 keeps none
    (`vae_decode.py -gathertaps`). The state dict stays the checkpoint's."""
    model = random_vae(TRACED, seed=7)
    names = set(model.state_dict())
    torch._dynamo.reset()
    try:
        compile_vae_decoder(model, backend="eager", **({} if cap is None else {"ring_taps_max_bytes": cap}))
    finally:
        torch._dynamo.reset()
    limit = RING_TAPS_MAX_BYTES if cap is None else cap
    convs = [m for m in model.decoder.modules() if type(m) is CausalConv3d and m.context]
    frozen = [all(hasattr(m, f"ring_taps_{n}") for n in range(m.context + 1)) for m in convs]
    assert frozen == [m.weight.nbytes <= limit for m in convs]
    assert (0 < sum(frozen) < len(convs)) if cap == 2**19 else sum(frozen) == (0 if cap == 0 else len(convs))
    assert set(model.state_dict()) == names


def test_meta_decode_at_720p_stays_within_its_memory_budget() -> None:
    """The memory cap at the real size, without a GPU: decode 720p bf16 latents on `meta` and
    track the bytes of live tensors (activations and the feature cache; the weights are extra)."""
    with torch.device("meta"):
        model = WanVAE(VAEConfig.preset("wan2.2")).to(torch.bfloat16).requires_grad_(False)
    latents = torch.empty(1, 48, 8, 44, 80, device="meta", dtype=torch.bfloat16)
    peaks = {}
    for name, plan in (("capped", DecodePlan()), ("per_latent", PER_LATENT_PLAN)):
        with torch.no_grad(), LiveBytes() as tracker:
            model.decode(latents, plan)
        peaks[name] = tracker.peak / 2**30
    # 3.1 GiB of it is the feature cache (2 frames per causal conv), needed by every plan
    assert peaks["capped"] < 4.6 and peaks["capped"] < peaks["per_latent"] - 1.5, peaks


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once while the mode is on, counted as operations
    create them (a storage leaves the count when it is freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage._cdata not in self._sizes:
                    self._sizes[storage._cdata] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, storage._cdata)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


# ----------------------------------------------------------------------------------------------
# Encode.


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    return torch.rand(2, 3, 9, 32, 48, generator=torch.Generator().manual_seed(21)) * 2 - 1


def test_encode_is_causal(vae: WanVAE, video: torch.Tensor) -> None:
    latents = vae.encode(video)
    assert latents.shape == (2, 48, 3, 2, 3) and latents.dtype == torch.float32
    for k in (0, 1):  # the first 1 + 4k frames give the first 1 + k latents, bit for bit
        assert torch.equal(vae.encode(video[:, :, :1 + 4 * k]), latents[:, :, :1 + k])
    assert latents.std() > 0.05


def test_encode_normalisation(vae: WanVAE, video: torch.Tensor) -> None:
    normalised = vae.encode(video[:, :, :5])
    raw = vae.encode(video[:, :, :5], normalize=False)
    mean, std = torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1), torch.tensor(LATENT_STD).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(raw, normalised * std + mean, rtol=1e-5, atol=1e-5)
    # decode un-normalises with the same constants before its first conv
    torch.testing.assert_close(vae.denormalize(normalised), raw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 4, 32, 32), r"1 \+ 4k"),
    ((1, 3, 6, 32, 32), r"1 \+ 4k"),
    ((1, 3, 5, 40, 32), "multiples of 16"),
    ((1, 3, 5, 32, 24), "multiples of 16"),
    ((1, 4, 5, 32, 32), r"\[B, 3, T, H, W\]"),
    ((3, 5, 32, 32), r"\[B, 3, T, H, W\]"),
])
def test_encode_rejects_bad_shapes(vae: WanVAE, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vae.encode(torch.zeros(shape))


# ----------------------------------------------------------------------------------------------
# Weights.


def test_random_vae_is_deterministic() -> None:
    a, b, c = random_vae(TINY, seed=4), random_vae(TINY, seed=4), random_vae(TINY, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.decoder.conv1.weight, c.decoder.conv1.weight)
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_round_trip(vae: WanVAE, latents: torch.Tensor, full_pixels: torch.Tensor, tmp_path, suffix: str) -> None:
    path = tmp_path / f"Wan2.2_VAE{suffix}"
    state = vae.state_dict()
    if suffix == ".pth":
        torch.save(state, path)  # the official format: a plain fp32 state dict
    else:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    loaded = load_vae(path, TINY)
    assert list(loaded.state_dict()) == list(state)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.decode(latents[:, :, :2]), full_pixels[:, :, :5])
    loaded_bf16 = load_vae(path, TINY, dtype=torch.bfloat16)
    assert loaded_bf16.dtype == torch.bfloat16 and loaded_bf16.latent_std.dtype == torch.float32


def test_load_rejects_mismatched_files(vae: WanVAE, tmp_path) -> None:
    state = dict(vae.state_dict())
    state["decoder.head.2.bias"] = torch.zeros(13)
    torch.save(state, tmp_path / "wrong_shape.pth")
    with pytest.raises(UserError, match=r"wrong shape \(decoder\.head\.2\.bias"):
        load_vae(tmp_path / "wrong_shape.pth", TINY)
    del state["decoder.head.2.bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(UserError, match=r"missing \(decoder\.head\.2\.bias"):
        load_vae(tmp_path / "missing.pth", TINY)
    with pytest.raises(UserError, match="wrong shape"):  # a tiny file is not the default wan2.2 VAE
        load_vae(tmp_path / "missing.pth")
