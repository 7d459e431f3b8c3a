"""Weights shipped inside the package (package data, safetensors only).

shapes/  the shapes-world demo models (docs/models/shapes.md): `vae.safetensors`, the VAE of the
         `shapes` VAEConfig preset, written by `longlive train-vae train_vae_shapes --export ...`.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
SHAPES = ASSETS / "shapes"


def shapes_vae_path() -> Path:
    """Where the shipped shapes-world VAE lives (`core.vae.load_vae(path, VAEConfig.preset("shapes"))`)."""
    return SHAPES / "vae.safetensors"
