"""The Typer app and its error policy: one red line for every failure the user can act on, and
an exit code that says which kind: 2 bad input (`UserError`), 1 an output that could not be
written (`OutputError`), 130 interrupted (`Interrupted`, or Ctrl-C anywhere else)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer
from rich.console import Console

from core.errors import Interrupted, OutputError, UserError

app = typer.Typer(
    name="longlive",
    help="Real-time, multi-shot long video generation (LongLive 2.0, Wan2.2-TI2V-5B).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@app.callback()
def _root() -> None:
    """Real-time, multi-shot long video generation (LongLive 2.0, Wan2.2-TI2V-5B)."""


@contextlib.contextmanager
def interrupted(kept: str) -> Iterator[None]:
    """Turn Ctrl-C inside the block into one line, "interrupted; <kept>" (what was or was not
    written), and exit code 130. A Ctrl-C that lands while a finalizer (`__del__`) runs is
    swallowed there by Python ("Exception ignored in ..."), and the work would go on: it is raised
    again, as a fresh SIGINT, where the work is."""
    import _thread
    import threading

    previous = sys.unraisablehook
    timer: threading.Timer | None = None

    def redeliver(unraisable) -> None:
        nonlocal timer
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            # a moment later, from another thread: raised in this hook it would be swallowed once
            # more (and should it land in a finalizer again, this hook sends it again). One at a
            # time: a second would land after the first stopped the work, as the process exits.
            if timer is None or not timer.is_alive():
                timer = threading.Timer(0.05, _thread.interrupt_main)
                timer.daemon = True
                timer.start()
        else:
            previous(unraisable)

    sys.unraisablehook = redeliver
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(kept) from None
    finally:
        sys.unraisablehook = previous
        if timer is not None:  # the block is over: nothing left to interrupt
            timer.cancel()


# Subcommands register themselves on `app` when imported; only commands that work are listed.
from longlive_cli import bench as _bench  # noqa: E402,F401
from longlive_cli import convert as _convert  # noqa: E402,F401
from longlive_cli import distill as _distill  # noqa: E402,F401
from longlive_cli import download as _download  # noqa: E402,F401
from longlive_cli import eval as _eval  # noqa: E402,F401
from longlive_cli import generate as _generate  # noqa: E402,F401
from longlive_cli import train as _train  # noqa: E402,F401
from longlive_cli import train_vae as _train_vae  # noqa: E402,F401

err_console = Console(stderr=True, highlight=False, soft_wrap=True)

# Recent Typer vendors its own click; take click's exception classes from Typer itself.
_CLICK_ERRORS = {cls.__name__: cls for cls in typer.BadParameter.__mro__}
UsageError = _CLICK_ERRORS["UsageError"]
ClickException = _CLICK_ERRORS["ClickException"]


def fail(message: str, code: int = 2) -> int:
    err_console.print(f"[bold red]error:[/] {message}", markup=True)
    return code


def cli_command():
    """The app as a click command, with every subcommand's examples and plain boolean flags."""
    from longlive_cli.help import finish_help

    command = typer.main.get_command(app)
    finish_help(command)
    return command


def _torchrun_worker() -> bool:
    """A worker of a re-executed parallel run: its parent reports an interrupt, in one line."""
    from sp.launcher import under_torchrun

    return under_torchrun()


def _exit_code_decided_by_ctrl_c(argv: list[str] | None) -> None:
    """Once Ctrl-C has decided the exit code (130), a further SIGINT (pressed again, or redelivered
    by `interrupted`) must not end the process by the signal while it exits (exit -2, seen 1 in 12
    runs of tests/test_ux_progress.py's training case): the command's own process ignores it from
    here. Only for a command run as a process (`argv` None: the console script, `python -m`), never
    for a caller's process."""
    import signal
    import threading

    if argv is None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    try:
        result = cli_command().main(args=argv, prog_name="longlive", standalone_mode=False)
    except UsageError as err:
        ctx = getattr(err, "ctx", None)
        where = ctx.command_path if ctx is not None else "longlive"
        return fail(f"{err.format_message()} (see '{where} --help')")
    except ClickException as err:
        return fail(err.format_message())
    except UserError as err:
        return fail(str(err))
    except OutputError as err:
        return fail(str(err), 1)
    except Interrupted as err:
        _exit_code_decided_by_ctrl_c(argv)
        if not _torchrun_worker():
            err_console.print(f"interrupted; {err}", highlight=False)
        return 130
    except (typer.Abort, KeyboardInterrupt):
        _exit_code_decided_by_ctrl_c(argv)
        if not _torchrun_worker():
            err_console.print("interrupted")
        return 130
    if result == 130 and not _torchrun_worker():  # typer turns Ctrl-C outside an `interrupted` block into a silent 130
        err_console.print("interrupted")
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
