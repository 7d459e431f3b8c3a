"""Shared fixtures: tiny configs with deterministic, non-trivial random weights."""

from __future__ import annotations

import pytest
import torch

from core.config import ModelConfig, StreamConfig
from core.dit import CausalWanDiT, random_init_

# The streaming configuration of the outside checks: 2 frames per block, a 6-frame window
# (3 chunks), a 2-frame sink, 4 steps.
SMALL_STREAM = dict(frames_per_block=2, local_window_frames=6, sink_frames=2, sampling_steps=4)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> CausalWanDiT:
    config = ModelConfig.preset("tiny")
    for key, value in overrides.items():
        setattr(config, key, value)
    model = CausalWanDiT(ModelConfig(**config.__dict__)).eval()
    return random_init_(model, seed).to(dtype)


@pytest.fixture
def model() -> CausalWanDiT:
    return tiny_model()


@pytest.fixture
def small_stream() -> StreamConfig:
    return StreamConfig(**SMALL_STREAM)


def text_context(batch: int, seed: int, length: int = 24, text_dim: int = 64) -> torch.Tensor:
    """A text-encoder-like context: `length` nonzero rows, zero-padded to 512 slots."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.zeros(batch, 512, text_dim)
    ctx[:, :length] = torch.randn(batch, length, text_dim, generator=g)
    return ctx


@pytest.fixture
def fast_decode(monkeypatch):
    """Grey frames of the right count and size instead of the VAE decode, for tests about what
    happens around decoding (writing, progress, interrupts): the tiny VAE is the slow part."""
    import numpy as np

    from core.config import VAE_SPATIAL_STRIDE, VAE_TEMPORAL_STRIDE
    from core.decode import SyncDecoder

    def submit(self, latents_BfCHW):
        first = not self.__dict__.get("_started", False)
        self._started = True
        frames = VAE_TEMPORAL_STRIDE * latents_BfCHW.shape[1] - (VAE_TEMPORAL_STRIDE - 1 if first else 0)
        height, width = (VAE_SPATIAL_STRIDE * n for n in latents_BfCHW.shape[-2:])
        self.sink(np.full((frames, height, width, 3), 128, np.uint8))

    monkeypatch.setattr(SyncDecoder, "submit", submit)
