"""The one exception type that reaches a user as a sentence instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: the message names what is wrong and how to fix it.

    The command line catches it, prints the message alone and exits non-zero. Raise it before
    anything is written, so that a failed command leaves a run directory as it was.
    """
