"""`longlive download`: fetch LongLive-2.0-5B and the Wan2.2-TI2V-5B VAE / umt5 / tokenizer."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from core.errors import UserError
from longlive_cli.app import app, interrupted
from longlive_cli.progress import TaskProgress, bytes_per_second, gigabytes


def _size(num: int | None) -> str:
    if num is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if num < 1000 or unit == "GB":
            return f"{num:.1f} {unit}" if unit != "B" else f"{num} B"
        num /= 1000
    return f"{num:.1f} GB"


@app.command()
def download(
    local_dir: Annotated[str | None, typer.Option(
        help="Model folder to fill (default ~/.cache/longlive/models; generate reads the same).")] = None,
    what: Annotated[list[str] | None, typer.Option(
        help="Which files: generator (LongLive-2.0-5B), wan (VAE, umt5, tokenizer). Default both.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    endpoint: Annotated[str | None, typer.Option(
        help="Hub endpoint or mirror (default: HF_ENDPOINT or huggingface.co).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the files and sizes only.")] = False,
    eval_: Annotated[bool, typer.Option("--eval", help="Instead: the VBench environment (pip) and VBench's "
                                        "weights for `eval-vbench` (see docs/eval.md).")] = False,
    cache_dir: Annotated[str | None, typer.Option(help="With --eval: VBench's cache (VBENCH_CACHE_DIR).")] = None,
    dimensions: Annotated[str | None, typer.Option(help="With --eval: only these dimensions' weights.")] = None,
    env_only: Annotated[bool, typer.Option("--env-only", help="With --eval: the environment only.")] = False,
    env_dir: Annotated[str | None, typer.Option(help="With --eval: where the VBench environment goes.")] = None,
) -> None:
    """Download the 5B model files (resumable, by allow-list), showing sizes first."""
    if eval_:
        from longlive_cli.eval import download_eval

        return download_eval(cache_dir, dimensions, env_only, env_dir, dry_run)
    from core.checkpoint import check_writable_folder
    from core.hub import REPOS, plan_download, present_bytes, resolve_model_dir
    from core.hub import download as fetch

    which = list(dict.fromkeys(what or list(REPOS)))
    unknown = [w for w in which if w not in REPOS]
    if unknown:
        raise UserError(f"--what {unknown[0]}: choose from {', '.join(REPOS)}")
    target = resolve_model_dir(local_dir)
    check_writable_folder(target, "--local-dir")
    console = Console()
    planned = plan_download(which, revision, endpoint, target)
    table = Table(title=f"files for {target}", title_justify="left")
    for column in ("repository", "file", "size"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for item in planned:
        table.add_row(item.repo.repo_id, f"{item.repo.folder}/{item.path}", _size(item.size))
    total = sum(item.size or 0 for item in planned)
    table.add_row("", "total", _size(total))
    console.print(table)
    if dry_run:
        return
    already = present_bytes(planned, target)
    with interrupted("the files fetched so far are kept: run the same command again to resume"), TaskProgress(
            "download", gigabytes, console=Console(stderr=True), rate=bytes_per_second, total=total) as progress:
        progress.start(already)
        fetch(planned, target, revision, endpoint, on_bytes=lambda fetched: progress.update(already + fetched))
    console.print(f"[green]done:[/] {target} (use --model-dir {target} if it is not the default)")
