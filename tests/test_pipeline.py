"""The streaming pipeline's contract: inputs it refuses, the calls it makes, guidance, I2V."""

from __future__ import annotations

import pytest
import torch

from core.config import StreamConfig
from core.pipeline import generate_latents, stream_latents
from tests.conftest import SMALL_STREAM, text_context, tiny_model


def inputs(frames=8, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, frames, 48, 8, 8, generator=g)
    contexts = [text_context(batch, seed + i) for i in range(frames // 2)]
    return noise, contexts


class CountingModel:
    """Wraps the tiny model and records every forward_chunk call's timesteps."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward_chunk(self, x, t, context, **kw):
        self.calls.append((kw["start_frame"], t.clone(), kw["cache"]))
        return self.model.forward_chunk(x, t, context, **kw)


@pytest.mark.parametrize("steps,guidance,calls_per_chunk", [(4, 1.0, 5), (2, 1.0, 3), (4, 3.0, 10)])
def test_model_calls_per_chunk(steps, guidance, calls_per_chunk):
    model = CountingModel(tiny_model())
    stream = StreamConfig(**{**SMALL_STREAM, "sampling_steps": steps, "guidance_scale": guidance})
    noise, contexts = inputs()
    negative = text_context(1, 99) if guidance != 1.0 else None
    generate_latents(model, noise, contexts, stream, negative_context=negative)
    assert len(model.calls) == 4 * calls_per_chunk
    branches = {id(cache) for _, _, cache in model.calls}
    assert len(branches) == (2 if guidance != 1.0 else 1)  # separate negative cache
    first_chunk = [t[0, 0].item() for start, t, _ in model.calls if start == 0]
    expected = {4: [999, 937, 833, 624], 2: [999, 833]}[steps]
    per_branch = 2 if guidance != 1.0 else 1
    assert first_chunk[::per_branch] == expected + [0.0]  # steps, then the recache at t = 0


def test_guidance_one_means_no_negative_pass():
    noise, contexts = inputs()
    model = tiny_model()
    plain = generate_latents(model, noise, contexts, StreamConfig(**SMALL_STREAM))
    # a negative context is ignored entirely at guidance 1
    again = generate_latents(model, noise, contexts, StreamConfig(**SMALL_STREAM),
                             negative_context=text_context(1, 50))
    guided = generate_latents(model, noise, contexts,
                              StreamConfig(**SMALL_STREAM, guidance_scale=2.0),
                              negative_context=text_context(1, 50))
    assert torch.equal(plain, again)
    assert not torch.allclose(plain, guided)


def test_image_to_video_clamps_frame_zero():
    model = CountingModel(tiny_model())
    noise, contexts = inputs()
    image = torch.randn(1, 1, 48, 8, 8)
    out = generate_latents(model, noise, contexts, StreamConfig(**SMALL_STREAM), image_latent=image)
    assert torch.equal(out[:, :1], image)
    chunk0 = [t for start, t, _ in model.calls if start == 0]
    assert all(t[0, 0].item() == 0.0 for t in chunk0)  # conditioning frame is clean
    assert chunk0[0][0, 1].item() == 999.0
    later = [t for start, t, _ in model.calls if start == 2]
    assert later[0][0, 0].item() == 999.0  # only the first chunk is conditioned


def test_iterator_yields_chunks_in_order_and_matches_generate():
    model = tiny_model()
    noise, contexts = inputs()
    chunks = list(stream_latents(model, noise, contexts, StreamConfig(**SMALL_STREAM)))
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    assert [c.start_frame for c in chunks] == [0, 2, 4, 6]
    assert torch.equal(torch.cat([c.latents for c in chunks], dim=1),
                       generate_latents(model, noise, contexts, StreamConfig(**SMALL_STREAM)))


def test_a_cut_before_the_first_chunk_is_ignored():
    model = tiny_model()
    noise, contexts = inputs()
    stream = StreamConfig(**SMALL_STREAM)
    assert torch.equal(generate_latents(model, noise, contexts, stream, [True, False, False, False]),
                       generate_latents(model, noise, contexts, stream))


def test_bfloat16_streaming_runs_and_stays_finite():
    model = tiny_model(dtype=torch.bfloat16)
    noise, contexts = inputs()
    out = generate_latents(model, noise.bfloat16(), contexts, StreamConfig(**SMALL_STREAM))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("case,needle", [
    ("frames", "noise: 7 latent frames are not a multiple of frames_per_block=2; use 6 or 8"),
    ("contexts", "got 3 chunk contexts for 4 chunks"),
    ("context_shape", "chunk context 1 must be"),
    ("cuts", "got 2 scene-cut flags for 4 chunks"),
    ("dtype", "noise dtype torch.float64 differs from the model dtype"),
    ("guidance", "needs a negative prompt context"),
    ("image", "image latent must be [1, 1, 48, 8, 8]"),
])
def test_bad_inputs(case, needle):
    model = tiny_model()
    noise, contexts = inputs()
    stream = StreamConfig(**SMALL_STREAM)
    kwargs = {}
    cuts = None
    if case == "frames":
        noise = noise[:, :7]
    elif case == "contexts":
        contexts = contexts[:3]
    elif case == "context_shape":
        contexts[1] = torch.randn(1, 512, 32)
    elif case == "cuts":
        cuts = [False, True]
    elif case == "dtype":
        noise = noise.double()
    elif case == "guidance":
        stream = StreamConfig(**SMALL_STREAM, guidance_scale=2.0)
    else:
        kwargs["image_latent"] = torch.randn(1, 2, 48, 8, 8)
    with pytest.raises(ValueError) as info:
        generate_latents(model, noise, contexts, stream, cuts, **kwargs)
    assert needle in str(info.value)
