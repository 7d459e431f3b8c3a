"""Shared option handling: recipe + flags -> a validated Recipe, errors as UserError."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.config import Recipe, load_recipe
from core.errors import UserError


def resolve_recipe(preset: str | None, recipe: str | None, sets: Sequence[str],
                   flags: dict[str, object]) -> Recipe:
    """Preset < recipe file < --set < explicit flags. `flags` maps dotted keys to values (None =
    not given)."""
    overrides = list(sets) + [f"{key}={_yaml(value)}" for key, value in flags.items()
                              if value is not None]
    try:
        result = load_recipe(recipe, overrides, preset=preset)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    check_device(result.runtime.device)
    return result


def _yaml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_device(device: str) -> None:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible on this machine; "
                            f"use --device cpu (with --preset tiny) or run on a GPU host")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) "
                            f"are visible; pick cuda:0..cuda:{torch.cuda.device_count() - 1}")
