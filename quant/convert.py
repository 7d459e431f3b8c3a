"""BF16 generator checkpoints (+ optional LoRA) and official FourOverSix exports -> our packed
NVFP4 file (`quant.linear.save_quantized`), with a per-layer size / error report.

Sources (detected from the file, `detect_source`):
  * a bf16/fp32 generator (`.pt`/`.pth` in the official layouts, `.safetensors`): LoRA merged in
    fp32 first if given (pitfall 27), cast to bf16, the 300 block linears quantized;
  * an official materialised export (`model_4o6.pt`, `scripts/save_merged_nvfp4_generator.py`):
    `{"generator": {"model.<layer>.quantized_weight_values" uint8 [N, K/2],
    "...quantized_weight_scale_factors" e4m3 flat in the cuBLAS blocked layout, "..._amax" fp32 [1],
    "..._metadata" int32 (rows, cols, padded rows, padded cols), other weights bf16},
    "checkpoint_format": "longlive_generator_nvfp4", "quantization": {"scale_rule", ...}}`:
    scales unswizzled, repacked, nothing re-quantized;
  * our own packed file: refused (it is already converted).

Legend: N out_features, K in_features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.checkpoint import _load_file, check_shapes, file_sha256, read_shapes, read_state_dict
from core.config import QuantMode
from core.errors import UserError, first_line
from quant.linear import NVFP4Config, nvfp4_layers, quantize_model, select_linears
from quant.nvfp4 import BLOCK, RULES, NVFP4Tensor, check_rule, from_blocked
from quant.nvfp4_linear import NVFP4Linear, dequantize_tensor
from quant.packed import FORMAT_NAME, is_nvfp4_file, save_quantized

STORAGE_MODES = (QuantMode.w4a16, QuantMode.w4a4)  # the default runtime mode written into the file
OFFICIAL_SUFFIX = "quantized_weight_values"
OFFICIAL_FORMAT = "longlive_generator_nvfp4"
PathLike = str | Path


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]  # [N, K]
    sqnr_db: float | None  # dequantized vs bf16 weight; None when imported (no bf16 reference)
    bf16_bytes: int
    nvfp4_bytes: int


@dataclass
class ConvertReport:
    source: Path
    output: Path
    rule: str
    mode: str
    imported: bool  # from an official NVFP4 export (no re-quantization)
    source_bytes: int = 0
    output_bytes: int = 0
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def bf16_bytes(self) -> int:
        return sum(layer.bf16_bytes for layer in self.layers)

    @property
    def nvfp4_bytes(self) -> int:
        return sum(layer.nvfp4_bytes for layer in self.layers)

    @property
    def file_ratio(self) -> float:
        return self.output_bytes / self.source_bytes

    def _sqnrs(self) -> list[float]:
        return [layer.sqnr_db for layer in self.layers if layer.sqnr_db is not None]

    @property
    def mean_sqnr_db(self) -> float | None:
        values = self._sqnrs()
        return sum(values) / len(values) if values else None

    @property
    def min_sqnr_db(self) -> float | None:
        values = self._sqnrs()
        return min(values) if values else None


# on_layer(done, total, layer) after each layer, for progress displays.
LayerCallback = Callable[[int, int, LayerReport], None]


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """10 log10(|ref|^2 / |ref - approx|^2) in fp64 (inf when equal)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def check_paths(src: Path, dst: Path) -> None:
    if not src.exists():
        raise UserError(f"checkpoint {src} not found: check the path")
    if dst.suffix != ".safetensors":
        raise UserError(f"output {dst} must end in .safetensors (the packed NVFP4 format is one safetensors file)")
    if dst.exists() and src.resolve() == dst.resolve():
        raise UserError(f"output {dst} is the input file: choose another output path")


def check_storage_mode(mode: QuantMode) -> None:
    if mode == QuantMode.native:
        raise UserError("--mode native is a runtime mode, not a storage mode: convert with --mode w4a16 "
                        "(the packed weights are the same) and run with --quant-mode native on a Blackwell GPU")


