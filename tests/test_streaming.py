"""Cached chunk-by-chunk streaming == a full recompute with the block-causal mask.

The reference recomputes, for every model call, the whole video so far from scratch as one
sequence: clean latents (t = 0) for finished chunks and the current noisy chunk, each chunk with
its own prompt and its own RoPE positions (absolute frame + shot offset), under the block-causal
mask. With a sliding window the mask is restricted to what each chunk could see when it was
written (from the independent chunk-level model of the cache in test_kv_cache.py); with no
eviction it is exactly the model's own block-causal full-sequence forward.
"""

from __future__ import annotations

import pytest
import torch

from core.attention import sdpa
from core.config import StreamConfig
from core.pipeline import generate_latents
from core.sampler import FlowUniPCSampler
from tests.conftest import SMALL_STREAM, text_context, tiny_model
from tests.test_kv_cache import simulate_chunks


def recompute_velocity(model, latents, timesteps, contexts, positions, visible, fpb):
    """Velocity of the full sequence: latents [B, F, C, H, W], timesteps [B, F], one context per
    chunk, float64 positions [F], visible[q_chunk][k_chunk] -> bool."""
    batch, frames = latents.shape[:2]
    chunks = frames // fpb
    tokens, grid = model.patchify(latents.permute(0, 2, 1, 3, 4))
    per_frame = grid[1] * grid[2]
    e, e0 = model.time_embed(timesteps)
    # K prompts per sample, sample-major: chunk k's tokens attend to prompt k.
    text = model.prepare_text(torch.stack(contexts, dim=1).flatten(0, 1))
    rope = model.rope_table(grid, positions)
    chunk_of = torch.arange(frames * per_frame) // (fpb * per_frame)
    allowed = torch.tensor(visible)[chunk_of[:, None], chunk_of[None, :]]

    def attend(q, k, v):
        return sdpa(q, k, v, allowed)

    out = model.run_blocks(tokens, e0, text, rope, [attend] * len(model.blocks))
    assert len(contexts) == chunks
    return model.unpatchify(model.head(out, e), grid).permute(0, 2, 1, 3, 4)


def reference_stream(model, noise, contexts, stream: StreamConfig, cuts):
    """The streaming algorithm with every model call replaced by a full recompute."""
    fpb = stream.frames_per_block
    chunks = noise.shape[1] // fpb
    window_chunks = stream.local_window_frames // fpb
    sink_chunks = stream.sink_frames // fpb
    cut_set = {c for c, cut in enumerate(cuts) if cut}
    buffers = simulate_chunks(chunks, window_chunks, sink_chunks, cut_set, stream.multi_shot_sink)
    visible = [[j in buffers[c] for j in range(chunks)] for c in range(chunks)]
    offsets, shot = [], 0
    for c in range(chunks):
        if c in cut_set and c > 0 and stream.shot_rope_offset:
            shot += 1
        offsets += [shot * stream.shot_rope_offset] * fpb
    positions = torch.arange(noise.shape[1], dtype=torch.float64) + torch.tensor(offsets,
                                                                                 dtype=torch.float64)
    clean = noise.clone()
    for c in range(chunks):
        end = (c + 1) * fpb
        sampler = FlowUniPCSampler(stream.sampling_steps, stream.timestep_shift)
        x = noise[:, c * fpb:end]
        for t in sampler.timesteps:
            seq = torch.cat([clean[:, :c * fpb], x], dim=1)
            times = torch.zeros(seq.shape[:2])
            times[:, c * fpb:] = float(t)
            v = recompute_velocity(model, seq, times, contexts[:c + 1], positions[:end],
                                   [row[:c + 1] for row in visible[:c + 1]], fpb)
            x = sampler.step(v[:, c * fpb:], x)
        clean[:, c * fpb:end] = x
    return clean


def run(stream: StreamConfig, frames: int, cuts: list[bool], batch: int = 1, seed: int = 0):
    model = tiny_model(seed)
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(batch, frames, 48, 8, 8, generator=g)
    shots = [text_context(batch, 100 + s) for s in range(4)]
    contexts, shot = [], 0
    for cut in cuts:
        shot += int(cut)
        contexts.append(shots[shot])
    with torch.no_grad():
        streamed = generate_latents(model, noise, contexts, stream, cuts)
        reference = reference_stream(model, noise, contexts, stream, cuts)
    return (streamed - reference).abs().max().item(), reference.abs().max().item()


