"""`longlive convert-nvfp4 IN OUT`: a bf16 generator (+ LoRA) or an official model_4o6.pt export to
a packed NVFP4 .safetensors file, with a per-layer table and a size / error summary."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from longlive_cli.app import app


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
    mode: Annotated[str, typer.Option(help="Default runtime mode stored in the file: w4a16 or w4a4.")] = "w4a16",
    preset: Annotated[str, typer.Option(help="Model preset: wan2.2-ti2v-5b or tiny.")] = "wan2.2-ti2v-5b",
    use_ema: Annotated[bool, typer.Option("--use-ema", help="Take the generator_ema weights.")] = False,
    device: Annotated[str, typer.Option(help="Where to quantize: auto (a GPU if any), cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Quantize the 300 DiT block linears to NVFP4 (4.5 bits per weight) and write one file."""
    from core.runtime import resolve_device
    from longlive_cli.options import check_device
    from quant.convert import convert

    if device != "auto":
        check_device(device)
    console = Console()
    progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("layers"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=console, transient=True)
    task = progress.add_task("quantizing", total=None)

    def advance(done: int, total: int, layer) -> None:
        progress.update(task, completed=done, total=total, description=f"quantizing {layer.name}")

    with progress:
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
