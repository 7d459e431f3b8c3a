"""User-facing errors: the CLI prints the message as one line and exits with code 2."""

from collections.abc import Sequence

SHOWN_NAMES = 3  # names quoted in an error message before "..."


class UserError(Exception):
    """Bad input from the user (file, option, config). The message names the problem and the fix."""


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
