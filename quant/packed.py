"""The packed NVFP4 checkpoint: one .safetensors file (`save_quantized` / `read_quantized` /
`load_packed`).

Every tensor of the bare model state dict, except that each quantized linear `L` holds
`L.weight_codes` (uint8 [N, K/2]), `L.weight_scales` (F8_E4M3 [N, K/16], row-major),
`L.weight_amax` (F32 scalar) and `L.bias` instead of `L.weight`; string metadata `format`,
`format_version`, `rule`, `activation_rule`, `mode`, `layers`, `model_config` (JSON) plus what
the writer adds.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from core.checkpoint import atomic_write, check_shapes, normalize_keys
from core.config import ModelConfig, QuantMode
from core.errors import UserError, first_line
from quant.linear import NVFP4Config, nvfp4_layers, quantize_model
from quant.nvfp4 import RULES
from quant.nvfp4_linear import PACKED_BUFFERS
from quant.nvfp4_train import NVFP4TrainLinear

FORMAT_NAME = "longlive-nvfp4"
FORMAT_VERSION = 1


def quantized_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Bare names -> contiguous CPU tensors: the packed buffers of the NVFP4 layers and every
    other parameter of the model as it is."""
    if any(isinstance(m, NVFP4TrainLinear) for m in model.modules()):
        raise ValueError("train-mode layers hold bf16 master weights: swap with an inference mode "
                         "(w4a16 / w4a4) to export packed NVFP4 weights")
    return {name: t.detach().to("cpu").contiguous() for name, t in normalize_keys(model.state_dict()).items()}


def _metadata_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def save_quantized(model: nn.Module, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the packed model to one .safetensors file atomically (format in the module doc)."""
    path = Path(path)
    layers = nvfp4_layers(model)
    if not layers:
        raise ValueError("the model has no NVFP4 layers: run quantize_model first")
    rules = {(layer.rule, layer.activation_rule) for layer in layers.values()}
    if len(rules) != 1:
        raise ValueError(f"one file holds one scale rule; the layers use {sorted(rules)}")
    (rule, activation_rule), = rules
    text = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "rule": rule,
        "activation_rule": activation_rule,
        "mode": str(next(iter(layers.values())).mode),
        "layers": str(len(layers)),
    }
    config = getattr(model, "config", None)
    if isinstance(config, ModelConfig):
        text["model_config"] = json.dumps(dataclasses.asdict(config))
    for key, value in (metadata or {}).items():
        if key in ("format", "format_version"):
            raise ValueError(f"metadata key {key!r} is reserved")
        text[str(key)] = _metadata_text(value)
    tensors = quantized_state_dict(model)
    atomic_write(path, lambda temp: safetensors.torch.save_file(tensors, temp, text))
    return path


def read_quantized(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a packed NVFP4 file; every problem is a one-line UserError."""
    path = Path(path)
    fix = "convert the bf16 or official checkpoint with `longlive convert-nvfp4 IN OUT.safetensors`"
    if not path.is_file():
        raise UserError(f"NVFP4 checkpoint {path} not found: check the path, or {fix}")
    if path.suffix != ".safetensors":
        raise UserError(f"{path} is not a packed NVFP4 .safetensors file: {fix}")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            check_format(metadata, path)
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (safetensors.SafetensorError, OSError, RuntimeError) as err:
        raise UserError(f"cannot read {path} ({first_line(err)}): the file is truncated or corrupt; "
                        f"convert it again") from err
    return tensors, metadata


def is_nvfp4_file(path: str | Path) -> bool:
    """Whether `path` is a packed NVFP4 file of ours (by its metadata; unreadable files: False,
    so the caller's own loader reports them)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("format") == FORMAT_NAME
    except (safetensors.SafetensorError, OSError):
        return False


def check_format(metadata: Mapping[str, str], path: str | Path) -> None:
    if metadata.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not a packed NVFP4 checkpoint (no '{FORMAT_NAME}' format metadata): "
                        f"convert it with `longlive convert-nvfp4 {path} OUT.safetensors`")
    version = metadata.get("format_version", "")
    if version != str(FORMAT_VERSION):
        raise UserError(f"{path} has NVFP4 format version {version!r}; this longlive reads version "
                        f"{FORMAT_VERSION}: convert the bf16 checkpoint again with this version")
    rule = metadata.get("rule")
    if rule not in RULES:
        raise UserError(f"{path} records an unknown scale rule {rule!r}: the file is damaged; convert it again")


def load_packed(path: str | Path, model: nn.Module, mode: QuantMode = QuantMode.w4a16) -> nn.Module:
    """Fill a model built on `meta` from a packed file: the file's NVFP4 layers are swapped in
    (running in `mode`), then every tensor is loaded with assign (no copy; tensors stay on the
    CPU in the file's dtypes: the caller moves the model)."""
    tensors, metadata = read_quantized(path)
    suffix = "." + PACKED_BUFFERS[0]
    packed_layers = {name[: -len(suffix)] for name in tensors if name.endswith(suffix)}
    config = NVFP4Config(mode=mode, weight_rule=metadata["rule"],
                         activation_rule=metadata.get("activation_rule", metadata["rule"]))
    quantize_model(model, config, filter=lambda name, _: name in packed_layers, exclude=())
    check_shapes({name: tuple(t.shape) for name, t in model.state_dict().items()}, tensors,
                 f"NVFP4 checkpoint {path}", "the model", "check --preset / the file")
    expected_dtypes = {"weight_codes": torch.uint8, "weight_scales": torch.float8_e4m3fn,
                       "weight_amax": torch.float32}
    for name, tensor in tensors.items():
        kind = name.rsplit(".", 1)[-1]
        if kind in expected_dtypes and tensor.dtype != expected_dtypes[kind]:
            raise UserError(f"NVFP4 checkpoint {path}: {name} is {tensor.dtype}, expected "
                            f"{expected_dtypes[kind]}: the file is damaged; convert it again")
    model.load_state_dict(tensors, strict=True, assign=True)
    return model
