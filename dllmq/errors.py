"""User-facing errors.

Anything the user can fix (bad flag, missing file, tampered checkpoint) raises `UserError`;
the CLI prints its message on one line and exits with code 2, without a traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""

    exit_code = 2