def detect_source(path: Path) -> str:
    """"longlive-nvfp4" (ours), "official-nvfp4" (a FourOverSix export) or "bf16", from the
    file's metadata and tensor names only (no weights are read)."""
    if is_nvfp4_file(path):  # an unreadable file is reported by read_shapes
        return FORMAT_NAME
    if any(name.endswith(OFFICIAL_SUFFIX) for name in read_shapes(path)):
        return "official-nvfp4"
    return "bf16"


def quantize_checkpoint(model: torch.nn.Module, src: Path, dst: Path, *, preset_name: str, rule: str = "mse",
                        mode: QuantMode = QuantMode.w4a16, lora: Path | None = None, use_ema: bool = False,
                        on_layer: LayerCallback | None = None) -> ConvertReport:
    """A loaded bf16 generator (`src`, LoRA already merged in fp32 by the builder) -> our packed
    NVFP4 file, with one report line per layer. Quantization runs where the model lives (a GPU is
    ~100x faster than the CPU reference)."""
    report = ConvertReport(source=src, output=dst, rule=rule, mode=mode, imported=False)
    total = len(select_linears(model))

    def record(name: str, linear: torch.nn.Linear, layer: NVFP4Linear) -> None:
        weight = linear.weight.detach()
        approx = dequantize_tensor(layer.packed_weight(), torch.float32)
        entry = LayerReport(name, tuple(weight.shape), sqnr_db(weight, approx),
                            weight.numel() * weight.element_size(), layer.packed_nbytes)
        report.layers.append(entry)
        if on_layer is not None:
            on_layer(len(report.layers), total, entry)

    with torch.no_grad():
        quantize_model(model, NVFP4Config(mode=mode, weight_rule=rule, activation_rule=rule), on_layer=record)
    metadata = {"preset": preset_name, "source": src.name, "source_sha256": file_sha256(src),
                "use_ema": str(bool(use_ema)).lower()}
    if lora is not None:
        metadata.update(lora=Path(lora).name, lora_sha256=file_sha256(lora))
    save_quantized(model, dst, metadata)
    report.source_bytes, report.output_bytes = _size(src), dst.stat().st_size
    return report


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return path.stat().st_size


# ----------------------------------------------------------------------------------------------
# Official FourOverSix exports.


def _official_rules(path: Path) -> tuple[str | None, str | None]:
    """(weight rule, activation rule) recorded in an official export, if any."""
    raw = _load_file(path)  # weights_only (no code runs); zip pickles are memory-mapped
    quantization = raw.get("quantization") if isinstance(raw, Mapping) else None
    if not isinstance(quantization, Mapping):
        return None, None
    overall = quantization.get("scale_rule")
    weight = quantization.get("weight_scale_rule") or overall
    activation = quantization.get("activation_scale_rule") or overall
    for value in (weight, activation):
        if value is not None and value not in RULES:
            raise UserError(f"{path} records an unknown scale rule {value!r} (known: {', '.join(RULES)}): "
                            f"check the file")
    return weight, activation


