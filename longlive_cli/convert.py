"""`longlive convert-nvfp4 IN OUT`: a bf16 generator (+ LoRA) or an official model_4o6.pt export to
a packed NVFP4 .safetensors file, with a per-layer table and a size / error summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from core.checkpoint import check_writable
from core.config import MODEL_PRESETS, ModelConfig, QuantMode
from core.errors import UserError
from longlive_cli.app import app, interrupted
from longlive_cli.progress import TaskProgress, count_of, per_second

PathLike = str | Path


def _size(num: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num < 1000 or unit == "GB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.2f} {unit}"
        num /= 1000
    return f"{num:.2f} GB"


def _db(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@app.command("convert-nvfp4")
def convert_nvfp4(
    source: Annotated[str, typer.Argument(
        metavar="IN", help="bf16 generator (.pt/.pth/.safetensors or a shard folder) or an official model_4o6.pt.")],
    output: Annotated[str, typer.Argument(
        metavar="OUT", help="Packed NVFP4 output (.safetensors, written atomically).")],
    lora: Annotated[str | None, typer.Option(help="LoRA to merge into the bf16 weights before quantizing.")] = None,
    rule: Annotated[str | None, typer.Option(
        help="Scale rule: static_6, static_4, mse (default), mae, abs_max. Official exports record theirs.")] = None,
    mode: Annotated[QuantMode, typer.Option(help="Default runtime mode stored in the file: w4a16 or w4a4.")]
    = QuantMode.w4a16,
    preset: Annotated[str, typer.Option(help="Model preset: wan2.2-ti2v-5b or tiny.")] = "wan2.2-ti2v-5b",
    use_ema: Annotated[bool, typer.Option("--use-ema", help="Take the generator_ema weights.")] = False,
    device: Annotated[str, typer.Option(help="Where to quantize: auto (a GPU if any), cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Quantize the 300 DiT block linears to NVFP4 (4.5 bits per weight) and write one file."""
    from core.runtime import resolve_device
    from longlive_cli.options import check_device

    if device != "auto":
        check_device(device)
    console = Console()
    with interrupted("nothing was written"), TaskProgress(
            "quantizing", count_of("layers"), console=Console(stderr=True), rate=per_second("layers/s"),
            transient=True) as progress:

        def advance(done: int, total: int, layer) -> None:
            if done == 1:  # the clock starts here: loading the checkpoint is not quantizing
                progress.start(done)
            progress.update(done, total, description=f"quantizing {layer.name}")

        report = convert(source, output, preset, lora=lora, rule=rule, mode=mode, use_ema=use_ema,
                         device=resolve_device(device), on_layer=advance)

    table = Table(title=f"NVFP4 layers ({report.rule}{', imported' if report.imported else ''})", title_justify="left")
    for column in ("layer", "shape", "SQNR dB", "bf16", "nvfp4"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in report.layers:
        table.add_row(layer.name, "x".join(map(str, layer.shape)), _db(layer.sqnr_db),
                      _size(layer.bf16_bytes), _size(layer.nvfp4_bytes))
    console.print(table)
    sqnr = "" if report.mean_sqnr_db is None else \
        f"; SQNR mean {report.mean_sqnr_db:.2f} dB, min {report.min_sqnr_db:.2f} dB"
    console.print(f"[green]done:[/] {len(report.layers)} layers {_size(report.bf16_bytes)} -> "
                  f"{_size(report.nvfp4_bytes)} ({report.nvfp4_bytes / report.bf16_bytes:.3f}x); file "
                  f"{_size(report.source_bytes)} -> {_size(report.output_bytes)} ({report.file_ratio:.3f}x)"
                  f"{sqnr} -> {report.output}")


def convert(src: PathLike, dst: PathLike, preset: str | ModelConfig, *, lora: PathLike | None = None,
            rule: str | None = None, mode: QuantMode = QuantMode.w4a16, use_ema: bool = False,
            device: torch.device | str = "cpu", on_layer=None):
    """The `convert-nvfp4` job: check, detect the source kind from its header, then quantize a bf16
    generator (loaded by the builder, LoRA merged in fp32, cast to bf16) or import an official
    NVFP4 export bit for bit. Returns the `quant.convert.ConvertReport`."""
    from longlive_cli.build import DiTSpec, build_dit, check_dit_spec, meta_dit
    from quant.convert import (
        check_paths,
        check_storage_mode,
        detect_source,
        import_official_nvfp4,
        quantize_checkpoint,
    )
    from quant.nvfp4 import check_rule
    from quant.packed import FORMAT_NAME

    src, dst = Path(src), Path(dst)
    config, preset_name = _model_config(preset)
    mode = QuantMode(mode)
    check_paths(src, dst)
    check_writable(dst, "OUT", create_folders=True)
    check_storage_mode(mode)
    if rule is not None:
        check_rule(rule)
    kind = detect_source(src)
    if kind == FORMAT_NAME:
        raise UserError(f"{src} is already a packed NVFP4 checkpoint ({FORMAT_NAME}): use it directly "
                        f"(e.g. --checkpoint {src})")
    if kind == "official-nvfp4":
        if lora is not None:
            raise UserError(f"{src} is an official NVFP4 export (already quantized): a LoRA cannot be merged "
                            f"into it; convert the bf16 base with --lora instead (pitfall 27)")
        return import_official_nvfp4(src, dst, meta_dit(config), preset_name=preset_name, rule=rule, mode=mode,
                                     on_layer=on_layer)
    spec = DiTSpec(config, torch.device(device), torch.bfloat16, checkpoint=src,
                   lora=Path(lora) if lora is not None else None, use_ema=use_ema)
    check_dit_spec(spec)
    model = build_dit(spec).model
    return quantize_checkpoint(model, src, dst, preset_name=preset_name, rule=rule or "mse", mode=mode,
                               lora=spec.lora, use_ema=use_ema, on_layer=on_layer)


def _model_config(preset: str | ModelConfig) -> tuple[ModelConfig, str]:
    """(config, name for the metadata) from a preset name or a config."""
    if isinstance(preset, ModelConfig):
        return preset, "custom"
    if preset not in MODEL_PRESETS:
        raise UserError(f"--preset {preset}: unknown model preset (choose one of {', '.join(MODEL_PRESETS)})")
    return ModelConfig.preset(preset), preset