def test_no_eviction_equals_model_block_causal_forward():
    """Window >= video: one model call of the stream == the last chunk of the model's own
    block-causal full-sequence forward over [clean history | current chunk]."""
    model = tiny_model(3)
    fpb, frames = 2, 8
    stream = StreamConfig(frames_per_block=fpb, local_window_frames=frames, sink_frames=2,
                          sampling_steps=2)
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(1, frames, 48, 8, 8, generator=g)
    ctx = text_context(1, 5)
    with torch.no_grad():
        streamed = generate_latents(model, noise, [ctx] * (frames // fpb), stream)
        clean = noise.clone()
        for c in range(frames // fpb):
            sampler = FlowUniPCSampler(stream.sampling_steps, stream.timestep_shift)
            x = noise[:, c * fpb:(c + 1) * fpb]
            for t in sampler.timesteps:
                seq = torch.cat([clean[:, :c * fpb], x], dim=1).permute(0, 2, 1, 3, 4)
                times = torch.zeros(1, (c + 1) * fpb)
                times[:, c * fpb:] = float(t)
                v = model(seq, times, ctx, frames_per_block=fpb).permute(0, 2, 1, 3, 4)
                x = sampler.step(v[:, c * fpb:], x)
            clean[:, c * fpb:(c + 1) * fpb] = x
    assert (streamed - clean).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name,stream_kw,frames,cut_chunks,batch", [
    ("single shot with eviction", {}, 16, (), 1),
    ("scene cut: shot sink + rope offset", {}, 16, (4,), 1),
    ("two cuts, sink replaced", {}, 16, (3, 6), 2),
    ("cut without multi-shot sink", dict(multi_shot_sink=False), 16, (4,), 1),
    ("2 steps, wider window", dict(sampling_steps=2, local_window_frames=8), 16, (5,), 1),
])
def test_streaming_equals_full_recompute(name, stream_kw, frames, cut_chunks, batch):
    stream = StreamConfig(**{**SMALL_STREAM, **stream_kw})
    cuts = [c in cut_chunks for c in range(frames // stream.frames_per_block)]
    delta, scale = run(stream, frames, cuts, batch)
    assert scale > 1.0  # non-trivial latents
    assert delta <= 1e-5, f"{name}: max |delta| {delta:.2e}"


def test_reference_detects_a_wrong_cache():
    """The comparison can fail: pretending the shot sink is not pinned changes the result."""
    stream = StreamConfig(**SMALL_STREAM)
    cuts = [c == 2 for c in range(8)]
    wrong = StreamConfig(**{**SMALL_STREAM, "multi_shot_sink": False, "shot_rope_offset": 8.0})
    model = tiny_model(0)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, 48, 8, 8, generator=g)
    contexts = [text_context(1, 100 + int(c >= 2)) for c in range(8)]
    with torch.no_grad():
        streamed = generate_latents(model, noise, contexts, wrong, cuts)
        reference = reference_stream(model, noise, contexts, stream, cuts)
    assert (streamed - reference).abs().max().item() > 1e-2


@pytest.mark.parametrize("switch_at", [2, 5])
def test_interactive_switch_equals_recompute_with_recached_window(switch_at):
    """A prompt switch before chunk c re-encodes the held window with the new prompt (clean
    latents, t = 0, block-causal in buffer order); every later chunk sees those keys."""
    stream = StreamConfig(**SMALL_STREAM)  # window 3 chunks, 1-chunk sink, 2 frames per block
    fpb, chunks = 2, 8
    model = tiny_model(5)
    g = torch.Generator().manual_seed(6)
    noise = torch.randn(1, chunks * fpb, 48, 8, 8, generator=g)
    old, new = text_context(1, 200), text_context(1, 201)
    with torch.no_grad():
        streamed = generate_latents(model, noise, [old] * chunks, stream)  # warm-up API check
        from core.pipeline import stream_latents
        switched = torch.cat([c.latents for c in stream_latents(
            model, noise, [old] * chunks, stream,
            prompt_switch=lambda c: new if c == switch_at else None)], dim=1)
        before = reference_stream(model, noise[:, :switch_at * fpb], [old] * switch_at, stream,
                                  [False] * switch_at)
        buffers = simulate_chunks(chunks, 3, 1, set(), True)
        held = buffers[switch_at - 1]
        clean = {k: before[:, k * fpb:(k + 1) * fpb] for k in range(switch_at)}
        for c in range(switch_at, chunks):
            order = held + list(range(switch_at, c + 1))
            visible = [[(k in held[:held.index(q) + 1]) if q in held else (k in buffers[q])
                        for k in order] for q in order]
            positions = torch.cat([torch.arange(k * fpb, (k + 1) * fpb, dtype=torch.float64)
                                   for k in order])
            sampler = FlowUniPCSampler(stream.sampling_steps, stream.timestep_shift)
            x = noise[:, c * fpb:(c + 1) * fpb]
            for t in sampler.timesteps:
                seq = torch.cat([clean[k] for k in order[:-1]] + [x], dim=1)
                times = torch.zeros(seq.shape[:2])
                times[:, -fpb:] = float(t)
                v = recompute_velocity(model, seq, times, [new] * len(order), positions, visible, fpb)
                x = sampler.step(v[:, -fpb:], x)
            clean[c] = x
    reference = torch.cat([clean[k] for k in range(chunks)], dim=1)
    assert torch.equal(switched[:, :switch_at * fpb], streamed[:, :switch_at * fpb])
    assert (switched - reference).abs().max().item() <= 1e-5
    # the switch changed what follows (and not only through the prompt of the new chunks)
    assert not torch.allclose(switched[:, switch_at * fpb:], streamed[:, switch_at * fpb:])
