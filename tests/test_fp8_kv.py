"""The FP8 KV cache (`quant/fp8_kv.py`, `--kv-precision fp8`): the running per-head scale and its
re-encoding against a slow per-element reference, codes a scale did not touch stay bit for bit,
a whole streaming run (rolls, recaches, a shot cut, a prompt switch) against the bf16 cache, the
hand-off of stored codes to an FP8 kernel (FA3's adapter over a fake package), reset, memory."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from core.config import StreamConfig
from core.kv_cache import CacheLayout, KVCache, LayerKV
from core.pipeline import generate_latents, stream_latents
from quant.fp8 import AMAX_FLOOR, E4M3_MAX
from quant.fp8_attention import (
    BACKENDS,
    FA3FP8Attention,
    attention_inputs,
    exact_attention,
    fp8_attention_over_codes,
    fp8_attention_reference,
    quantize_heads,
)
from quant.fp8_attention import sqnr_db as attention_sqnr
from quant.fp8_kv import FLOOR_SCALE, FP8LayerKV, decode, fp8_storage, write_step
from quant.kv import WindowBuffer, nvfp4_storage
from tests.conftest import text_context, tiny_model
from tests.test_quant_kv import STREAM, inputs, sqnr_db

FP8 = torch.float8_e4m3fn
# Measured on these runs (tiny model, seeds 0 / 3): final-latent SQNR against the bf16 cache 56.8 /
# 57.5 dB; the NVFP4 cache on the same runs 51.9 / 51.8 dB.
MIN_LATENT_SQNR_DB = 54.0


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def slow_write(codes: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, start: int) -> None:
    """`write_step` element by element for every (batch, head): the obvious form."""
    batch, _, heads, _ = codes.shape
    for b in range(batch):
        for h in range(heads):
            amax = max(x[b, :, h].float().abs().max().item(), AMAX_FLOOR)
            wanted = torch.tensor(amax, dtype=torch.float32).div(E4M3_MAX).item()
            power = 2.0 ** math.ceil(math.log2(wanted))  # the smallest power of two >= amax / 448
            power = power / 2 if power / 2 >= wanted else power  # (guards log2's rounding)
            new = torch.tensor(max(scale[b, h].item(), power), dtype=torch.float32)
            old = scale[b, h].clone()
            if new > old:  # re-encode what is held at the grown scale
                codes[b, :, h] = (codes[b, :, h].float() * (old / new)).to(FP8)
            codes[b, start:start + x.shape[1], h] = (x[b, :, h].float() / new).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
            scale[b, h] = new


@pytest.mark.parametrize("batch,heads", [(1, 3), (2, 2)])
def test_running_scale_and_reencoding_equal_the_slow_reference(batch, heads):
    g = torch.Generator().manual_seed(1)
    capacity, n, d = 24, 6, 8
    codes = torch.zeros(batch, capacity, heads, d, dtype=FP8)
    scale = torch.full((batch, heads), FLOOR_SCALE)
    ref_codes, ref_scale = codes.clone(), scale.clone()
    # amplitudes per write: growth, no growth, growth of one head only, a zero write
    for i, gain in enumerate([1.0, 0.5, 3.0, 0.0, 2.0, 10.0]):
        x = (torch.randn(batch, n, heads, d, generator=g) * gain).to(torch.bfloat16)
        if i == 2:
            x[:, :, 1:] *= 0.1  # only head 0 grows
        start = (i * n) % (capacity - n + 1)
        write_step(codes, scale, x, start)
        slow_write(ref_codes, ref_scale, x, start)
        assert torch.equal(bits(codes), bits(ref_codes)), i
        assert torch.equal(scale, ref_scale), i
    assert scale.min() > FLOOR_SCALE  # every head grew past the floor
    assert FLOOR_SCALE == 2.0**-48


def test_heads_whose_scale_did_not_grow_keep_their_codes_bit_for_bit():
    g = torch.Generator().manual_seed(2)
    codes = torch.zeros(1, 16, 2, 8, dtype=FP8)
    scale = torch.full((1, 2), FLOOR_SCALE)
    write_step(codes, scale, torch.randn(1, 8, 2, 8, generator=g).to(torch.bfloat16), 0)
    before, scale_before = codes.clone(), scale.clone()
    x = torch.randn(1, 8, 2, 8, generator=g)
    x[..., 0, :] *= 5  # head 0 grows, head 1 does not
    x[..., 1, :] *= 1e-3
    write_step(codes, scale, x.to(torch.bfloat16), 8)
    assert torch.equal(bits(codes[:, :8, 1]), bits(before[:, :8, 1])) and scale[0, 1] == scale_before[0, 1]
    assert not torch.equal(bits(codes[:, :8, 0]), bits(before[:, :8, 0])) and scale[0, 0] > scale_before[0, 0]
    # the scales are powers of two, so re-encoding is exact for every normal code (>= 2**-6)
    normal = before[:, :8, 0].float().abs() >= 2**-6
    now, then = decode(codes[:, :8], scale)[:, :, 0], decode(before[:, :8], scale_before)[:, :, 0]
    assert torch.equal(now[normal], then[normal])
    assert torch.all(scale == torch.exp2(torch.log2(scale).round()))


class Mirror:
    """A bf16 `LayerKV` fed the same calls as one FP8 layer: the window the FP8 layer must hold."""

    def __init__(self, layer: FP8LayerKV, spec, device):
        self.layer, self.dense = layer, LayerKV(spec, device)
        update = layer.update_and_attend

        def both(q, k, v):
            self.dense.plan = layer.plan
            self.dense.update_and_attend(q, k, v)
            self.end = layer.plan.write_end
            return update(q, k, v)

        layer.update_and_attend = both


@pytest.mark.parametrize("guidance,batch", [(1.0, 1), (2.0, 2)])
def test_streaming_window_decodes_to_the_bf16_window(guidance, batch):
    """Rolls, evictions, recaches, a pinned shot sink and a prompt switch's re-encoding: after the
    run every held token decodes to the bf16 cache's value within one E4M3 rounding (relative
    2**-4), plus the subnormal steps of re-encodings (< 2**-9 of the final scale in all)."""
    model = tiny_model()
    noise, contexts = inputs(batch)
    mirrors: list[Mirror] = []
    base = fp8_storage()

    def storage(spec, device):
        layer = base(spec, device)
        mirrors.append(Mirror(layer, spec, device))
        return layer

    stream = StreamConfig(**STREAM, guidance_scale=guidance)
    for _ in stream_latents(model, noise, contexts, stream, scene_cuts=[False, False, True, False, False],
                            negative_context=text_context(batch, 50), prompt_switch={3: text_context(batch, 77)}.get,
                            kv_storage=storage):
        pass
    assert len(mirrors) == model.config.num_layers * (2 if guidance != 1.0 else 1)
    for mirror in mirrors:
        layer, end = mirror.layer, mirror.end
        for codes, scale, dense in ((layer.k_codes, layer.k_scale, mirror.dense.k),
                                    (layer.v_codes, layer.v_scale, mirror.dense.v)):
            exact = dense[:, :end].float()
            amax = exact.abs().amax(dim=(1, 3))
            assert torch.all(scale * E4M3_MAX >= amax)  # the scale covers every held token
            step = scale[:, None, :, None]
            assert torch.all((decode(codes[:, :end], scale) - exact).abs() <= exact.abs() * 2**-4 + step * 2**-9)


@pytest.mark.parametrize("seed", [0, 3])
def test_generation_close_to_the_bf16_cache(seed):
    model = tiny_model(seed=seed)
    noise, contexts = inputs(seed=seed)
    stream = StreamConfig(**STREAM)
    exact = generate_latents(model, noise, contexts, stream)
    fp8 = generate_latents(model, noise, contexts, stream, kv_storage=fp8_storage())
    nvfp4 = generate_latents(model, noise, contexts, stream, kv_storage=nvfp4_storage(window=WindowBuffer()))
    assert sqnr_db(fp8, exact) >= MIN_LATENT_SQNR_DB
    assert sqnr_db(fp8, exact) > sqnr_db(nvfp4, exact) + 3  # closer to bf16 than the NVFP4 cache
    assert not torch.equal(fp8, exact)


def test_reset_makes_a_stream_independent_of_the_one_before():
    layout = CacheLayout(capacity=12, tokens_per_frame=2, sink_tokens=4, global_sink_tokens=4)
    g = torch.Generator().manual_seed(4)

    def run(cache, gain):
        outs = []
        for frame in range(0, 8, 2):
            (attend, *_) = cache.begin(frame, 2)
            q, k, v = (torch.randn(1, 4, 2, 8, generator=g) * gain for _ in range(3))
            outs.append(attend(q, k, v))
            cache.commit()
        return torch.cat(outs, 1)

    fresh = KVCache(layout, 1, 1, 2, 8, torch.float32, "cpu", storage=fp8_storage())
    used = KVCache(layout, 1, 1, 2, 8, torch.float32, "cpu", storage=fp8_storage())
    g.manual_seed(9)
    run(used, 50.0)  # a loud stream leaves large scales behind
    used.reset()
    g.manual_seed(4)
    first = run(fresh, 1.0)
    g.manual_seed(4)
    assert torch.equal(run(used, 1.0), first)


def test_fa3_adapter_attends_over_the_stored_codes():
    """`--attention fp8` with the FP8 cache: the kernel gets the stored codes and their per-head
    scales as they are (no re-quantization of the window), the queries quantized per head."""
    seen = []

    def flash_attn_func(q, k, v, softmax_scale, q_descale, k_descale, v_descale):
        assert all(t.dtype == FP8 for t in (q, k, v)) and k_descale.shape == (k.shape[0], k.shape[2])
        assert math.isclose(softmax_scale, q.shape[-1] ** -0.5)
        seen.append((k, k_descale, v, v_descale))
        decoded = [x.float() * s[:, None, :, None] for x, s in ((q, q_descale), (k, k_descale), (v, v_descale))]
        return exact_attention(*decoded).to(torch.bfloat16)

    attention = FA3FP8Attention(SimpleNamespace(flash_attn_func=flash_attn_func))
    layout = CacheLayout(capacity=12, tokens_per_frame=2, sink_tokens=4, global_sink_tokens=4)
    cache = KVCache(layout, 1, 1, 3, 16, torch.bfloat16, "cpu", storage=fp8_storage(attention.attend_cached))
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(5)
    for frame in range(0, 10, 2):  # rolls from the fourth chunk on
        (attend, *_) = cache.begin(frame, 2)
        q, k, v = (torch.randn(1, 4, 3, 16, generator=g).to(torch.bfloat16) for _ in range(3))
        out = attend(q, k, v)
        end = layer.plan.write_end
        k_seen, k_descale, v_seen, v_descale = seen[-1]
        assert k_seen.data_ptr() == layer.k_codes.data_ptr() and k_seen.shape[1] == end
        assert torch.equal(k_descale, layer.k_scale) and torch.equal(v_descale, layer.v_scale)
        q8, q_scale = quantize_heads(q)
        expected = exact_attention(*(x.float() * s[:, None, :, None] for x, s in
                                     ((q8, q_scale), (layer.k_codes[:, :end], layer.k_scale),
                                      (layer.v_codes[:, :end], layer.v_scale))))
        assert torch.equal(out, expected.to(torch.bfloat16))
        cache.commit()


# Measured (32 queries over 4 chunks of 512 keys, the first the sink; 2 heads of 128; FA3's
# numerics; seeds 3 / 4), SQNR against exact attention, per-call quantization -> the FP8 cache:
# random 25.53 -> 25.70 / 25.42 -> 25.45 dB; sink 90 % 24.46 -> 24.64 / 23.76 -> 24.10; sink 90 %
# with logit std 2.5 22.05 -> 22.61 / 21.50 -> 21.51; key offset 4 25.41 -> 25.44 / 25.19 -> 25.32.
@pytest.mark.parametrize("kind,floor", [
    (dict(), 24.5),
    (dict(sink_tokens=512, sink_mass=0.9), 23.5),
    (dict(logit_std=2.5, sink_tokens=512, sink_mass=0.9), 20.5),
    (dict(key_offset=4.0), 24.5),
])
@pytest.mark.parametrize("seed", [3, 4])
def test_fp8_attention_over_the_cache_is_as_accurate_as_per_call_quantization(kind, floor, seed):
    """The running power-of-two scale costs no accuracy against quantizing the whole window per
    call (FA3's per-head scales), on random and sink-heavy inputs streamed chunk by chunk."""
    numerics = BACKENDS["fa3"].numerics
    q, k, v = attention_inputs(32, 2048, 2, seed=seed, **kind)
    exact = exact_attention(q, k, v)
    layout = CacheLayout(capacity=2048, tokens_per_frame=512, sink_tokens=512, global_sink_tokens=512)
    cache = KVCache(layout, 1, 1, 2, 128, torch.bfloat16, "cpu",
                    storage=fp8_storage(lambda q_, k_, v_: fp8_attention_over_codes(q_, k_, v_, numerics)))
    for frame in range(4):
        (attend, *_) = cache.begin(frame, 1)
        out = attend(q, k[:, 512 * frame:512 * (frame + 1)], v[:, 512 * frame:512 * (frame + 1)])
        cache.commit()
    cached = attention_sqnr(exact, out)
    assert cached >= floor
    assert cached >= attention_sqnr(exact, fp8_attention_reference(q, k, v, numerics)) - 0.1


def test_memory_is_half_the_bf16_cache():
    layout = CacheLayout(capacity=880 * 32, tokens_per_frame=880, sink_tokens=880 * 8, global_sink_tokens=880 * 8)
    dense = KVCache(layout, 1, 1, 24, 128, torch.bfloat16, "meta")
    fp8 = KVCache(layout, 1, 1, 24, 128, torch.bfloat16, "meta", storage=fp8_storage())
    assert fp8.nbytes == dense.nbytes // 2 + 2 * 24 * 4  # codes + one fp32 scale per head for k and v



# ----------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): the compiled write equals the plain one bit for bit, and FA3's FP8
# kernel over the stored codes stays within its measured error of exact attention.


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_write_step_equals_the_plain_one_on_cuda():
    from quant.fp8_kv import fast_write_step

    g = torch.Generator(device="cuda").manual_seed(0)
    codes = torch.zeros(1, 4096, 24, 128, dtype=FP8, device="cuda")
    scale = torch.full((1, 24), FLOOR_SCALE, device="cuda")
    ref_codes, ref_scale = codes.clone(), scale.clone()
    for i, gain in enumerate([1.0, 4.0, 0.5, 16.0]):
        # per-head gains: some heads' scales grow at a write, others do not (the Triton re-encoding
        # skips those), and a later write into the same tokens
        heads = torch.rand(24, 1, generator=g, device="cuda") * 8
        x = (torch.randn(1, 1024, 24, 128, generator=g, device="cuda") * gain * heads).to(torch.bfloat16)
        fast_write_step(codes, scale, x, 1024 * i)
        write_step(ref_codes, ref_scale, x, 1024 * i)
        assert torch.equal(bits(codes), bits(ref_codes)) and torch.equal(scale, ref_scale), i
    x = torch.randn(1, 1024, 24, 128, generator=g, device="cuda").to(torch.bfloat16) * 64
    fast_write_step(codes, scale, x, 0)
    write_step(ref_codes, ref_scale, x, 0)
    assert torch.equal(bits(codes), bits(ref_codes)) and torch.equal(scale, ref_scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fa3_over_the_fp8_cache_on_the_gpu():
    from core.errors import UserError
    from quant.fp8_attention import fp8_attention

    try:
        attention = fp8_attention("fa3")
    except UserError as err:
        pytest.skip(str(err))
    q, k, v = attention_inputs(1024, 4096, 4, 128, sink_tokens=512, sink_mass=0.5, seed=1, device="cuda")
    layout = CacheLayout(capacity=4096, tokens_per_frame=1024, sink_tokens=1024, global_sink_tokens=1024)
    cache = KVCache(layout, 1, 1, 4, 128, torch.bfloat16, "cuda", storage=fp8_storage(attention.attend_cached))
    for frame in range(4):
        (attend, *_) = cache.begin(frame, 1)
        out = attend(q, k[:, 1024 * frame:1024 * (frame + 1)], v[:, 1024 * frame:1024 * (frame + 1)])
        cache.commit()
    # FA3 with per-call quantization measured 24-25.5 dB on such inputs (docs/BENCHMARKS.md)
    assert attention_sqnr(exact_attention(q, k, v), out) >= 22.0
