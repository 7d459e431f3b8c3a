"""The spatially split streaming decode (sp/vae_split.py) == the whole decode, bit for bit, on a CPU.

A small VAE (the Wan2.2 structure at width 8) keeps it fast; the margins are derived from the module
structure, so they are those of the 5B decoder too (checked on `meta`).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.config import VAEConfig
from core.errors import UserError
from core.vae import WanVAE, random_vae
from sp.vae_split import BandDecoder, band_bounds, band_plans, decoder_margins, decoder_scales, split_axis

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

SMALL_VAE = VAEConfig(base_dim=8, decoder_base_dim=8)


@pytest.fixture(scope="module")
def vae():
    return random_vae(SMALL_VAE, seed=3)


def latents(height: int, width: int, frames: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 48, frames, height, width, generator=torch.Generator().manual_seed(seed))


def streamed(decoder, x: torch.Tensor) -> torch.Tensor:
    """Chunks of 1 then 2 latents, as a stream."""
    return torch.cat([decoder.decode(x[:, :, :1]), decoder.decode(x[:, :, 1:])], dim=2)


def band_decode(vae, x: torch.Tensor, plans) -> torch.Tensor:
    return torch.cat([streamed(BandDecoder(vae, plan), x) for plan in plans], dim=plans[0].axis)


def test_margins_of_the_5b_decoder():
    with torch.device("meta"):
        vae = WanVAE(VAEConfig.preset("wan2.2"))
    assert decoder_margins(vae) == (13, 12, 10, 7, 1, 0)
    assert decoder_scales(vae) == (1, 2, 4, 8, 8, 8)


@pytest.mark.parametrize("height, width, parts", [(1, 16, 2), (1, 32, 2), (16, 1, 2), (2, 24, 3), (1, 16, 4)])
def test_band_decode_equals_whole_decode(vae, height, width, parts):
    x = latents(height, width)
    plans = band_plans(vae, height, width, parts)
    assert plans[0].axis == split_axis(height, width)
    whole = streamed(vae.streaming_decoder(), x)
    assert torch.equal(band_decode(vae, x, plans), whole)


@pytest.mark.parametrize("level", range(5))
def test_every_margin_is_needed(vae, level):
    """One pixel less at any level (the stage inputs and the head) and the bands no longer join."""
    x = latents(1, 32, seed=1)
    plans = band_plans(vae, 1, 32, 2)
    margins = list(plans[0].margins)
    margins[level] -= 1
    short = [dataclasses.replace(p, margins=tuple(margins)) for p in plans]
    assert not torch.equal(band_decode(vae, x, short), streamed(vae.streaming_decoder(), x))


def test_band_bounds():
    assert band_bounds(80, 8) == [(i * 10, i * 10 + 10) for i in range(8)]
    assert band_bounds(44, 8)[-1] == (38, 44)
    assert split_axis(44, 80) == 4 and split_axis(80, 44) == 3
    with pytest.raises(UserError, match="cannot be split into 8"):
        band_bounds(5, 8)