def _unpack_official_layer(prefix: str, state_dict: Mapping[str, Tensor], rule: str, path: Path) -> NVFP4Tensor:
    """One materialised FourOverSix weight -> codes [N, K/2], row-major scales [N, K/16], scalar amax."""
    try:
        values = state_dict[prefix + "quantized_weight_values"]
        flat_scales = state_dict[prefix + "quantized_weight_scale_factors"]
        amax = state_dict[prefix + "quantized_weight_amax"]
        rows, cols, padded_rows, padded_cols = (int(v) for v in state_dict[prefix + "quantized_weight_metadata"])
    except (KeyError, ValueError) as err:
        raise UserError(f"{path}: layer {prefix.rstrip('.')} lacks part of its NVFP4 buffers ({first_line(err)}): "
                        f"the file is incomplete; export it again") from None
    problems = []
    if cols % BLOCK or padded_cols % (4 * BLOCK) or padded_rows % 128 or padded_rows < rows or padded_cols < cols:
        problems.append(f"metadata {(rows, cols, padded_rows, padded_cols)}")
    if values.dtype != torch.uint8 or values.dim() != 2 or values.shape[0] < rows or values.shape[1] * 2 < cols:
        problems.append(f"values {values.dtype} {tuple(values.shape)}")
    if flat_scales.numel() != padded_rows * padded_cols // BLOCK:
        problems.append(f"{flat_scales.numel()} scale factors")
    if amax.numel() != 1:
        problems.append(f"amax of shape {tuple(amax.shape)}")
    if problems:
        raise UserError(f"{path}: layer {prefix.rstrip('.')} has inconsistent NVFP4 buffers ({', '.join(problems)}): "
                        f"the file is damaged; export it again")
    scales = from_blocked(flat_scales.reshape(-1).view(torch.float8_e4m3fn), padded_rows, padded_cols // BLOCK)
    return NVFP4Tensor(codes=values[:rows, : cols // 2].contiguous(),
                       scales=scales[:rows, : cols // BLOCK].contiguous(),
                       amax=amax.reshape(()).float(), rule=rule)


def import_official_nvfp4(src: Path, dst: Path, model: torch.nn.Module, *, preset_name: str,
                          rule: str | None = None, mode: QuantMode = QuantMode.w4a16,
                          on_layer: LayerCallback | None = None) -> ConvertReport:
    """An official materialised NVFP4 export -> our file, bit for bit the same weights, through
    `model` (the DiT on `meta`, filled here). The scale rule comes from the file's metadata; files
    without it need `rule` (pitfall 10: the divisor depends on it and is stored nowhere else)."""
    state_dict = read_state_dict(src)
    file_rule, file_activation_rule = _official_rules(src)
    if rule is not None:
        check_rule(rule)
        if file_rule is not None and rule != file_rule:
            raise UserError(f"{src} was quantized with scale rule {file_rule!r}, not {rule!r}: drop --rule "
                            f"(the rule sets the dequantization divisor)")
    rule = file_rule or rule
    if rule is None:
        raise UserError(f"{src} does not record its scale rule: pass --rule with the rule it was quantized "
                        f"with ({', '.join(RULES)}; the official NVFP4 configs use mse)")
    prefixes = sorted(name[: -len(OFFICIAL_SUFFIX)] for name in state_dict if name.endswith(OFFICIAL_SUFFIX))
    if not prefixes:
        raise UserError(f"{src} holds no NVFP4 layers (no *.{OFFICIAL_SUFFIX}): give a bf16 checkpoint or an "
                        f"official model_4o6.pt export")
    packed_layers = {prefix.rstrip(".") for prefix in prefixes}
    # Everything that is not a packed buffer (a dropped master weight may linger as `weight`).
    tensors: dict[str, Tensor] = {}
    for name, tensor in state_dict.items():
        module, _, leaf = name.rpartition(".")
        if module in packed_layers and (leaf.startswith("quantized_weight_") or leaf == "weight"):
            continue
        tensors[name] = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
    report = ConvertReport(source=src, output=dst, rule=rule, mode=mode, imported=True)
    for prefix in prefixes:
        name = prefix.rstrip(".")
        packed = _unpack_official_layer(prefix, state_dict, rule, src)
        tensors[f"{name}.weight_codes"] = packed.codes
        tensors[f"{name}.weight_scales"] = packed.scales
        tensors[f"{name}.weight_amax"] = packed.amax
        shape = tuple(packed.shape)
        report.layers.append(LayerReport(name, shape, None, math.prod(shape) * 2, packed.nbytes))
        if on_layer is not None:
            on_layer(len(report.layers), len(prefixes), report.layers[-1])

    quant_config = NVFP4Config(mode=mode, weight_rule=rule, activation_rule=file_activation_rule or rule)
    quantize_model(model, quant_config, filter=lambda module_name, _: module_name in packed_layers, exclude=())
    missing_layers = sorted(packed_layers - set(nvfp4_layers(model)))
    if missing_layers:
        raise UserError(f"{src} has NVFP4 layers that are not linears of the {preset_name} model "
                        f"({', '.join(missing_layers[:3])}): check --preset")
    check_shapes({name: tuple(t.shape) for name, t in model.state_dict().items()}, tensors,
                 f"NVFP4 export {src}", f"the {preset_name} model", "check --preset / the file")
    model.load_state_dict(tensors, strict=True, assign=True)
    metadata: dict[str, Any] = {"preset": preset_name, "source": src.name, "source_sha256": file_sha256(src),
                                "imported_from": OFFICIAL_FORMAT}
    save_quantized(model, dst, metadata)
    report.source_bytes, report.output_bytes = _size(src), dst.stat().st_size
    return report
