"""Weights shipped inside the package (package data, safetensors only).

shapes/  the shapes-world demo models (docs/models/shapes.md):
         `vae.safetensors`, the VAE of the `shapes` VAEConfig preset, written by
         `longlive train-vae train_vae_shapes --export ...`;
         `text_encoder.safetensors`, the tiny umt5 the generator is trained with (the seed-0
         weights of `TextEncoder.tiny`, Wan names, fp32), stored so that no RNG change can alter it.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
SHAPES = ASSETS / "shapes"


def shapes_vae_path() -> Path:
    """Where the shipped shapes-world VAE lives (`core.vae.load_vae(path, VAEConfig.preset("shapes"))`)."""
    return SHAPES / "vae.safetensors"


def shapes_text_encoder_path() -> Path:
    """The shipped tiny text encoder: `TextEncoder.from_wan_checkpoint(path, ByteTokenizer(512),
    config=TextEncoderConfig.preset("tiny"))` equals `TextEncoder.tiny(seed=0)`."""
    return SHAPES / "text_encoder.safetensors"
