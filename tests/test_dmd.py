"""DMD distillation (core/train/dmd.py) against slow obvious references: the rollout by hand
(full-sequence forwards, the inference cache), its attention rule as an explicit mask, the
gradient routing of the official in-place cache, and the losses written out sample by sample."""

from __future__ import annotations

import math

import pytest
import torch

import core.pipeline as pipeline
import core.train.dmd as dmd
from core.attention import sdpa
from core.config import StreamConfig
from core.kv_cache import CacheLayout, KVCache
from core.pipeline import generate_latents
from core.sampler import FlowUniPCSampler
from core.train.dmd import (
    RolloutKVCache,
    add_noise,
    attended_ranges,
    critic_loss,
    dmd_gradient,
    generator_loss,
    rollout,
    score_timesteps,
    sigma_grid,
)
from core.train.objective import FlowMatchSchedule
from tests.conftest import SMALL_STREAM, text_context, tiny_model

GRID = FlowMatchSchedule(5.0)
S = 16  # tokens per frame of 8x8 latents with the 2x2 patch


def inputs(frames=8, batch=1, seed=0, fpb=2):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, frames, 48, 8, 8, generator=g)
    recache_noise = torch.randn(batch, frames, 48, 8, 8, generator=g)
    contexts = [text_context(batch, seed + 10 * i + 1) for i in range(frames // fpb)]
    return noise, contexts, recache_noise


def shot_offsets(cuts, num_chunks, fpb, stream):
    """Per-frame RoPE shot offset: +shot_rope_offset at every cut after chunk 0."""
    offsets, shot = [], 0
    for c in range(num_chunks):
        shot += bool(cuts and cuts[c] and c > 0)
        offsets += [shot * stream.shot_rope_offset] * fpb
    return torch.tensor(offsets, dtype=torch.float64)


class Recorder:
    """The tiny model, recording every cached forward: (start_frame, x, t, velocity)."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward_chunk(self, x, t, context, **kw):
        v = self.model.forward_chunk(x, t, context, **kw)
        self.calls.append((kw["start_frame"], x.detach().clone(), t.clone(), v.detach().clone()))
        return v


# -- rollout: exit step 0 is one forward per chunk ----------------------------------------------


@torch.no_grad()
def exit_zero_by_hand(model, noise, contexts, stream, cuts, recache_noise):
    """Chunk by chunk with full-sequence teacher-forcing forwards (no cache): the clean half holds
    the recache inputs so far (t = 0), the noisy half the noise at the first sampler timestep;
    chunk c's noisy frames see the clean frames before them and themselves."""
    batch, frames = noise.shape[:2]
    fpb = stream.frames_per_block
    t0 = FlowUniPCSampler(stream.sampling_steps, stream.timestep_shift).timesteps[0]
    s_exit = GRID.t_to_sigma(torch.tensor(float(t0))).double()
    s0 = GRID.t_to_sigma(torch.zeros(()))
    context = torch.stack(contexts, dim=1).flatten(0, 1)
    offsets = shot_offsets(cuts, len(contexts), fpb, stream)
    clean, out = torch.zeros_like(noise), torch.zeros_like(noise)
    for c in range(frames // fpb):
        v = model(noise.transpose(1, 2), torch.full((batch, frames), float(t0)), context,
                  frames_per_block=fpb, clean_x=clean.transpose(1, 2), rope_offset=offsets).transpose(1, 2)
        f = slice(c * fpb, (c + 1) * fpb)
        out[:, f] = (noise[:, f].double() - s_exit * v[:, f].double()).float()
        clean[:, f] = (1 - s0) * out[:, f] + s0 * recache_noise[:, f]
    return out


@pytest.mark.parametrize("batch,cuts", [(1, None), (2, [False, False, True, False]), (1, [False, True, False, True])])
def test_exit_step_zero_is_one_forward_per_chunk(batch, cuts):
    model = tiny_model()
    stream = StreamConfig(**{**SMALL_STREAM, "local_window_frames": 8})  # the window holds all 8 frames
    noise, contexts, recache_noise = inputs(8, batch)
    out = rollout(model, noise, contexts, stream, 0, cuts, recache_noise=recache_noise)
    ref = exit_zero_by_hand(model, noise, contexts, stream, cuts, recache_noise)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the recache noise reaches the next chunks (s0 = 0.00498 is not 0), not the first one
    other = rollout(model, noise, contexts, stream, 0, cuts, recache_noise=torch.zeros_like(noise))
    assert torch.equal(other[:, :2], out[:, :2]) and not torch.allclose(other[:, 2:], out[:, 2:], atol=1e-4)


# -- rollout: the last exit step is generate_latents with the grid sigma and a noised recache ----


@torch.no_grad()
def last_step_by_hand(model, noise, contexts, stream, cuts, recache_noise, image=None):
    """generate_latents' loop written out with the inference cache, with the two training changes:
    the chunk is x_t - sigma_grid(t_last) v (not the UniPC sigma) and its recache input is
    (1 - s0) x0 + s0 n. I2V: frame 0 of the first chunk is the image, at t = 0, in every forward."""

    def call(x, t, c, text, offset):
        if image is not None and c == 0:
            x, t = torch.cat([image, x[:, 1:]], dim=1), t.clone()
            t[:, 0] = 0
        return model.forward_chunk(x.transpose(1, 2), t, text, cache=cache, start_frame=c * fpb,
                                   rope_offset=offset).transpose(1, 2)

    batch, frames = noise.shape[:2]
    fpb, cfg = stream.frames_per_block, model.config
    cache = KVCache(CacheLayout.from_stream(stream, S), cfg.num_layers, batch, cfg.num_heads,
                    cfg.head_dim, torch.float32, "cpu")
    offsets = shot_offsets(cuts, len(contexts), fpb, stream)
    s0 = GRID.t_to_sigma(torch.zeros(()))
    out = []
    for c in range(frames // fpb):
        f, text, offset = slice(c * fpb, (c + 1) * fpb), model.prepare_text(contexts[c]), float(offsets[c * fpb])
        sampler = FlowUniPCSampler(stream.sampling_steps, stream.timestep_shift)
        x = noise[:, f]
        for i, t in enumerate(sampler.timesteps):
            tt = torch.full((batch, fpb), float(t))
            v = call(x, tt, c, text, offset)
            if i < len(sampler.timesteps) - 1:
                x = sampler.step(v, x)
        x0 = (x.double() - GRID.t_to_sigma(tt).double()[:, :, None, None, None] * v.double()).float()
        if image is not None and c == 0:
            x0[:, :1] = image
        call((1 - s0) * x0 + s0 * recache_noise[:, f], torch.zeros(batch, fpb), c, text, offset)
        if cuts and cuts[c] and c > 0 and stream.pins_shot_sink:
            cache.pin_last_chunk(fpb)
        out.append(x0)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("steps,batch,cuts,i2v", [
    (4, 1, None, False),
    (2, 2, None, False),
    (4, 1, [False, True, False, False, False, False], False),  # pinned right after the sink: protected
    (4, 1, [False, False, False, False, True, False], False),  # floating pin, still in the window at the end
    (4, 2, None, True),
])
def test_last_exit_step_is_generate_latents_with_grid_sigma(steps, batch, cuts, i2v):
    model = tiny_model()
    stream = StreamConfig(**{**SMALL_STREAM, "sampling_steps": steps})  # 6 chunks, window of 3: rolls
    noise, contexts, recache_noise = inputs(12, batch)
    image = torch.randn(batch, 1, 48, 8, 8, generator=torch.Generator().manual_seed(9)) if i2v else None
    out = rollout(model, noise, contexts, stream, steps - 1, cuts, recache_noise=recache_noise, image_latent=image)
    ref = last_step_by_hand(model, noise, contexts, stream, cuts, recache_noise, image)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # the training grid's sigma and the noised recache: close to the inference loop, not equal
    gap = (out - generate_latents(model, noise, contexts, stream, cuts, image_latent=image)).abs()
    assert 1e-5 < gap.max().item() < 0.05 * noise.abs().max().item()
    if i2v:
        assert torch.equal(out[:, :1], image) and gap[:, :1].max() == 0


# -- the training cache: equal to the rolling cache until a pinned sink leaves the window ---------


@pytest.fixture
def training_caches(monkeypatch):
    """`generate_latents` with the rollout's training cache in place of the rolling one."""
    def allocate(model, stream, batch, tokens_per_frame, device, storage=None):
        return RolloutKVCache(CacheLayout.from_stream(stream, tokens_per_frame), model.config.num_layers)

    return lambda: monkeypatch.setattr(pipeline, "allocate_cache", allocate)


@pytest.mark.parametrize("stream_kw,cuts", [
    ({}, None),
    ({}, [False, True, False, False, False, False, False]),
    ({"multi_shot_sink": False}, [False, False, True, False, False, False, False]),
    ({"sink_frames": 0, "multi_shot_sink": False}, None),
    ({"frames_per_block": 1, "local_window_frames": 5, "sink_frames": 1}, None),
])
def test_training_cache_attends_what_the_rolling_cache_holds(stream_kw, cuts, training_caches):
    model = tiny_model()
    stream = StreamConfig(**{**SMALL_STREAM, **stream_kw})
    frames = 14 if stream.frames_per_block == 2 else 7
    noise, contexts, _ = inputs(frames, 1, fpb=stream.frames_per_block)
    rolling = generate_latents(model, noise, contexts, stream, cuts)
    training_caches()
    training = generate_latents(model, noise, contexts, stream, cuts)
    torch.testing.assert_close(training, rolling, rtol=1e-6, atol=1e-6)


def test_training_cache_drops_a_pinned_sink_the_rolling_cache_protects(training_caches):
    """Cut at chunk 2 (window of 3 chunks, 1-chunk sink): at chunk 4 the rolling cache holds
    [c0, c2 (pinned, protected), c4] while the training window is [c0, c3, c4]; from chunk 5 on
    both attend c0, the pinned c2 and the newest chunk again (reference-systems.md §6.3)."""
    model = tiny_model()
    stream = StreamConfig(**SMALL_STREAM)
    noise, contexts, _ = inputs(14, 1)
    cuts = [False, False, True, False, False, False, False]
    pin = dmd.CacheState(pinned_start=4 * S, pinned_len=2 * S)
    layout = CacheLayout.from_stream(stream, S)
    assert attended_ranges(layout, pin, 10 * S) == [(0, 2 * S), (6 * S, 10 * S)]
    assert attended_ranges(layout, pin, 12 * S) == [(0, 2 * S), (4 * S, 6 * S), (10 * S, 12 * S)]
    rolling = generate_latents(model, noise, contexts, stream, cuts)
    training_caches()
    training = generate_latents(model, noise, contexts, stream, cuts)
    torch.testing.assert_close(training[:, :8], rolling[:, :8], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(training[:, 8:10], rolling[:, 8:10], atol=1e-3)


# -- the training cache: the documented rule as an explicit mask -------------------------------


def rule_frames(end, pin, stream):
    """Frames a forward ending at latent frame `end` attends (design.md §4 DMD): the window of
    local_window_frames, plus the protected sink and a floating pinned shot sink (start, length)
    when they lie before it, the window shrinking to keep the total."""
    window, global_sink = stream.local_window_frames, stream.global_sink_frames
    if pin is None:
        protected = max(global_sink, stream.sink_frames)
    else:
        protected = global_sink + pin[1] if pin[0] == global_sink else global_sink
    start = max(0, end - window)
    attended, budget, floor = set(), window, 0
    if protected and start > 0:
        attended |= set(range(protected))
        budget, floor = budget - protected, protected
    if pin is not None and protected <= pin[0] < start:
        attended |= set(range(pin[0], pin[0] + pin[1]))
        budget -= pin[1]
    return attended | set(range(max(floor, end - budget), end))


def explicit_mask(chunk, frames, stream, cuts):
    """Dense mask of a `[clean | noisy]` sequence: every clean (recached) frame and the noisy
    frames of `chunk` query what their forward attends: clean frames by the rule, and the
    noisy chunk its own noisy frames instead of its clean ones."""
    fpb, num_chunks = stream.frames_per_block, frames // stream.frames_per_block
    frame_mask = torch.zeros(2 * frames, 2 * frames, dtype=torch.bool)
    pin = None
    for c in range(num_chunks):
        lo, hi = c * fpb, (c + 1) * fpb
        keys = rule_frames(hi, pin, stream)
        for f in range(lo, hi):
            frame_mask[f, sorted(keys)] = True  # the recache forward of chunk c
            if c == chunk:  # the forward under test
                frame_mask[frames + f, sorted(k for k in keys if k < lo)] = True
            frame_mask[frames + f, frames + lo:frames + hi] = True  # (other noisy chunks: unused)
        if cuts and cuts[c] and c > 0 and stream.pins_shot_sink:
            pin = (lo, min(stream.sink_frames, fpb))
    return frame_mask.repeat_interleave(S, 0).repeat_interleave(S, 1)


@pytest.mark.parametrize("stream_kw,cuts,exits", [
    ({}, [False, False, True, False, False, False, False], 1),  # floating pin: dropped, then prepended
    ({}, [False, True, False, False, False, True, False], [0, 3, 1, 2, 0, 1, 3]),
    ({"local_window_frames": 7}, [False, False, False, True, False, False, False], 2),  # window cuts a chunk
    ({"multi_shot_sink": False, "sink_frames": 2}, None, 3),
])
def test_every_rollout_forward_matches_a_full_recompute_with_the_rule_mask(stream_kw, cuts, exits):
    model = tiny_model()
    stream = StreamConfig(**{**SMALL_STREAM, **stream_kw})
    noise, contexts, recache_noise = inputs(14, 1)
    recorder = Recorder(model)
    rollout(recorder, noise, contexts, stream, exits, cuts, recache_noise=recache_noise)
    fpb, frames = stream.frames_per_block, noise.shape[1]
    recache_inputs = torch.zeros(1, 48, frames, 8, 8)
    for start, x, _, _ in recorder.calls:  # a chunk's last forward is its recache
        recache_inputs[:, :, start:start + fpb] = x
    offsets = shot_offsets(cuts, len(contexts), fpb, stream)
    text = model.prepare_text(torch.stack(contexts, dim=1).flatten(0, 1))
    for start, x, t, v in recorder.calls:
        mask = explicit_mask(start // fpb, frames, stream, cuts)
        model.sequence_attention = lambda q, k, v_, _mask, mask=mask: sdpa(q, k, v_, mask)
        noisy, t_all = recache_inputs.clone(), torch.zeros(1, frames)
        noisy[:, :, start:start + fpb], t_all[:, start:start + fpb] = x, t
        full = model(noisy, t_all, text, frames_per_block=fpb, clean_x=recache_inputs, rope_offset=offsets)
        torch.testing.assert_close(full[:, :, start:start + fpb], v, rtol=1e-5, atol=1e-5)
    assert len(recorder.calls) == sum(e + 2 for e in (exits if isinstance(exits, list) else [exits] * 7))


# -- gradient routing: later chunks' gradients reach the exit-step K/V --------------------------


class OfficialInPlaceCache:
    """The official training cache's mechanism (no window, no eviction): one buffer per layer,
    each forward attends a clone with its new K/V written in, then writes them into the buffer
    in place under the current grad mode. A no-grad write (the recache) changes the values and
    keeps the buffer's gradient route to the last write under grad (the exit step)."""

    def __init__(self, layout, num_layers, tokens, detach_history=False):
        self.layout, self.detach_history = layout, detach_history
        self.k = [torch.zeros(1, tokens, 4, 32) for _ in range(num_layers)]
        self.v = [torch.zeros(1, tokens, 4, 32) for _ in range(num_layers)]

    def begin(self, start_frame, num_frames, rewrite_at_frame=None, keep_kv=True):
        per_frame = self.layout.tokens_per_frame
        self.span = (start_frame * per_frame, (start_frame + num_frames) * per_frame)
        self.new = [None] * len(self.k)
        return [lambda q, k, v, i=i: self._attend(i, q, k, v) for i in range(len(self.k))]

    def _attend(self, i, q, k, v):
        start, end = self.span
        self.new[i] = (k, v)
        keys, values = self.k[i].clone(), self.v[i].clone()
        if self.detach_history:
            keys, values = keys.detach(), values.detach()
        keys[:, start:end], values[:, start:end] = k, v
        return sdpa(q, keys[:, :end], values[:, :end])

    def commit(self):
        start, end = self.span
        for i, (k, v) in enumerate(self.new):
            self.k[i][:, start:end], self.v[i][:, start:end] = k, v

    def pin_last_chunk(self, num_frames):
        pass


def rollout_grads(model, monkeypatch, cache_factory, exits):
    if cache_factory is not None:
        monkeypatch.setattr(dmd, "rollout_cache", cache_factory)
    stream = StreamConfig(**SMALL_STREAM)
    noise, contexts, recache_noise = inputs(4, 1)
    model.zero_grad()
    out = rollout(model, noise, contexts, stream, exits, recache_noise=recache_noise)
    weights = torch.randn(out[:, 2:].shape, generator=torch.Generator().manual_seed(7))
    (out[:, 2:] * weights).sum().backward()  # a loss on chunk 2 only
    monkeypatch.undo()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("exits", [[0, 0], [1, 3], [3, 2]])
def test_gradients_reach_earlier_exit_kv_as_the_official_in_place_cache(monkeypatch, exits):
    model = tiny_model()
    layout = CacheLayout.from_stream(StreamConfig(**SMALL_STREAM), S)

    def official(detach):
        return lambda *args: OfficialInPlaceCache(layout, 2, 4 * S, detach_history=detach)

    out, grads = rollout_grads(model, monkeypatch, None, exits)
    ref_out, ref_grads = rollout_grads(model, monkeypatch, official(False), exits)
    det_out, det_grads = rollout_grads(model, monkeypatch, official(True), exits)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)
    # detached history: same values, different gradients (chunk 1's exit forward gets none)
    assert torch.equal(det_out, ref_out)
    relative = [((det_grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()).item() for n in ref_grads]
    assert max(relative) > 0.05


def test_history_reads_recache_values_and_routes_gradient_to_exit_kv():
    """k_hist = k_recache + (k_exit - k_exit.detach()): values of the recache, gradient of k_exit."""
    layout = CacheLayout(capacity=8, sink_tokens=0, global_sink_tokens=0, tokens_per_frame=1)
    cache = RolloutKVCache(layout, num_layers=1)
    k_exit = torch.randn(1, 4, 1, 2, requires_grad=True)
    k_recache = torch.randn(1, 4, 1, 2)
    q = torch.randn(1, 4, 1, 2)
    for k, grad_mode in ((torch.randn(1, 4, 1, 2), False), (k_exit, True), (k_recache, False)):
        with torch.set_grad_enabled(grad_mode):
            attend, = cache.begin(0, 4)
            attend(q, k, k)
            cache.commit()
    attend, = cache.begin(4, 4)
    k_new = torch.randn(1, 4, 1, 2)
    out = attend(q, k_new, k_new)
    cache.commit()
    keys = torch.cat([k_recache, k_new], dim=1)
    torch.testing.assert_close(out, sdpa(q, keys, keys))
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    hist = torch.cat([k_recache, k_new], dim=1).requires_grad_(True)
    (sdpa(q, hist, hist) * weights).sum().backward()
    torch.testing.assert_close(k_exit.grad, hist.grad[:, :4])


# -- timesteps and noise ------------------------------------------------------------------------


@pytest.mark.parametrize("raw,expected", [
    (0, 20.0),  # 0, clamped up
    (4, 20.0),  # 19.685..., clamped up
    (5, 24.509804),  # 25 / 1.02
    (100, 357.142857),  # 500 / 1.4
    (500, 833.333333),  # 2500 / 3
    (900, 978.260870),  # 4500 / 4.6
    (910, 980.0),  # 980.6..., clamped down
    (999, 980.0),
])
def test_score_timesteps_table(raw, expected):
    t = score_timesteps(torch.tensor([[raw, raw]]))
    assert t.dtype == torch.float32 and t.shape == (1, 2)
    assert t[0, 0].item() == pytest.approx(expected, rel=1e-6)


def test_score_timesteps_without_shift_only_clamps():
    assert score_timesteps(torch.tensor([3, 400, 999]), shift=1.0).tolist() == [20.0, 400.0, 980.0]


def hand_sigma(t):
    """sigma of the nearest of the 1000 grid timesteps 1000 * shift(1 - i/1000), float64."""
    base = 1 - torch.arange(1000, dtype=torch.float64) / 1000
    sigmas = 5 * base / (1 + 4 * base)
    return sigmas[(t.double().reshape(-1, 1) - 1000 * sigmas).abs().argmin(1)].reshape(t.shape)


def test_add_noise_uses_the_nearest_grid_sigma_per_frame():
    g = torch.Generator().manual_seed(3)
    x, noise = torch.randn(2, 4, 48, 2, 2, generator=g), torch.randn(2, 4, 48, 2, 2, generator=g)
    t = torch.tensor([[0.0, 20.0, 500.3, 1000.0], [624.0, 937.0, 979.9, 3.0]])
    s = hand_sigma(t)
    assert s[0, 0].item() == pytest.approx(0.0049800803, abs=1e-9) and s[0, 3].item() == 1.0
    torch.testing.assert_close(sigma_grid(t).double(), s, rtol=1e-6, atol=0)
    s = s[:, :, None, None, None]
    torch.testing.assert_close(add_noise(x, noise, t), ((1 - s) * x + s * noise).float(), rtol=1e-6, atol=1e-6)


# -- the DMD gradient and the losses ------------------------------------------------------------


def score_x0_by_hand(model, noisy, t, contexts, fpb):
    """One sample at a time, the sample's chunk prompts as a [K, T, D] batch; x0 frame by frame."""
    out = torch.empty_like(noisy)
    for b in range(noisy.shape[0]):
        context = torch.cat([c[b:b + 1] for c in contexts]) if isinstance(contexts, list) else contexts[b:b + 1]
        v = model(noisy[b:b + 1].transpose(1, 2), t[b:b + 1], context, frames_per_block=fpb)[0].transpose(0, 1)
        for f in range(noisy.shape[1]):
            out[b, f] = (noisy[b, f].double() - GRID.t_to_sigma(t[b, f]).double() * v[f].double()).float()
    return out


def dmd_gradient_by_hand(x, noisy, t, real, fake, contexts, negative, fpb, g_real, g_fake):
    c = score_x0_by_hand(real, noisy, t, contexts, fpb)
    u = score_x0_by_hand(real, noisy, t, negative, fpb)
    x0_real = c + g_real * (c - u)
    x0_fake = score_x0_by_hand(fake, noisy, t, contexts, fpb)
    if g_fake:
        x0_fake = x0_fake + g_fake * (x0_fake - score_x0_by_hand(fake, noisy, t, negative, fpb))
    grad = torch.empty_like(x)
    for b in range(x.shape[0]):
        for start in range(0, x.shape[1], fpb):
            block = slice(start, start + fpb)
            normaliser = (x[b, block] - x0_real[b, block]).abs().mean()
            grad[b, block] = (x0_fake[b, block] - x0_real[b, block]) / normaliser
    return torch.nan_to_num(grad), x0_fake, x0_real


def score_inputs(batch, seed=5, frames=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, 48, 4, 4, generator=g)
    noise = torch.randn(batch, frames, 48, 4, 4, generator=g)
    raw = torch.randint(0, 1000, (batch, 1), generator=g).repeat(1, frames)
    t = score_timesteps(raw)
    contexts = [text_context(batch, seed + 20 + k) for k in range(frames // 2)]
    return x, noise, t, add_noise(x, noise, t), contexts, text_context(batch, seed + 99)


@pytest.mark.parametrize("batch,g_real,g_fake", [(1, 3.0, 0.0), (2, 3.0, 0.0), (2, 2.0, 1.5)])
def test_dmd_gradient_against_sample_by_sample_reference(batch, g_real, g_fake):
    real, fake = tiny_model(seed=1), tiny_model(seed=2)
    x, _, t, noisy, contexts, negative = score_inputs(batch)
    grad = dmd_gradient(x, noisy, t, real, fake, contexts, negative, frames_per_block=2,
                        real_guidance_scale=g_real, fake_guidance_scale=g_fake)
    ref, x0_fake, x0_real = dmd_gradient_by_hand(x, noisy, t, real, fake, contexts, negative, 2, g_real, g_fake)
    assert grad.shape == x.shape and not grad.requires_grad
    torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-5)
    # one normaliser per block, not per sample (Self-Forcing's choice)
    per_sample = (x0_fake - x0_real) / (x - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    assert not torch.allclose(grad, per_sample, rtol=1e-3)


def test_dmd_gradient_zeroes_nans():
    """A NaN in x makes its block's normaliser NaN: that block's G is 0, the other blocks keep theirs."""
    real, fake = tiny_model(seed=1), tiny_model(seed=2)
    x, _, t, noisy, contexts, negative = score_inputs(2)
    clean = dmd_gradient(x, noisy, t, real, fake, contexts, negative, frames_per_block=2)
    x[1, 2, 0, 0, 0] = float("nan")
    grad = dmd_gradient(x, noisy, t, real, fake, contexts, negative, frames_per_block=2)
    assert torch.equal(grad[1, 2:], torch.zeros_like(grad[1, 2:]))
    assert torch.equal(grad[0], clean[0]) and torch.equal(grad[1, :2], clean[1, :2])


def test_generator_loss_value_and_gradient():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 48, 2, 2, generator=g, requires_grad=True)
    grad = torch.randn(2, 4, 48, 2, 2, generator=g)
    loss = generator_loss(x, grad)
    assert loss.dtype == torch.float64 and loss.item() == pytest.approx(0.5 * grad.double().square().mean().item())
    loss.backward()
    torch.testing.assert_close(x.grad, grad / x.numel())
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[:, 0] = False  # I2V: the image frame does not count
    x.grad = None
    masked = generator_loss(x, grad, mask=mask)
    masked.backward()
    assert masked.item() == pytest.approx(0.5 * grad[:, 1:].double().square().mean().item())
    torch.testing.assert_close(x.grad, torch.where(mask, grad / mask.sum(), 0.0))


@pytest.mark.parametrize("batch,masked", [(1, False), (2, True)])
def test_critic_loss_against_sample_by_sample_reference(batch, masked):
    x, noise, t, noisy, contexts, _ = score_inputs(batch, seed=8)
    mask = None
    if masked:
        mask = torch.ones_like(x, dtype=torch.bool)
        mask[:, 0] = False
    model = tiny_model(seed=2)
    loss = critic_loss(model, x, noisy, t, noise, contexts, frames_per_block=2, mask=mask)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    x0 = score_x0_by_hand(model, noisy, t, contexts, 2)
    s = torch.stack([GRID.t_to_sigma(t[b]) for b in range(batch)]).double()[:, :, None, None, None]
    flow = ((noisy.double() - x0.double()) / s).float()
    error = (flow - (noise - x)) ** 2
    ref = error.mean() if mask is None else error[mask].mean()
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case,needle", [
    ("exit_high", "exit_step must be an integer in [0, 4)"),
    ("exit_negative", "exit_step must be an integer in [0, 4)"),
    ("exit_count", "got 3 exit steps for 4 chunks"),
    ("exit_float", "exit_step must be an integer in [0, 4)"),
    ("guidance", "runs without guidance"),
    ("clean_recache", "shot_clean_recache"),
    ("recache_noise", "recache_noise must have the shape of noise"),
])
def test_rollout_bad_inputs(case, needle):
    model = tiny_model()
    noise, contexts, recache_noise = inputs(8, 1)
    stream, exit_step = StreamConfig(**SMALL_STREAM), 1
    if case == "exit_high":
        exit_step = 4
    elif case == "exit_negative":
        exit_step = [0, -1, 0, 0]
    elif case == "exit_count":
        exit_step = [0, 1, 2]
    elif case == "exit_float":
        exit_step = 1.5
    elif case == "guidance":
        stream = StreamConfig(**SMALL_STREAM, guidance_scale=3.0)
    elif case == "clean_recache":
        stream = StreamConfig(**SMALL_STREAM, shot_clean_recache=True)
    else:
        recache_noise = recache_noise[:, :6]
    with pytest.raises(ValueError) as info:
        rollout(model, noise, contexts, stream, exit_step, recache_noise=recache_noise)
    assert needle in str(info.value)


def test_critic_rollout_under_no_grad_has_the_same_values():
    model = tiny_model()
    noise, contexts, recache_noise = inputs(8, 1)
    stream = StreamConfig(**SMALL_STREAM)
    with_grad = rollout(model, noise, contexts, stream, 2, recache_noise=recache_noise)
    with torch.no_grad():
        without = rollout(model, noise, contexts, stream, 2, recache_noise=recache_noise)
    assert with_grad.requires_grad and not without.requires_grad
    assert torch.equal(with_grad.detach(), without)
    assert math.isfinite(with_grad.sum().item())
