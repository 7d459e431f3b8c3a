"""Weights shipped inside the package (package data, safetensors only).

shapes/  the shapes-world demo models (docs/models/shapes.md), loaded by the `shapes` preset (and by
         `--preset tiny` once they are there, `ShapesFiles.shipped().complete`):
         `dit.safetensors`, the generator of the `shapes` ModelConfig preset, written by
         `longlive train-ar train_ar_shapes --export ...`;
         `vae.safetensors`, the VAE of the `shapes` VAEConfig preset, written by
         `longlive train-vae train_vae_shapes --export ...`;
         `text_encoder.safetensors`, the tiny umt5 the generator is trained with (the seed-0
         weights of `TextEncoder.tiny`, Wan names, fp32), stored so that no RNG change can alter it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
SHAPES = ASSETS / "shapes"
DIT_FILE, VAE_FILE, TEXT_ENCODER_FILE = "dit.safetensors", "vae.safetensors", "text_encoder.safetensors"


def shapes_dir() -> Path:
    """The shipped shapes models' folder (read at call time: tests point `SHAPES` elsewhere)."""
    return SHAPES


def shapes_vae_path() -> Path:
    """Where the shipped shapes-world VAE lives (`core.vae.load_vae(path, VAEConfig.preset("shapes"))`)."""
    return shapes_dir() / VAE_FILE


def shapes_text_encoder_path() -> Path:
    """The shipped tiny text encoder: `TextEncoder.from_wan_checkpoint(path, ByteTokenizer(512),
    config=TextEncoderConfig.preset("tiny"))` equals `TextEncoder.tiny(seed=0)`. Always the package's
    own copy (hash-tested), whatever `SHAPES` points at."""
    return ASSETS / "shapes" / TEXT_ENCODER_FILE


@dataclass(frozen=True)
class ShapesFiles:
    """The files of the `shapes` preset in one folder; a folder without a text encoder uses the
    package's."""

    folder: Path
    dit: Path
    vae: Path
    text_encoder: Path

    @classmethod
    def in_folder(cls, folder: Path) -> ShapesFiles:
        own_encoder = folder / TEXT_ENCODER_FILE
        encoder = own_encoder if own_encoder.is_file() else shapes_text_encoder_path()
        return cls(folder, folder / DIT_FILE, folder / VAE_FILE, encoder)

    @classmethod
    def shipped(cls) -> ShapesFiles:
        return cls.in_folder(shapes_dir())

    @property
    def complete(self) -> bool:
        """Both trained files are there (the text encoder always is)."""
        return self.dit.is_file() and self.vae.is_file()

    def missing(self, need_dit: bool = True) -> list[Path]:
        return [p for p in ((self.dit,) if need_dit else ()) + (self.vae, self.text_encoder) if not p.is_file()]
