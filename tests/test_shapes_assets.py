"""Shipped shapes-world files: the tiny text encoder the generator is trained with is stored, with a
fixed hash, and loads to exactly the encoder of `TextEncoder.tiny(seed=0)`."""

from __future__ import annotations

import hashlib

import torch

from core.assets import shapes_text_encoder_path
from core.shots import SCENE_CUT_PREFIX
from core.text import ByteTokenizer, TextEncoder, TextEncoderConfig
from core.train.synthetic import evaluation_prompts

TEXT_ENCODER_SHA256 = "1073933667082af7217a674f1ef8c146d524cf94a14e9738ae53d81b517ea1a5"


def test_shipped_text_encoder_is_the_seed_0_tiny_encoder():
    path = shapes_text_encoder_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == TEXT_ENCODER_SHA256
    config = TextEncoderConfig.preset("tiny")
    shipped = TextEncoder.from_wan_checkpoint(path, ByteTokenizer(config.text_len), config=config)
    prompts = [p.caption for p in evaluation_prompts()[::12]]
    prompts.append(SCENE_CUT_PREFIX + prompts[0])
    assert torch.equal(shipped.encode(prompts), TextEncoder.tiny(seed=0).encode(prompts))
