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
