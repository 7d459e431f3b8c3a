"""User-facing errors: the CLI prints the message as one line and exits with code 2 (bad input),
1 (an output that could not be written) or 130 (interrupted)."""

import errno
import logging
import os
import re
from collections.abc import Sequence

log = logging.getLogger(__name__)

SHOWN_NAMES = 3  # names quoted in an error message before "..."


class UserError(Exception):
    """Bad input from the user (file, option, config). The message names the problem and the fix."""


class OutputError(Exception):
    """Writing an output failed part-way (disk full, read-only or removed folder, file too large).
    The message names the file, the cause and the fix; the CLI exits with code 1."""


class Interrupted(Exception):
    """Ctrl-C during a command; the message says what was kept or not written (the CLI exits 130)."""


def first_line(err: BaseException | str) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line errors."""
    text = str(err).strip()
    if text:
        return text.splitlines()[0]
    return type(err).__name__ if isinstance(err, BaseException) else ""


def first_names(names: Sequence[str]) -> str:
    """A few names of a list, for messages like "3 missing (a, b, c, ...)"."""
    shown = ", ".join(names[:SHOWN_NAMES])
    return f"{shown}, ..." if len(names) > SHOWN_NAMES else shown


def plural(count: int, noun: str, plural_noun: str | None = None) -> str:
    """"1 chunk", "2 chunks" (`plural_noun` for irregular words)."""
    return f"{count} {noun if count == 1 else plural_noun or noun + 's'}"


# ----------------------------------------------------------------------------------------------
# Write failures.

_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")  # how Rust writers (safetensors) report errno
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # only ever a write refused
_PERMISSION = (errno.EROFS, errno.EACCES, errno.EPERM)
WRITE_ERRNOS = SPACE_ERRNOS + _PERMISSION  # errors that are about where we write, not what we read


def os_error_of(err: BaseException) -> OSError | None:
    """The operating-system error behind a failed write, if any: `err` itself, one in its
    cause/context chain (torch's writer wraps it in a RuntimeError), or an errno quoted in the
    message (safetensors)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        match = _OS_ERROR_IN_TEXT.search(str(current))
        if match:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        current = current.__cause__ or current.__context__
    return None


def write_failed(path: os.PathLike | str, err: OSError) -> OutputError:
    """The one-line error of a write to `path` that failed with `err`."""
    cause = err.strerror or first_line(err)
    if err.errno in SPACE_ERRNOS:
        fix = "free some space there (or raise the file-size limit) or choose another location"
    elif err.errno in _PERMISSION:
        fix = "choose a writable location"
    else:
        fix = "check the location and try again"
    return OutputError(f"cannot write {path}: {cause}: {fix}")


def discard_partial(path: os.PathLike | str) -> None:
    """Remove a temp or partial output on an error path without raising: the error being handled
    is the one to report (on a read-only or vanished folder the removal itself can fail)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        log.debug("could not remove %s: %s", path, err)
