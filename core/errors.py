"""User-facing errors: the CLI prints the message as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (file, option, config). The message names the problem and the fix."""
