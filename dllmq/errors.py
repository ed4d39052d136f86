"""User-facing errors.

Anything the user can fix (bad flag, missing file, tampered checkpoint) raises `UserError`;
the CLI prints its message on one line and exits with code 2, without a traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""

    exit_code = 2


class Interrupted(UserError):
    """Ctrl-C: the message says what was kept and how to continue; the CLI exits with 130."""

    exit_code = 130
